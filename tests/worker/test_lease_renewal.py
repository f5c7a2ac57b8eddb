"""The lease's renewal thread when Redis is away: a failed renewal is tried again at once, then
at the usual pace (every ttl/3), never in a tight loop (worker/lease.py, ``Lease.start``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from worker.lease import Lease
from worker.runtime import redis_client
from worker.settings import Settings


def test_renewals_against_a_redis_that_is_away_do_not_spin(tmp_path: Path) -> None:
    # a closed port: every renewal fails at once (connection refused)
    settings = Settings(broker_url="redis://127.0.0.1:1/0", lease_ttl_ms=1500)
    client = redis_client(settings)
    lease = Lease(client, "m", "w", tmp_path, ttl_ms=1500)
    lease.token = 7  # as if acquired before Redis went away
    tries: list[float] = []
    real = lease.renew

    def renew() -> bool:
        tries.append(time.monotonic())
        return real()

    lease.renew = renew  # type: ignore[method-assign]
    start = time.monotonic()
    lease.start()
    time.sleep(2.2)
    elapsed = time.monotonic() - start
    seen = list(tries)  # the thread's tries (check() below tries once more)
    with pytest.raises(redis.ConnectionError):
        lease.check()  # Redis cannot tell: an infrastructure error to retry, not a lost lease
    lease.release()  # stops the thread (the release itself fails quietly)
    client.close()
    # every 0.5 s a try and its immediate retry: about 8 in 2.2 s, never hundreds
    assert 4 <= len(seen) <= 2 * (elapsed / 0.5 + 1), seen
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    # no two consecutive quick retries: after an immediate retry the thread waits ttl/3
    quick = [g < 0.25 for g in gaps]
    assert not any(a and b for a, b in zip(quick, quick[1:], strict=False)), gaps
