"""The service's new gauges and counters on a real core model and a real Redis (no Celery):
the epoch gauges, the last retrain, retrain failures, and the one-line rejection log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, schema
from tests.conftest import make_state
from tests.worker.test_service import build


def test_epoch_gauges_and_last_retrain_follow_the_model(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    service, _, reg = build(state, rclient, model_name, retrain_lead=0.5, max_batch=3)
    assert reg.get_sample_value("certremove_epoch_max_removals") == 10
    assert reg.get_sample_value("certremove_epoch_removals") == 0
    assert reg.get_sample_value("certremove_last_retrain_timestamp_seconds") == 0
    client.enqueue_many([[i] for i in range(4)])
    service.drain()
    assert reg.get_sample_value("certremove_epoch_removals") == 4
    assert reg.get_sample_value("certremove_epoch_removals_ratio") == 0.4
    client.enqueue_many([[i] for i in range(4, 16)])
    service.drain()  # crosses the count: the background fit takes over
    assert service.model.version >= 2
    assert reg.get_sample_value("certremove_epoch_removals") == service.model.removed_in_epoch
    assert reg.get_sample_value("certremove_last_retrain_timestamp_seconds") > 0
    assert reg.get_sample_value("certremove_retrain_failures_total") == 0


def test_a_failed_background_fit_is_counted_and_the_foreground_takes_over(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    service, sent, reg = build(state, rclient, model_name, retrain_lead=0.5, max_batch=3)

    def broken_fit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("fault injected into the background fit")

    service.model.prepare_retrain = broken_fit  # type: ignore[method-assign]
    rids = client.enqueue_many([[i] for i in range(12)])
    report = service.drain()
    assert report.retrain_requested and schema.TASK_RETRAIN in sent.names()
    assert reg.get_sample_value("certremove_retrain_failures_total") == 1
    service.retrain()  # the blocking retrain folds the rest
    st = client.statuses(rids)
    assert [s["status"] for s in st.values()] == ["applied"] * 12
    assert reg.get_sample_value("certremove_retrains_total", {"reason": "max_removals"}) == 1


def test_a_rejection_is_one_log_line_with_its_request_id_and_no_sample_ids(
    state: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = Client(broker_url, model=model_name)
    service, _, _ = build(state, rclient, model_name)
    rid = client.enqueue([987_654_321])
    rclient.xadd(schema.stream_key(model_name), {"sample_ids": "[424242]"})  # no request id
    with caplog.at_level(logging.INFO, logger="certremove.worker"):
        service.drain()
    assert client.status(rid)["status"] == "rejected"
    rejected = [r for r in caplog.records if getattr(r, "request_id", None) == rid]
    assert len(rejected) == 1 and rejected[0].reason == client.status(rid)["reason"]
    dead = [r for r in caplog.records if r.getMessage().startswith("dead-lettered entry")]
    assert (
        len(dead) == 1 and "(request none): malformed entry: no request_id" in dead[0].getMessage()
    )
    assert "987654321" not in caplog.text and "424242" not in caplog.text
