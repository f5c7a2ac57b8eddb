"""Every Prometheus metric of the worker (docs/design.md "Metrics"), defined once against an
injected registry: names, help texts, labels and buckets, each labelled series created at start.
``worker.metrics.ServiceMetrics`` updates them from the service's hooks and serves them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from worker.phases import DrainPhases

BATCH_BUCKETS = tuple(float(2**k) for k in range(0, 14))  # 1 .. 8192 rows
#: a Newton step's time: finer from 20 to 100 ms, where a step on a 2-vCPU machine sits and where
#: its slow tail decides a steady p99 of 100 ms (docs/operations.md "Where a drain's time goes")
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip
#: enqueue to certified removal: finer from 50 to 250 ms, so that a p99 near 100 ms reads within
#: about 10 ms (between 100 and 250 ms a p99 of 110 and one of 170 ms looked alike)
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
RETRAIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: every ``reason`` a retrain is counted under (core's ``retrain_reason`` values; ``extractor`` is a
#: full-pipeline retrain), pre-initialised so that each series exists from the start
RETRAIN_REASONS = ("max_removals", "budget", "numerical", "extractor")


#: outcomes of ``certremove_background_refactors_total`` (``worker.refactor``)
REFACTOR_OUTCOMES = ("installed", "dropped", "failed")


class MetricFamilies:
    """The worker's metrics (names in docs/design.md "Metrics"), registered on ``registry``.

    Args:
        registry: where to register; tests pass a fresh ``CollectorRegistry``.
        process: also register the ``process_*`` metrics (``ProcessCollector``).
    """

    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        self.registry = registry
        kw: dict[str, Any] = {"registry": registry}
        self.budget_limit = Gauge(
            "certremove_budget_limit", "Gradient-residual budget of this noise epoch", **kw
        )
        self.budget_used = Gauge(
            "certremove_budget_used", "Budget used (upper bound on the residual norm)", **kw
        )
        self.budget_used_ratio = Gauge(
            "certremove_budget_used_ratio", "budget_used / budget_limit", **kw
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
        #: registered on the first model with a DP feature extractor (absent without one), by
        #: ``ServiceMetrics.set_extractor_remaining``
        self.extractor_removals_remaining: Gauge | None = None
        self.epoch_removals = Gauge(
            "certremove_epoch_removals", "Training rows removed in the current noise epoch", **kw
        )
        self.epoch_max_removals = Gauge(
            "certremove_epoch_max_removals",
            "The noise epoch's resolved max_removals (+Inf without a count trigger)",
            **kw,
        )
        self.epoch_removals_ratio = Gauge(
            "certremove_epoch_removals_ratio",
            "epoch_removals / epoch_max_removals (0 without a count trigger)",
            **kw,
        )
        self.retrain_failures = Counter(
            "certremove_retrain_failures",
            "Retrains and background fits that failed",
            **kw,
        )
        self.last_retrain_timestamp = Gauge(
            "certremove_last_retrain_timestamp_seconds",
            "Wall time of the last completed retrain (0: none since the worker started)",
            **kw,
        )
        self.heartbeat_timestamp = Gauge(
            "certremove_heartbeat_timestamp_seconds",
            "Wall time the worker last proved it is serving (its event loop or a task ran)",
            **kw,
        )
        self.releases = Counter(
            "certremove_releases", "Releases of the model written to the release directory", **kw
        )
        self.release_failures = Counter(
            "certremove_release_failures",
            "Releases or their announcements (stream, statuses, receipts) that failed; each is "
            "tried again after the next batch or periodic check",
            **kw,
        )
        self.last_release_timestamp = Gauge(
            "certremove_last_release_timestamp_seconds",
            "Wall time of the last release (0: none since the worker started)",
            **kw,
        )
        self.unreleased_requests = Gauge(
            "certremove_unreleased_requests",
            "Applied requests whose removal is in no release yet (the served model still has "
            "their rows)",
            **kw,
        )
        self.build_info = Info(
            "certremove_build", "certremove version, torch version, device and model", **kw
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
        self.background_refactors = Counter(
            "certremove_background_refactors",
            "Preconditioners factored in the background for the Newton steps, by outcome "
            "(installed; dropped: the epoch moved on or a direct step refactored; failed)",
            ["outcome"],
            **kw,
        )
        self.phases = DrainPhases(**kw)
        for kind in ("redis", "disk", "other"):
            self.infrastructure_errors.labels(kind=kind)
        for method in ("newton", "retrain"):
            self.removals.labels(method=method)
        for outcome in ("applied", "rejected", "duplicate", "dead_letter"):
            self.requests.labels(outcome=outcome)
        for reason in RETRAIN_REASONS:
            self.retrains.labels(reason=reason)
        for outcome in REFACTOR_OUTCOMES:
            self.background_refactors.labels(outcome=outcome)
        if process:
            ProcessCollector(registry=registry)
