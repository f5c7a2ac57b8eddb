"""The histograms an operator reads a steady p99 from resolve it where the service works.

On a 2-vCPU machine at 5,000 requests/s a drain's cycle takes 30-70 ms, a Newton step 20-70 ms
and the p99 from enqueue to certified removal 60-300 ms (benchmarks/README.md). Prometheus reads a
quantile from the bucket counts by linear interpolation (``histogram_quantile``); with buckets at
50, 100 and 250 ms a p99 of 110 ms and one of 170 ms read alike. These tests feed latencies shaped
like the measured ones (one cycle's wait plus the batch's own cycle, a slow tail) through the
worker's real histograms, read the buckets back from the registry and interpolate as Prometheus
does, written here independently of the worker's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.benchmark_scripts import load_benchmark
from worker.metrics import ServiceMetrics


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` pairs (sorted, ``+Inf``
    last): the rank ``q * total`` found in its bucket, linearly between the bucket's bounds (the
    first bucket's lower bound is 0)."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower  # Prometheus returns the highest finite bound
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    raise AssertionError("unreachable: the +Inf bucket holds every observation")


def read_buckets(
    reg: CollectorRegistry, name: str, labels: dict[str, str] | None = None
) -> list[tuple[float, float]]:
    """The cumulative ``(le, count)`` pairs of histogram ``name`` from the registry."""
    out = []
    for family in reg.collect():
        for sample in family.samples:
            if sample.name != f"{name}_bucket":
                continue
            if any(sample.labels.get(k) != v for k, v in (labels or {}).items()):
                continue
            out.append((float(sample.labels["le"]), sample.value))
    assert out, f"no buckets for {name} {labels}"
    return sorted(out)


def steady_like(seed: int, scale: float) -> np.ndarray:
    """Latencies in seconds shaped like a saturated drain's: a uniform wait for the cycle in
    progress plus the batch's own cycle, with 5 % of the cycles two to three times slower."""
    rng = np.random.default_rng(seed)
    n = 20_000
    cycle = np.where(rng.random(n) < 0.05, rng.uniform(2.0, 3.0, n), 1.0) * scale
    return rng.uniform(0.0, 1.0, n) * cycle + cycle * rng.uniform(0.85, 1.0, n)


@pytest.mark.parametrize("scale", [0.03, 0.04, 0.055])
def test_request_latency_p99_reads_within_ten_percent(scale: float) -> None:
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    values = steady_like(1, scale)
    for v in values:
        metrics.request_latency_seconds.observe(float(v))
    true_p99 = float(np.quantile(values, 0.99))
    read = histogram_quantile(0.99, read_buckets(reg, "certremove_request_latency_seconds"))
    assert 0.06 < true_p99 < 0.25  # the range the test is about
    assert abs(read - true_p99) <= 0.1 * true_p99, (read, true_p99)


@pytest.mark.parametrize("median", [0.022, 0.028, 0.04])
def test_step_and_phase_p97_read_within_ten_percent(median: float) -> None:
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    rng = np.random.default_rng(2)
    steps = median * np.exp(rng.normal(0.0, 0.25, 5_000))  # 20-70 ms around the median
    for v in steps:
        metrics.newton_update_seconds.observe(float(v))
        metrics.phases.observe("step", float(v))
    true_p97 = float(np.quantile(steps, 0.97))
    for name, labels in (
        ("certremove_newton_update_seconds", None),
        ("certremove_drain_phase_seconds", {"phase": "step"}),
    ):
        read = histogram_quantile(0.97, read_buckets(reg, name, labels))
        assert abs(read - true_p97) <= 0.1 * true_p97, (name, read, true_p97)


def test_the_interpolation_is_prometheus() -> None:
    # 10 observations in (0, 1], 10 in (1, 2]: the median is the top of the first bucket, the
    # 75th percentile half-way into the second, and a rank in +Inf gives the top finite bound
    buckets = [(1.0, 10.0), (2.0, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == 1.0
    assert histogram_quantile(0.75, buckets) == 1.5
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 2.0)]) == 1.0


def test_the_load_test_reads_the_phase_p97_as_prometheus_does() -> None:
    """``benchmarks/loadtest.py`` prints each phase's p97 from the worker's buckets: it must read
    what Prometheus would (the oracle above), on the worker's real histogram."""
    bench = load_benchmark("loadtest")
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    for v in 0.028 * np.exp(np.random.default_rng(3).normal(0.0, 0.3, 2_000)):
        metrics.phases.observe("step", float(v))
    buckets = read_buckets(reg, "certremove_drain_phase_seconds", {"phase": "step"})
    for q in (0.5, 0.97, 0.999):
        assert bench.bucket_quantile(q, buckets) == pytest.approx(histogram_quantile(q, buckets))
    assert bench.bucket_quantile(0.97, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_the_load_test_counts_the_batches_of_a_phase_over_100_ms() -> None:
    """A stall (a persist whose fsyncs waited on the disk) shows in the load test's output as
    the batches of a phase that took more than 100 ms, read from the worker's real page."""
    bench = load_benchmark("loadtest")
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    for v in (0.004, 0.0099, 0.1, 0.1001, 0.3, 2.0):  # 0.1 is in the bucket le=0.1: not over
        metrics.phases.observe("persist", v)
    metrics.phases.observe("step", 0.02)
    phases = bench.phases_of(generate_latest(reg).decode())
    assert phases["persist"]["batches"] == 6 and phases["persist"]["over_100ms"] == 3
    assert phases["step"]["batches"] == 1 and phases["step"]["over_100ms"] == 0
    assert "batches over 100 ms: persist 3" in bench.phase_line(phases)
    assert "over 100 ms" not in bench.phase_line({"step": phases["step"]})


def test_the_load_test_probes_the_host_on_one_thread_and_gives_the_threads_back() -> None:
    """``host_probe`` times the step's float32 Hessian-vector product and a float64 pass (the
    figures that say how fast this machine is at a removal step) and leaves torch's thread
    count as it found it."""
    import torch  # noqa: PLC0415

    bench = load_benchmark("loadtest")
    before = torch.get_num_threads()
    probe = bench.host_probe(n=6_000, d=8, repeats=3)
    assert torch.get_num_threads() == before
    assert probe["shape"] == [6_000, 8]
    assert probe["hvp_layout"] in ("two_passes", "blocked", "blocked_numpy")
    for key in ("hvp_f32_ms", "pass_f64_ms"):
        assert math.isfinite(probe[key]) and probe[key] > 0
    assert "Hessian-vector product" in bench.probe_line(probe)
