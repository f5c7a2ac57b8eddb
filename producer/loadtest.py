"""Load test the removal service: send N requests at a rate, wait, report latency percentiles.

Latency is enqueue to certified removal, read from each status hash (``applied_at`` written by the
worker after the new state was persisted, minus ``requested_at`` written by the producer), so the
polling cadence here does not bias it. Sample ids are consecutive integers from ``first_id``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from producer import schema
from producer.client import Client


@dataclass
class LoadtestResult:
    """What one load test measured (times in seconds)."""

    requests: int
    ids_per_request: int
    rate: float
    sent_seconds: float
    applied: int
    rejected: int
    not_applied: int
    throughput: float
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    latency_max: float | None
    by_method: dict[str, int] = field(default_factory=dict)
    retrains: int = 0
    #: rejected requests by reason (a load test of distinct known ids expects none)
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    #: p99 latency of the requests sent in each second of the run (where the tail comes from)
    latency_p99_by_second: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def send(
    client: Client,
    id_lists: list[list[int]],
    rate: float,
    on_sent: Callable[[int], None] | None = None,
) -> list[str]:
    """Send the requests at ``rate`` per second (0: as fast as possible); return request ids."""
    rids: list[str] = []
    start = time.perf_counter()
    chunk = 1000 if rate <= 0 else max(1, min(1000, int(rate / 100)))
    for i in range(0, len(id_lists), chunk):
        if rate > 0:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        part = client.enqueue_many(id_lists[i : i + chunk])
        rids += part
        if on_sent:
            on_sent(len(part))
    return rids


def collect(
    client: Client,
    rids: list[str],
    timeout: float,
    on_done: Callable[[int], None] | None = None,
    poll: float = 0.2,
) -> dict[str, dict[str, Any]]:
    """Poll until every request is final or ``timeout`` passes; return the statuses."""
    done: dict[str, dict[str, Any]] = {}
    pending = list(rids)
    deadline = time.monotonic() + timeout
    final = {schema.STATUS_APPLIED, schema.STATUS_REJECTED}
    while pending and time.monotonic() < deadline:
        still: list[str] = []
        # Requests finish roughly in order: stop scanning at the first mostly-unfinished chunk.
        for i in range(0, len(pending), 2000):
            part = pending[i : i + 2000]
            statuses = client.statuses(part)
            newly = [r for r in part if statuses[r].get("status") in final]
            for r in newly:
                done[r] = statuses[r]
            still += [r for r in part if statuses[r].get("status") not in final]
            if on_done and newly:
                on_done(len(newly))
            if len(newly) < len(part) // 2:
                still += pending[i + 2000 :]
                break
        pending = still
        if pending:
            time.sleep(poll)
    for r in pending:
        done[r] = client.status(r)
    return done


def summarize(
    statuses: dict[str, dict[str, Any]], ids_per_request: int, rate: float, sent_seconds: float
) -> LoadtestResult:
    """Throughput, latency percentiles, counts by method and retrains seen."""
    applied = [s for s in statuses.values() if s.get("status") == schema.STATUS_APPLIED]
    rejected = sum(1 for s in statuses.values() if s.get("status") == schema.STATUS_REJECTED)
    lat = sorted(
        s["applied_at"] - s["requested_at"]
        for s in applied
        if s.get("applied_at") is not None and s.get("requested_at") is not None
    )
    reasons: dict[str, int] = {}
    for s in statuses.values():
        if s.get("status") == schema.STATUS_REJECTED:
            reason = str(s.get("reason", "?"))
            reasons[reason] = reasons.get(reason, 0) + 1
    timed = [s for s in applied if s.get("applied_at") is not None and s.get("requested_at")]
    by_second: list[list[float]] = []
    if timed:
        first = min(s["requested_at"] for s in timed)
        for s in timed:
            k = int(s["requested_at"] - first)
            by_second.extend([] for _ in range(k + 1 - len(by_second)))
            by_second[k].append(s["applied_at"] - s["requested_at"])
    by_method: dict[str, int] = {}
    versions: list[int] = []
    for s in applied:
        method = str(s.get("method", "?"))
        by_method[method] = by_method.get(method, 0) + 1
        if isinstance(s.get("model_version"), int):
            versions.append(s["model_version"])
    throughput = 0.0
    if applied:
        span = max(s["applied_at"] for s in applied) - min(s["requested_at"] for s in applied)
        throughput = len(applied) / span if span > 0 else float("inf")
    return LoadtestResult(
        requests=len(statuses),
        ids_per_request=ids_per_request,
        rate=rate,
        sent_seconds=sent_seconds,
        applied=len(applied),
        rejected=rejected,
        not_applied=len(statuses) - len(applied),
        throughput=throughput,
        latency_p50=percentile(lat, 50),
        latency_p95=percentile(lat, 95),
        latency_p99=percentile(lat, 99),
        latency_max=lat[-1] if lat else None,
        by_method=by_method,
        # every retrain (folding requests or taking over in the background) is a new version
        retrains=max(versions) - min(versions) if versions else 0,
        rejected_reasons=reasons,
        latency_p99_by_second=[percentile(sorted(v), 99) for v in by_second],
    )


def run_loadtest(
    client: Client,
    *,
    requests: int,
    rate: float,
    ids_per_request: int = 1,
    first_id: int = 0,
    timeout: float = 300.0,
    on_sent: Callable[[int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> LoadtestResult:
    """Send ``requests`` requests of distinct consecutive ids, wait for them, summarise."""
    if requests < 1 or ids_per_request < 1:
        raise ValueError("requests and ids_per_request must be at least 1")
    id_lists = [
        list(range(first_id + i * ids_per_request, first_id + (i + 1) * ids_per_request))
        for i in range(requests)
    ]
    client.warm()  # the service is measured, not the producer's one-off connection set-up
    t0 = time.perf_counter()
    rids = send(client, id_lists, rate, on_sent)
    sent_seconds = time.perf_counter() - t0
    statuses = collect(client, rids, timeout, on_done)
    return summarize(statuses, ids_per_request, rate, sent_seconds)
