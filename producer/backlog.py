"""The real backlog of a model, read from its Redis Stream (not from Celery's queue).

Celery's queue holds at most a doorbell or two per model (``certremove.drain``): the requests
themselves wait in the stream ``certremove:{model}:requests``. What waits there is

- **undelivered**: entries after the consumer group's ``last-delivered-id`` (nobody read them yet;
  all of the stream when no worker ever created the group);
- **pending**: entries delivered to a worker and not yet acknowledged (being served, or held by a
  worker that died and will be claimed back);

and the **oldest waiting** request is the older of the first undelivered entry and the oldest
pending one (a stream id starts with the enqueue time in milliseconds). ``stream_length`` also
counts acknowledged entries that retention has not trimmed yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis

from producer import schema


@dataclass(frozen=True)
class Backlog:
    """What waits for a model's worker (see the module docstring)."""

    stream_length: int
    undelivered: int
    pending: int
    #: seconds since the oldest waiting request was enqueued (0 when nothing waits)
    oldest_age_seconds: float
    dead_letters: int

    @property
    def waiting(self) -> int:
        """Requests not yet answered: undelivered + pending."""
        return self.undelivered + self.pending

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``waiting`` included)."""
        return {**asdict(self), "waiting": self.waiting}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def read_backlog(client: redis.Redis, model: str, now: float) -> Backlog:
    """Read the backlog of ``model`` at wall-clock time ``now`` (seconds). A few O(1)/O(log n)
    commands (``XLEN``, ``XINFO GROUPS``, ``XPENDING`` summary, one ``XRANGE ... COUNT 1``);
    raises ``redis.RedisError`` when Redis does not answer."""
    key = schema.stream_key(model)
    group = schema.group_name(model)
    length = int(client.xlen(key))
    dead = int(client.xlen(schema.dead_letter_key(model)))
    # The group is read even for an empty stream: trimming (XTRIM) can delete entries that were
    # delivered and not acknowledged yet; they stay pending (the worker claims and answers them).
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:  # no stream (or not a stream): nothing was ever delivered
        groups = []
    info = next((g for g in groups if _text(g["name"]) == group), None)
    if info is None:  # no worker created the group yet: every entry is undelivered
        first = client.xrange(key, "-", "+", count=1) if length else []
        oldest = _id_ms(first[0][0]) if first else None
        age = 0.0 if oldest is None else max(0.0, now - oldest / 1000.0)
        return Backlog(length, length, 0, age, dead)
    pending = int(info.get("pending") or 0)
    last = _text(info.get("last-delivered-id") or "0-0")
    nxt = client.xrange(key, f"({last}", "+", count=1)
    lag = info.get("lag")
    if lag is None:  # Redis < 7 or an unknown lag (entries deleted): count what follows
        undelivered = len(client.xrange(key, f"({last}", "+") or []) if nxt else 0
    else:
        undelivered = int(lag)
    candidates: list[int] = []
    if nxt:
        candidates.append(_id_ms(nxt[0][0]))
    if pending:
        summary = client.xpending(key, group)
        if summary.get("min"):
            candidates.append(_id_ms(summary["min"]))
    age = max(0.0, now - min(candidates) / 1000.0) if candidates else 0.0
    return Backlog(length, undelivered, pending, age, dead)
