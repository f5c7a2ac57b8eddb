"""Observing many values of a Prometheus histogram at once (``worker.metrics``: the request
latencies of a batch's answers, thousands per Newton step)."""

from __future__ import annotations

import bisect
import math
from typing import Any

from prometheus_client import Histogram

__all__ = ["observe_many"]


def observe_many(histogram: Histogram, amounts: list[float]) -> None:
    """``histogram.observe(a)`` for each of ``amounts``, with one increment per bucket and one
    of the sum (a batch's answers are thousands of observations). Falls back to observing them
    one by one where prometheus-client's histogram is not laid out as expected."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total: Any = getattr(histogram, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(buckets) != len(bounds)
        or not hasattr(total, "inc")
        or any(not hasattr(b, "inc") for b in buckets)
        or (  # the parent of labelled children (observing it raises)
            bool(getattr(histogram, "_labelnames", None))
            and not getattr(histogram, "_labelvalues", None)
        )
    ):
        for amount in amounts:
            histogram.observe(amount)
        return
    if not amounts:
        return
    counts: dict[int, int] = {}
    for amount in amounts:
        if amount != amount:  # noqa: PLR0124 - NaN: in the sum, in no bucket (as observe does)
            continue
        i = bisect.bisect_left(bounds, amount)  # the first bucket with amount <= its bound
        counts[i] = counts.get(i, 0) + 1
    total.inc(math.fsum(amounts))
    for i, count in counts.items():
        buckets[i].inc(count)
