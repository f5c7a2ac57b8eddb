"""``certremove_drain_phase_seconds`` counts batches: a drain that finds nothing (an idle
wake-up, the read that ends a drain) is no batch, and must not dilute the ``read`` phase's mean
or inflate the batch count the load test prints (``worker/phases.py``: one observation per batch
and phase)."""

from __future__ import annotations

from pathlib import Path

import redis

from producer import Client
from tests.worker.test_service import build


def test_a_read_that_finds_no_batch_is_not_a_batch(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    service, _, reg = build(state, rclient, model_name)
    for _ in range(3):  # idle wake-ups: nothing waits
        assert service.drain().steps == 0
    count = reg.get_sample_value
    assert count("certremove_drain_phase_seconds_count", {"phase": "read"}) == 0
    Client(broker_url, model=model_name).enqueue_many([[i] for i in range(20)])
    assert service.drain().steps == 1
    steps = count("certremove_newton_update_seconds_count")
    assert steps == 1
    for phase in ("read", "plan", "step", "persist", "answer", "release"):
        assert count("certremove_drain_phase_seconds_count", {"phase": phase}) == steps, phase
