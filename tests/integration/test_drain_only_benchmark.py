"""``benchmarks/loadtest.py --drain-only``: a real worker drains requests appended with no
doorbell, from one ring, and the figure counts from that ring."""

from __future__ import annotations

from pathlib import Path

from producer import Client, schema
from tests.benchmark_scripts import load_benchmark


def test_drain_only_counts_from_the_ring(
    state: Path, broker_url: str, model_name: str, start_worker_process
) -> None:
    bench = load_benchmark("loadtest")
    # the periodic check (30 s, the longest allowed) must not find the requests before the ring
    start_worker_process(state, broker_url, model_name, drain_interval=30.0)
    with Client(broker_url, model=model_name) as client:
        out = bench.drain_only(client, 200, timeout=60)
        stream = client.redis.xlen(schema.stream_key(model_name))
    assert out["requests"] == 200
    assert out["applied"] == 200 and out["not_applied"] == 0
    assert out["started_early"] is False  # nothing applied before the ring
    assert out["drain_seconds"] > 0 and out["throughput"] == 200 / out["drain_seconds"]
    assert 1 <= out["batches"] <= 200
    assert out["append_seconds"] > 0
    assert stream <= 200  # every request went through the stream (trimmed or not)
