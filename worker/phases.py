"""Where a drain's time goes: ``certremove_drain_phase_seconds{phase}``, one observation per
batch and phase, so that an operator (and the load test) can see which part of the drain loop
bounds the deletion latency without a profiler.

Phases, in the order a batch meets them (docs/operations.md "Where a drain's time goes"):

- ``read``: taking the next batch from the stream (the read-ahead's result and what arrived
  since; parsing the entries); a read that finds nothing (the end of a drain, an idle wake-up)
  is no batch and is not observed (a failed read is);
- ``plan``: the batch checked against the ledger and the model (repeats, unknown ids, rows);
- ``step``: the Newton step (``certremove_newton_update_seconds`` times the same call);
- ``persist``: the step's record in the step log (``core.steplog``), or a snapshot, with the
  batch's journal, durable;
- ``answer``: the ledger file, statuses and acknowledgements, dead letters, request metrics;
- ``epoch``: taking over the next noise epoch (the wait for its fit, the catch-up step and its
  snapshot), only in batches that reach an epoch's count;
- ``release``: the release policy after the batch (a release when due, announcements).

A batch's latency is about its own ``read`` + ``plan`` + ``step`` plus what the batch before it
still had to do when it arrived (its whole cycle at worst).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Histogram

#: the drain loop's phases, in order; then ``publish``, a batch's statuses and acknowledgements
#: on their own thread (``worker.publisher``), which overlaps the next batch's phases
PHASES = ("read", "plan", "step", "persist", "answer", "epoch", "release", "publish")
#: finer from 20 to 100 ms, where the step and the whole cycle sit on a 2-vCPU machine
PHASE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


class DrainPhases:
    """The ``certremove_drain_phase_seconds`` histogram, each phase's series created at start."""

    def __init__(self, **kw: Any) -> None:
        self.histogram = Histogram(
            "certremove_drain_phase_seconds",
            "Time of one phase of the drain loop for one batch (read, plan, step, persist, "
            "answer, epoch, release), and of its publication (publish: statuses and "
            "acknowledgements, on their own thread while the next batch is served)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            **kw,
        )
        self._series = {p: self.histogram.labels(phase=p) for p in PHASES}

    def observe(self, phase: str, seconds: float) -> None:
        """One batch spent ``seconds`` in ``phase`` (one of :data:`PHASES`)."""
        self._series[phase].observe(seconds)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Observe the time the block takes in ``phase`` (also when it raises: a failed phase
        took that long too)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._series[phase].observe(time.perf_counter() - start)
