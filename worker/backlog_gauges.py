"""The backlog gauges of one model (``certremove_backlog_*``, ``certremove_dead_letters``), read
from Redis at each scrape with ``producer.backlog.read_backlog``; registered on the worker's
registry by :meth:`worker.metrics.ServiceMetrics.watch_backlog`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.backlog import read_backlog

if TYPE_CHECKING:
    import redis

log = logging.getLogger("certremove.worker")


#: (metric name, help, ``Backlog`` attribute) of the backlog gauges
_BACKLOG = (
    ("certremove_backlog_stream_length", "Entries in the request stream", "stream_length"),
    (
        "certremove_backlog_undelivered",
        "Requests in the stream no worker has read yet",
        "undelivered",
    ),
    (
        "certremove_backlog_pending",
        "Requests delivered to a worker and not yet acknowledged",
        "pending",
    ),
    (
        "certremove_backlog_oldest_age_seconds",
        "Seconds since the oldest waiting request was enqueued (0 when none waits)",
        "oldest_age_seconds",
    ),
    ("certremove_dead_letters", "Entries in the dead-letter stream", "dead_letters"),
)


class BacklogCollector(Collector):
    """The backlog gauges of one model, read from Redis at each scrape with
    ``producer.backlog.read_backlog`` (a few O(1)/O(log n) commands).

    Args:
        client: a redis-py client of its own, with short socket timeouts (a scrape must not hang
            on Redis).
        model: the model name.
        clock: wall-clock time (the oldest request's age).

    When Redis does not answer, the scrape goes on without these samples (logged at DEBUG).
    """

    def __init__(
        self, client: redis.Redis, model: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.client, self.model, self.clock = client, model, clock

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (so registering never talks to Redis)."""
        return [GaugeMetricFamily(name, doc) for name, doc, _ in _BACKLOG]

    def collect(self) -> Iterable[Metric]:
        try:
            backlog = read_backlog(self.client, self.model, self.clock())
        except Exception as exc:  # noqa: BLE001 - never fail the scrape for the backlog
            log.debug("backlog metrics left out of this scrape: %s: %s", type(exc).__name__, exc)
            return []
        return [
            GaugeMetricFamily(name, doc, value=float(getattr(backlog, attr)))
            for name, doc, attr in _BACKLOG
        ]
