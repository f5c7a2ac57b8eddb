from __future__ import annotations

import json

from typer.testing import CliRunner

from producer.loadtest import percentile, summarize
from worker.cli import app

runner = CliRunner()


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([], 50) is None


def test_summarize_counts_methods_and_retrains() -> None:
    statuses = {
        "a": {
            "status": "applied",
            "method": "newton",
            "model_version": 1,
            "requested_at": 0.0,
            "applied_at": 0.1,
        },
        "b": {
            "status": "applied",
            "method": "retrain",
            "model_version": 2,
            "requested_at": 0.0,
            "applied_at": 1.0,
        },
        "c": {"status": "queued", "requested_at": 0.0},
    }
    r = summarize(statuses, 1, 0.0, 0.1)
    assert (r.applied, r.not_applied, r.retrains) == (2, 1, 1)
    assert r.by_method == {"newton": 1, "retrain": 1}
    assert r.throughput == 2.0


def test_enqueue_and_status_commands(broker_url: str, model_name: str) -> None:
    env = {"CERTREMOVE_BROKER_URL": broker_url, "CERTREMOVE_MODEL": model_name}
    out = runner.invoke(app, ["enqueue", "1", "abc", "--json"], env=env)
    assert out.exit_code == 0, out.output
    rid = json.loads(out.stdout)["request_id"]
    out = runner.invoke(app, ["status", rid, "--json"], env=env)
    assert out.exit_code == 0 and json.loads(out.stdout)["status"] == "queued"
    out = runner.invoke(app, ["status", "missing"], env=env)
    assert out.exit_code == 1 and "unknown request id" in out.output


def test_bad_input_exits_non_zero() -> None:
    out = runner.invoke(app, ["enqueue"])
    assert out.exit_code == 2
    out = runner.invoke(app, ["enqueue", "1", "--broker-url", "redis://127.0.0.1:1/0"])
    assert out.exit_code == 2 and "cannot reach Redis" in out.output
    out = runner.invoke(app, ["loadtest", "--requests", "0", "--rate", "1"])
    assert out.exit_code == 2
    out = runner.invoke(app, ["enqueue", "1", "--model", "bad name"])
    assert out.exit_code == 2


def test_retrains_seen_count_versions_also_without_retrain_statuses() -> None:
    """Background retrains answer every request ``method=newton``: versions tell the retrains."""
    statuses = {
        str(i): {
            "status": "applied",
            "method": "newton",
            "model_version": v,
            "requested_at": 0.0,
            "applied_at": 0.5,
        }
        for i, v in enumerate([1, 1, 2, 4])
    }
    assert summarize(statuses, 1, 0.0, 0.1).retrains == 3
