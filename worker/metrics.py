"""Every Prometheus metric (docs/design.md "Metrics"), defined once against an injected registry.

The endpoint that serves them is an **operator** endpoint: the budget gauges and the update and
latency timings depend on the secret noise draw (docs/design.md "Secrets and limits"), so it binds
to loopback by default and must never be published. No per-step residual or noise figure is
exported beyond the budget gauges listed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from producer import schema

if TYPE_CHECKING:
    from core.model import Model
    from worker.status import Answer

BATCH_BUCKETS = tuple(float(2**k) for k in range(0, 14))  # 1 .. 8192 rows
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RETRAIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class ServiceMetrics:
    """The worker's metrics (names in docs/design.md "Metrics"), registered on ``registry``.

    Args:
        registry: where to register; tests pass a fresh ``CollectorRegistry``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        kw: dict[str, Any] = {"registry": registry}
        self.budget_total = Gauge(
            "certremove_budget_total", "Gradient-residual budget of this noise epoch", **kw
        )
        self.budget_used = Gauge(
            "certremove_budget_used", "Budget used (upper bound on the residual norm)", **kw
        )
        self.budget_used_ratio = Gauge(
            "certremove_budget_used_ratio", "budget_used / budget_total", **kw
        )
        self.removals = Counter(
            "certremove_removals", "Training rows removed, by method", ["method"], **kw
        )
        self.requests = Counter(
            "certremove_requests",
            "Deletion requests answered, by outcome (applied, rejected, duplicate, dead_letter)",
            ["outcome"],
            **kw,
        )
        self.batch_size = Histogram(
            "certremove_batch_size", "Rows per committed Newton step", buckets=BATCH_BUCKETS, **kw
        )
        self.newton_update_seconds = Histogram(
            "certremove_newton_update_seconds",
            "Time of one batched Newton removal step",
            buckets=STEP_BUCKETS,
            **kw,
        )
        self.request_latency_seconds = Histogram(
            "certremove_request_latency_seconds",
            "Enqueue to certified removal (state persisted)",
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.retrains = Counter(
            "certremove_retrains", "Retrains from scratch, by reason", ["reason"], **kw
        )
        self.safety_retrains = Counter(
            "certremove_safety_retrains", "Retrains forced by the budget safety net", **kw
        )
        self.retrain_seconds = Histogram(
            "certremove_retrain_seconds", "Duration of a retrain", buckets=RETRAIN_BUCKETS, **kw
        )
        self.retrain_wait_seconds = Histogram(
            "certremove_retrain_wait_seconds",
            "Time removals waited at an epoch boundary for the background retrain to finish",
            buckets=STEP_BUCKETS,
            **kw,
        )
        self.retrain_in_progress = Gauge(
            "certremove_retrain_in_progress", "Retrains running (background fits included)", **kw
        )
        self.test_accuracy = Gauge(
            "certremove_test_accuracy", "Accuracy on the held-out split", **kw
        )
        self.model_version = Gauge("certremove_model_version", "Model version (retrains)", **kw)
        self.training_samples = Gauge(
            "certremove_training_samples", "Training rows still in the model", **kw
        )
        self.extractor_removals_remaining = Gauge(
            "certremove_extractor_removals_remaining",
            "Removals the DP feature extractor still allows (only with a DP extractor)",
            **kw,
        )
        self.infrastructure_errors = Counter(
            "certremove_infrastructure_errors",
            "Drains that failed on the disk, Redis or memory and were retried with backoff "
            "(no request is rejected for these), by kind",
            ["kind"],
            **kw,
        )
        self.infrastructure_backoff_seconds = Gauge(
            "certremove_infrastructure_backoff_seconds",
            "Current wait before the next retry after an infrastructure failure (0 when healthy)",
            **kw,
        )
        self.entry_failures = Counter(
            "certremove_entry_failures",
            "Processing failures an entry caused on its own (served alone); dead-lettered at "
            "CERTREMOVE_MAX_FAILURES",
            **kw,
        )
        self.stream_trimmed = Counter(
            "certremove_stream_trimmed_entries",
            "Acknowledged entries trimmed from the request stream (retention)",
            **kw,
        )
        for kind in ("redis", "disk", "other"):
            self.infrastructure_errors.labels(kind=kind)
        for method in ("newton", "retrain"):
            self.removals.labels(method=method)
        for outcome in ("applied", "rejected", "duplicate", "dead_letter"):
            self.requests.labels(outcome=outcome)
        for reason in ("max_removals", "budget", "numerical"):
            self.retrains.labels(reason=reason)

    def set_model_state(
        self,
        *,
        budget_total: float,
        budget_used: float,
        version: int,
        training_samples: int,
        accuracy: float | None = None,
    ) -> None:
        """Refresh the gauges that describe the current model."""
        self.budget_total.set(budget_total)
        self.budget_used.set(budget_used)
        self.budget_used_ratio.set(budget_used / budget_total if budget_total > 0 else 0.0)
        self.model_version.set(version)
        self.training_samples.set(training_samples)
        if accuracy is not None:
            self.test_accuracy.set(accuracy)

    def observe_model(self, model: Model) -> None:
        """Refresh the model gauges from a ``core`` model: budget, version, rows, test accuracy
        on ``model.dataset``'s held-out split, and the DP extractor's remaining allowance."""
        ds = model.dataset
        accuracy = None
        if ds is not None and len(ds.y_test) > 0:
            accuracy = float(model.accuracy(ds.X_test, ds.y_test))
        self.set_model_state(
            budget_total=model.budget_total,
            budget_used=model.budget_used,
            version=model.version,
            training_samples=model.n_alive,
            accuracy=accuracy,
        )
        remaining = model.extractor_removals_remaining
        if remaining is not None:
            self.extractor_removals_remaining.set(remaining)

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
        observe = self.request_latency_seconds.observe
        for a in answers:
            if a.only_if_queued:
                continue
            outcomes[a.status] = outcomes.get(a.status, 0) + 1
            if a.status == schema.STATUS_APPLIED and a.requested_at and a.applied_at:
                observe(max(0.0, a.applied_at - a.requested_at))
        for outcome, count in outcomes.items():
            self.requests.labels(outcome=outcome).inc(count)
        if repeats:
            self.requests.labels(outcome="duplicate").inc(repeats)

    def on_retrain(self, reason: str | None, seconds: float, rows: int = 0) -> None:
        """A retrain (``reason``; None: it did not run) took ``seconds`` and removed ``rows``."""
        if reason is not None:
            self.retrains.labels(reason=reason).inc()
            self.retrain_seconds.observe(seconds)
        if rows:
            self.removals.labels(method=schema.METHOD_RETRAIN).inc(rows)

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
