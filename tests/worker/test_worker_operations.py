"""Operations of a real ``certremove worker`` process: its metrics page (promtool), the
heartbeat and ``certremove health``, JSON logs, a plain Celery client routed with
``producer.routing``, and the start-up failures that must end it with one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from producer import Client, routing
from tests.integration.conftest import (  # noqa: F401 - the fixture, used by name
    StartWorker,
    make_settings,
    run_to_exit,
    start_worker_process,
)
from worker.launcher import REPO_ROOT, free_port, metrics_text

pytestmark = pytest.mark.integration

PROMTOOL = "/usr/bin/promtool"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def health(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "health", "--url", url, "--max-age", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_metrics_health_routing_and_json_logs_of_a_real_worker(
    state: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,  # noqa: F811
) -> None:
    worker = start_worker_process(state, broker_url, model_name, log_format="json")
    url = f"http://127.0.0.1:{worker.port}/metrics"

    # the real page: valid for promtool, with the contract's names
    page = metrics_text(worker.port)
    if Path(PROMTOOL).exists():
        lint = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=page, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
    m = samples(page)
    build = [labels for name, labels in m if name == "certremove_build_info"]
    assert len(build) == 1 and dict(build[0])["model"] == model_name
    assert dict(build[0])["device"] == "cpu" and dict(build[0])["torch"]
    for reason in ("max_removals", "budget", "numerical", "extractor"):
        assert m[("certremove_retrains_total", (("reason", reason),))] == 0
    assert m[("certremove_budget_limit", ())] > 0
    assert m[("certremove_epoch_max_removals", ())] == 1000
    assert m[("certremove_backlog_stream_length", ())] == 0
    assert m[("certremove_dead_letters", ())] == 0
    assert m[("certremove_last_retrain_timestamp_seconds", ())] == 0
    assert ("process_start_time_seconds", ()) in m
    assert not any(name.startswith("certremove_extractor") for name, _ in m)  # no DP extractor
    first_beat = m[("certremove_heartbeat_timestamp_seconds", ())]
    assert first_beat > 0

    # a plain Celery client: no request id, so the task id is the request id
    client = Client(broker_url, model=model_name)
    celery = Celery(broker=broker_url, set_as_current=False)
    celery.conf.update(routing.celery_config(model_name))
    applied = celery.send_task(routing.TASK_REMOVE, kwargs={"sample_ids": [11, 12]}).id
    unknown = celery.send_task(routing.TASK_REMOVE, kwargs={"sample_ids": [987_654_321]}).id
    celery.close()
    st = client.wait([applied, unknown], timeout=30)
    assert st[applied]["status"] == "applied" and st[applied]["method"] == "newton"
    assert st[unknown]["status"] == "rejected"

    # the heartbeat moves while the worker idles; health says so
    time.sleep(2.5)
    m = samples(metrics_text(worker.port))
    assert m[("certremove_heartbeat_timestamp_seconds", ())] > first_beat
    assert m[("certremove_requests_total", (("outcome", "rejected"),))] == 1
    ok = health(url)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: heartbeat"), ok.stdout + ok.stderr

    # a stopped (wedged) worker is unhealthy: one line, no traceback
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        bad = health(url)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("unhealthy:"), bad.stderr
    assert "Traceback" not in bad.stderr

    # JSON logs: every line an object; the rejection is one line with its request id and reason
    worker.stop()
    lines = [json.loads(line) for line in worker.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    assert any(x["logger"].startswith("celery") for x in lines)  # Celery's own lines too
    rejected = [x for x in lines if x.get("request_id") == unknown]
    assert len(rejected) == 1 and rejected[0]["model"] == model_name
    assert rejected[0]["reason"] == st[unknown]["reason"]
    assert "987654321" not in worker.log_text()  # never a sample id


def _one_line_exit(text: str) -> str:
    assert "Traceback" not in text and "Unrecoverable" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def test_a_bad_loglevel_exits_2_with_one_line_before_anything_starts(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CERTREMOVE_STATE_DIR": str(tmp_path / "nowhere"),
        "CERTREMOVE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--loglevel", "LOUD"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    assert "--loglevel" in _one_line_exit(out.stderr) and "LOUD" in out.stderr
    assert time.monotonic() - t0 < 20


def test_the_metrics_port_in_use_exits_4_before_the_model_loads(
    state: Path, tmp_path: Path, broker_url: str, model_name: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(state, broker_url, model_name, metrics_port=port)
        code, text, _ = run_to_exit(settings, tmp_path / "worker.log")
    assert code == 4, text[-3000:]
    line = _one_line_exit(text)
    assert f"127.0.0.1:{port}" in line and "already in use" in line
    assert "version" not in text  # it never loaded the model


def test_an_unreachable_broker_exits_4_after_the_connect_timeout(
    state: Path, tmp_path: Path, model_name: str
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(state, url, model_name, broker_connect_timeout=2.0)
    code, text, took = run_to_exit(settings, tmp_path / "worker.log")
    assert code == 4, text[-3000:]
    line = _one_line_exit(text)
    assert "cannot reach Redis" in line and "2 s" in line
    assert "try 1 failed, next in 0.5 s" in text and "try 2 failed, next in 1.0 s" in text
    assert took < 30


def test_an_unreadable_state_is_still_one_line(tmp_path: Path, model_name: str) -> None:
    """The checks before the broker: a state problem wins, one line, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.rmtree(empty)
    settings = make_settings(empty, f"redis://127.0.0.1:{free_port()}/0", model_name)
    code, text, _ = run_to_exit(settings, tmp_path / "worker.log")
    assert code == 3, text[-3000:]
    _one_line_exit(text)
