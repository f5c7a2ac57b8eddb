"""certremove health against a real metrics endpoint (worker.metrics served over HTTP)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from worker.cli import app
from worker.health import check, default_url, heartbeat_value
from worker.launcher import free_port
from worker.metrics import ServiceMetrics

runner = CliRunner()


def test_heartbeat_value_parses_the_exposition() -> None:
    text = (
        "# HELP certremove_heartbeat_timestamp_seconds x\n"
        "certremove_heartbeat_timestamp_seconds_other 5\n"
        "certremove_heartbeat_timestamp_seconds 1.5e+09\n"
    )
    assert heartbeat_value(text) == 1.5e9
    assert heartbeat_value('certremove_heartbeat_timestamp_seconds{a="b"} 7\n') == 7
    assert heartbeat_value("other 1\n") is None


def test_fresh_stale_and_missing_heartbeat() -> None:
    metrics = ServiceMetrics(CollectorRegistry())
    url = f"http://127.0.0.1:{metrics.serve(0)}/metrics"
    ok, line = check(url, 30)
    assert not ok and "not started serving" in line  # never beat yet
    metrics.beat()
    ok, line = check(url, 30)
    assert ok and line.startswith("ok: heartbeat")
    ok, line = check(url, 30, now=time.time() + 60)
    assert not ok and "wedged or stopped" in line
    assert runner.invoke(app, ["health", "--url", url]).exit_code == 0
    out = runner.invoke(app, ["health", "--url", url, "--max-age", "0.000001"])
    assert out.exit_code == 1 and "unhealthy:" in out.output


def test_nothing_listening_is_one_line_exit_1() -> None:
    out = runner.invoke(app, ["health", "--url", f"http://127.0.0.1:{free_port()}/metrics"])
    assert out.exit_code == 1
    assert out.output.count("\n") == 1 and "no answer from" in out.output


def test_the_default_url_follows_the_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # the compose and Dockerfile healthchecks run `certremove health` with the worker's env
    monkeypatch.setenv("CERTREMOVE_METRICS_ADDR", "0.0.0.0")
    monkeypatch.setenv("CERTREMOVE_METRICS_PORT", "9911")
    assert default_url() == "http://127.0.0.1:9911/metrics"
    monkeypatch.setenv("CERTREMOVE_METRICS_ADDR", "::1")
    assert default_url() == "http://[::1]:9911/metrics"
    monkeypatch.delenv("CERTREMOVE_METRICS_ADDR")
    monkeypatch.delenv("CERTREMOVE_METRICS_PORT")
    assert default_url() == "http://127.0.0.1:9820/metrics"


@pytest.mark.parametrize("age", ["0", "-1", "inf", "nan"])
def test_a_max_age_that_would_accept_any_heartbeat_is_refused(age: str) -> None:
    out = runner.invoke(app, ["health", "--url", "http://127.0.0.1:1/metrics", "--max-age", age])
    assert out.exit_code == 2 and "--max-age" in out.output
