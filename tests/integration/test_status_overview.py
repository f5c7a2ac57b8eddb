"""``certremove status`` without a request id, the history file and ``certremove report``, on a
real ``certremove worker`` process (private Redis): the overview's every field after a run with
background retrains, the history lines the worker wrote (across a restart) and the report drawn
from them; an unpublished model and an unreachable Redis exit non-zero with one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import core
from producer import Client
from tests.conftest import make_state
from tests.integration.conftest import StartWorker
from worker.cli import app
from worker.history import HISTORY_NAME

pytestmark = pytest.mark.integration
runner = CliRunner()

OVERVIEW_FIELDS = {
    "model",
    "published",
    "version",
    "accounting",
    "budget_used",
    "budget_limit",
    "budget_used_ratio",
    "removed_in_epoch",
    "max_removals",
    "training_samples",
    "test_accuracy",
    "backlog",
    "dead_letters",
    "last_retrain_at",
    "last_retrain_reason",
    "guarantee",
    "certified",
    "device",
    "updated_at",
    "age_seconds",
    "worker",
}


def overview(broker_url: str, model: str) -> dict:
    res = runner.invoke(app, ["status", "--model", model, "--broker-url", broker_url, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def history(state: Path) -> list[dict]:
    return [json.loads(x) for x in (state / HISTORY_NAME).read_text().splitlines()]


def test_overview_history_and_report_of_a_real_worker(
    tmp_path: Path, broker_url: str, model_name: str, start_worker_process: StartWorker
) -> None:
    state = make_state(tmp_path / "state", n=600, d=8, max_removals=20)
    began = time.time()
    worker = start_worker_process(state, broker_url, model_name)
    client = Client(broker_url, model=model_name)
    rids: list[str] = []
    for start in range(0, 90, 15):
        rids += client.enqueue_many([[i] for i in range(start, start + 15)])
        time.sleep(0.2)
    rids.append(client.enqueue([90, 987_654]))  # an unknown id is answered, not removed
    st = client.wait(rids, timeout=90)
    assert {s["status"] for s in st.values()} == {"applied"}
    client.redis.xadd(f"certremove:{model_name}:requests", {"sample_ids": "[95]"})  # dead letter
    client.ring()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and overview(broker_url, model_name)["dead_letters"] < 1:
        time.sleep(0.2)
    time.sleep(0.3)

    ov = overview(broker_url, model_name)
    persisted = core.load_model(state, device="cpu")
    assert set(ov) == OVERVIEW_FIELDS
    assert ov["model"] == model_name and ov["published"] is True
    assert ov["version"] == persisted.version >= 3  # background retrains took over
    assert ov["accounting"] == "exact"
    assert ov["budget_used"] == pytest.approx(persisted.budget_used, rel=1e-6)
    assert ov["budget_limit"] == pytest.approx(persisted.budget_total)
    assert ov["budget_used_ratio"] == pytest.approx(ov["budget_used"] / ov["budget_limit"])
    assert 0 <= ov["budget_used_ratio"] <= 1
    assert ov["removed_in_epoch"] == persisted.removed_in_epoch
    assert ov["max_removals"] == persisted.max_removals == 20
    assert ov["training_samples"] == persisted.n_alive == 600 - 91
    assert 0 < ov["test_accuracy"] <= 1
    assert set(ov["backlog"]) == {
        "stream_length",
        "undelivered",
        "pending",
        "oldest_age_seconds",
        "waiting",
    }
    assert ov["backlog"]["waiting"] == 0 and ov["backlog"]["oldest_age_seconds"] == 0
    assert ov["backlog"]["stream_length"] >= 1
    assert ov["dead_letters"] == 1
    assert ov["last_retrain_reason"] == "max_removals"
    assert began <= ov["last_retrain_at"] <= time.time()
    assert ov["guarantee"] == {"epsilon": 1.0, "delta": 1e-4}
    assert ov["certified"] is persisted.certified is True  # retrains draw fresh OS noise
    assert ov["device"] == "cpu" and ov["worker"] == f"{model_name}-w"
    assert began <= ov["updated_at"] <= time.time() and 0 <= ov["age_seconds"] < 60

    human = runner.invoke(app, ["status", "--model", model_name, "--broker-url", broker_url])
    assert human.exit_code == 0, human.output
    for words in ("budget used / limit", "epoch removals", "dead letters", "max_removals"):
        assert words in human.stdout

    # The history the worker wrote: a start, steps and retrains; every row once; no sample id.
    recs = history(state)
    assert recs[0]["event"] == "start" and recs[0]["version"] == 1
    events = {r["event"] for r in recs}
    assert events == {"start", "step", "retrain"}
    assert sum(r["rows"] for r in recs) == 91
    retrains = [r for r in recs if r["event"] == "retrain"]
    assert [r["version"] for r in retrains] == list(range(2, persisted.version + 1))
    assert {r["reason"] for r in retrains} == {"max_removals"}
    assert recs[-1]["version"] == persisted.version
    assert recs[-1]["budget_used"] == pytest.approx(persisted.budget_used, rel=1e-6)
    assert all(r["removed_in_epoch"] <= r["max_removals"] for r in recs)
    assert "987654" not in (state / HISTORY_NAME).read_text()

    # A restart appends a start line and keeps the last retrain in the overview.
    worker.stop()
    start_worker_process(state, broker_url, model_name)
    assert history(state)[-1]["event"] == "start"
    assert len(history(state)) == len(recs) + 1
    after = overview(broker_url, model_name)
    assert after["last_retrain_at"] == pytest.approx(ov["last_retrain_at"], abs=1e-3)
    assert after["updated_at"] > ov["updated_at"]

    # The report of that history.
    out = tmp_path / "report.png"
    res = runner.invoke(app, ["report", "--state", str(state), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    drawn = json.loads(res.stdout)
    assert drawn["rows_removed"] == 91 and drawn["starts"] == 2


def test_a_model_no_worker_published_exits_1_but_json_shows_the_backlog(
    broker_url: str, model_name: str
) -> None:
    Client(broker_url, model=model_name).enqueue_many([[1], [2], [3]])
    res = runner.invoke(app, ["status", "--model", model_name, "--broker-url", broker_url])
    assert res.exit_code == 1
    assert f"no worker has published model '{model_name}' yet" in res.output
    assert "3 request(s) wait" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(
        app, ["status", "--model", model_name, "--broker-url", broker_url, "--json"]
    )
    assert res.exit_code == 1
    ov = json.loads(res.stdout)
    assert set(ov) == OVERVIEW_FIELDS and ov["published"] is False and ov["version"] is None
    assert ov["backlog"]["undelivered"] == 3 and ov["backlog"]["waiting"] == 3


def test_an_unreachable_redis_exits_non_zero_with_one_line() -> None:
    res = runner.invoke(app, ["status", "--broker-url", "redis://127.0.0.1:1/0", "--json"])
    assert res.exit_code == 2
    assert "cannot reach Redis" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
