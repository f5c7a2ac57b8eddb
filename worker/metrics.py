"""The worker's Prometheus metrics (docs/design.md "Metrics"): how the service's hooks update
them, and the endpoint that serves them. The metrics themselves are defined once against an
injected registry in ``worker.metric_families``.

The endpoint that serves them is an **operator** endpoint: the budget gauges and the update and
latency timings depend on the secret noise draw (docs/design.md "Secrets and limits"), so it binds
to loopback by default and must never be published. No per-step residual or noise figure is
exported beyond the budget gauges listed here.

Besides the counters and gauges the service's hooks update, the registry carries

- ``certremove_build_info`` (version, torch, device, model) and the ``process_*`` metrics;
- ``certremove_heartbeat_timestamp_seconds``: set by :meth:`ServiceMetrics.beat`, which the worker
  calls from its event loop every few seconds and after each task, and from a thread while a
  blocking retrain runs (``worker.tasks``) or a drain waits at an epoch boundary for the
  background fit (``worker.epochs``), so it stops moving when the worker is wedged or gone
  (``certremove health`` reads it);
- the backlog gauges (``certremove_backlog_*``, ``certremove_dead_letters``), read from Redis at
  scrape time by :class:`worker.backlog_gauges.BacklogCollector` (``producer.backlog.read_backlog``); when Redis does
  not answer, the scrape goes on without them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from producer import schema
from worker.backlog_gauges import BacklogCollector
from worker.metric_families import MetricFamilies
from worker.observe import observe_many

if TYPE_CHECKING:
    import redis

    from core.model import Model
    from worker.status import Answer

log = logging.getLogger("certremove.worker")


class ServiceMetrics(MetricFamilies):
    """The worker's metrics (names in docs/design.md "Metrics"), registered on ``registry``.

    Args:
        registry: where to register; tests pass a fresh ``CollectorRegistry``.
        process: also register the ``process_*`` metrics (``ProcessCollector``).
        clock: wall-clock time (the heartbeat and the last retrain).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        process: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        super().__init__(registry, process=process)

    def set_model_state(
        self,
        *,
        budget_total: float,
        budget_used: float,
        version: int,
        training_samples: int,
        accuracy: float | None = None,
    ) -> None:
        """Refresh the gauges that describe the current model (``budget_total`` is core's name of
        the epoch's budget, exported as ``certremove_budget_limit``)."""
        self.budget_limit.set(budget_total)
        self.budget_used.set(budget_used)
        self.budget_used_ratio.set(budget_used / budget_total if budget_total > 0 else 0.0)
        self.model_version.set(version)
        self.training_samples.set(training_samples)
        if accuracy is not None:
            self.test_accuracy.set(accuracy)

    def observe_model(self, model: Model, *, accuracy: float | None = None) -> None:
        """Refresh the model gauges from a ``core`` model: budget, version, rows, the noise
        epoch's removals against its ``max_removals``, test accuracy (``accuracy``, else measured
        on ``model.dataset``'s held-out split), and the DP extractor's remaining allowance (only
        with one)."""
        ds = model.dataset
        if accuracy is None and ds is not None and len(ds.y_test) > 0:
            accuracy = float(model.accuracy(ds.X_test, ds.y_test))
        self.set_model_state(
            budget_total=model.budget_total,
            budget_used=model.budget_used,
            version=model.version,
            training_samples=model.n_alive,
            accuracy=accuracy,
        )
        self.set_epoch(int(model.removed_in_epoch), model.max_removals)
        remaining = model.extractor_removals_remaining
        if remaining is not None:
            self.set_extractor_remaining(int(remaining))

    def set_epoch(self, removed: int, max_removals: int | None) -> None:
        """The noise epoch's removals so far and its resolved ``max_removals`` (None: no count
        trigger, exported as +Inf with a ratio of 0)."""
        self.epoch_removals.set(removed)
        if max_removals is None:
            self.epoch_max_removals.set(math.inf)
            self.epoch_removals_ratio.set(0.0)
        else:
            self.epoch_max_removals.set(max_removals)
            self.epoch_removals_ratio.set(removed / max_removals if max_removals > 0 else 0.0)

    def set_extractor_remaining(self, remaining: int) -> None:
        """Rows the DP feature extractor still covers; registers the gauge on first use, so a
        model without a DP extractor never exports it."""
        if self.extractor_removals_remaining is None:
            self.extractor_removals_remaining = Gauge(
                "certremove_extractor_removals_remaining",
                "Removals the DP feature extractor still allows (only with a DP extractor)",
                registry=self.registry,
            )
        self.extractor_removals_remaining.set(remaining)

    def set_build_info(self, *, version: str, torch: str, device: str, model: str) -> None:
        """``certremove_build_info{version,torch,device,model} 1``."""
        self.build_info.info({"version": version, "torch": torch, "device": device, "model": model})

    def beat(self) -> None:
        """The worker proved it is serving now (``certremove_heartbeat_timestamp_seconds``)."""
        self.heartbeat_timestamp.set(self.clock())

    @contextmanager
    def beating(self, interval: float) -> Iterator[None]:
        """Beat every ``interval`` seconds from a thread while the block runs: a blocking retrain
        holds the event loop for its whole length (minutes on a large model) and is serving
        meanwhile; a health check must not have it restarted half-way."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                self.beat()

        thread = threading.Thread(target=run, name="certremove-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()  # no beat of the thread after the block
            self.beat()

    def watch_backlog(self, client: redis.Redis, model: str) -> BacklogCollector:
        """Export ``model``'s backlog, read with ``client`` at each scrape (see
        :class:`BacklogCollector`)."""
        collector = BacklogCollector(client, model, self.clock)
        self.registry.register(collector)
        return collector

    # ------------------------------------------------------------ hooks of the service
    def on_step(self, rows: int, seconds: float) -> None:
        """A Newton step removed ``rows`` rows in ``seconds`` (persisted; a catch-up step may
        remove none of the batch's)."""
        self.newton_update_seconds.observe(seconds)
        if rows:
            self.batch_size.observe(rows)
            self.removals.labels(method=schema.METHOD_NEWTON).inc(rows)

    def on_answers(self, answers: Iterable[Answer], *, repeats: int = 0, dead: int = 0) -> None:
        """Requests answered (their outcome; an ``applied`` one's enqueue-to-certified latency),
        ``repeats`` request ids answered before and ``dead`` entries dead-lettered."""
        if dead:
            self.requests.labels(outcome="dead_letter").inc(dead)
        outcomes: dict[str, int] = {}
        latencies: list[float] = []
        applied = schema.STATUS_APPLIED
        for a in answers:
            if a.only_if_queued:
                continue
            outcomes[a.status] = outcomes.get(a.status, 0) + 1
            if a.status == applied and a.requested_at and a.applied_at:
                latencies.append(max(0.0, a.applied_at - a.requested_at))
        observe_many(self.request_latency_seconds, latencies)
        for outcome, count in outcomes.items():
            self.requests.labels(outcome=outcome).inc(count)
        if repeats:
            self.requests.labels(outcome="duplicate").inc(repeats)

    def on_retrain(self, reason: str | None, seconds: float, rows: int = 0) -> None:
        """A retrain (``reason``; None: it did not run) took ``seconds`` and removed ``rows``."""
        if reason is not None:
            self.retrains.labels(reason=reason).inc()
            self.retrain_seconds.observe(seconds)
            self.last_retrain_timestamp.set(self.clock())
        if rows:
            self.removals.labels(method=schema.METHOD_RETRAIN).inc(rows)

    def on_retrain_failure(self) -> None:
        """A retrain or a background fit failed."""
        self.retrain_failures.inc()

    def on_release(self, released_at: float) -> None:
        """A release was written."""
        self.releases.inc()
        self.last_release_timestamp.set(released_at)

    def on_release_failure(self) -> None:
        """A release or its announcement failed (tried again later)."""
        self.release_failures.inc()

    def set_unreleased(self, requests: int) -> None:
        """``requests`` applied requests wait for a release that contains their removal."""
        self.unreleased_requests.set(requests)

    def on_background_refactor(self, outcome: str) -> None:
        """A preconditioner factored in the background was ``installed``, ``dropped`` (no
        longer applied) or ``failed`` (an error, or not factorable)."""
        self.background_refactors.labels(outcome=outcome).inc()

    def on_epoch_wait(self, seconds: float) -> None:
        """Removals waited ``seconds`` at an epoch boundary for the background fit."""
        self.retrain_wait_seconds.observe(seconds)

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """A retrain (background fit included) runs inside this block."""
        self.retrain_in_progress.inc()
        try:
            yield
        finally:
            self.retrain_in_progress.dec()

    def on_safety_retrains(self, fired: int) -> None:
        """The budget safety net fired ``fired`` more times."""
        if fired > 0:
            self.safety_retrains.inc(fired)

    def on_entry_failure(self) -> None:
        """An entry failed on its own (served alone)."""
        self.entry_failures.inc()

    def on_infrastructure_error(self, kind: str, backoff: float) -> None:
        """A drain failed on the disk, Redis or memory; the next try waits ``backoff`` s."""
        self.infrastructure_errors.labels(kind=kind).inc()
        self.infrastructure_backoff_seconds.set(backoff)

    def on_healthy(self) -> None:
        """Serving again after an infrastructure failure."""
        self.infrastructure_backoff_seconds.set(0.0)

    def on_trim(self, entries: int) -> None:
        """``entries`` acknowledged entries were trimmed from the stream."""
        if entries:
            self.stream_trimmed.inc(entries)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve the registry over HTTP in a daemon thread; return the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
