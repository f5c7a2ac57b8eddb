"""A Redis that stops answering without closing its connections (``CERTREMOVE_REDIS_TIMEOUT``).

A network partition, a half-open TCP connection after a failover or a paused server leaves the
worker's connections open and silent. Without socket timeouts (kombu sets none by default) a read
on them waits forever, and the worker never serves again, even once the network is back. The
real worker here talks to the test's Redis through :class:`HangProxy`: requests are applied, the
proxy blackholes every connection for a few seconds while more requests arrive, then heals (the
blackholed connections stay hung for good); every request must end ``applied`` exactly once and
the worker must still be running, having handled the timeouts as infrastructure faults.

The blackhole finds the worker idle, or in the middle of a drain (a slow test: ``-m slow``); the
second case needs the worker's transport to free the prefetch slot of an acknowledgement that
failed (``worker.transport.QoS``): with kombu's own the worker never drains again.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import core
from producer import Client, schema
from tests.integration.conftest import StartWorker
from tests.integration.fault_support import (
    HangProxy,
    check_invariants,
    send,
    statuses,
    wait_final,
)
from worker.app import create_app
from worker.lease import Lease
from worker.runtime import redis_client
from worker.settings import Settings

pytestmark = pytest.mark.integration

#: CERTREMOVE_REDIS_TIMEOUT of the test's worker (seconds)
TIMEOUT_S = 2.0
#: how long the proxy blackholes every connection
BLACKHOLE_S = 6.0
#: every request must be applied within this time of the heal (the mid-drain case recovers in
#: about 13 to 15 s)
BOUND_S = 90.0
MID_DRAIN_BOUND_S = 45.0
#: requests sent at once just before a mid-drain blackhole
BURST = 60


def test_the_timeout_reaches_every_redis_connection_of_the_worker() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", redis_timeout=3.0)
    client = redis_client(settings)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 3.0
        assert kwargs["socket_connect_timeout"] == 3.0
        assert kwargs["health_check_interval"] == 30
        # one try per command: a hung call fails after one timeout, not several
        assert client.connection_pool.make_connection().retry.get_retries() == 0
    finally:
        client.close()
    transport = create_app(settings).conf.broker_transport_options
    assert transport["socket_timeout"] == transport["socket_connect_timeout"] == 3.0
    assert transport["health_check_interval"] == 3.0  # kombu's check of its BRPOP connection


@pytest.fixture
def proxy(broker_url: str) -> Iterator[tuple[HangProxy, str]]:
    """A :class:`HangProxy` in front of the test's Redis and the broker URL through it (closed
    after the workers stop: ``start_worker_process`` is set up after it)."""
    hang, url = HangProxy.to(broker_url)
    yield hang, url
    hang.close()


def _ids(state: Path, count: int) -> list[int]:
    model = core.load_model(state, device="cpu")
    return [int(i) for i in model.ids[:count]]


def test_a_lease_renewal_that_meets_a_hung_connection_lands_before_the_lease_lapses(
    state: Path,
    model_name: str,
    proxy: tuple[HangProxy, str],
    rclient: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hang, via_proxy = proxy
    ttl_ms = 3000
    # the longest timeout the settings allow with this lease
    settings = Settings(
        broker_url=via_proxy, model=model_name, lease_ttl_ms=ttl_ms, redis_timeout=ttl_ms / 2000
    )
    client = redis_client(settings)
    lease = Lease(client, model_name, "w", state, ttl_ms=ttl_ms)
    lease.acquire()
    lease.start()
    key = schema.lease_key(model_name)
    try:
        with caplog.at_level(logging.WARNING, logger="certremove.worker"):
            hang.blackhole()
            hang.heal()  # the renewal thread's idle connection hangs for good; new ones answer
            deadline = time.monotonic() + 2 * ttl_ms / 1000
            while time.monotonic() < deadline:
                assert rclient.get(key) == str(lease.token).encode(), "the lease lapsed"
                time.sleep(0.05)
        assert "renewing the model lease failed: Timeout" in caplog.text
        assert hang.hung_links() == 0  # redis-py dropped the hung connection
    finally:
        lease.release()
        client.close()


@pytest.mark.parametrize(
    "caught",
    ["idle", pytest.param("mid_drain", marks=pytest.mark.slow)],
)
def test_a_redis_that_stops_answering_is_survived(
    caught: str,
    state: Path,
    broker_url: str,
    model_name: str,
    proxy: tuple[HangProxy, str],
    start_worker_process: StartWorker,
) -> None:
    """``idle``: the blackhole finds the worker waiting for work; ``mid_drain``: in the middle
    of a drain (a burst served one entry per step, in long slices)."""
    hang, via_proxy = proxy
    mid_drain = caught == "mid_drain"
    shape: dict[str, Any] = dict(max_batch=1, slice_seconds=10.0) if mid_drain else {}
    worker = start_worker_process(
        state, via_proxy, model_name, redis_timeout=TIMEOUT_S, drain_interval=1.0, **shape
    )
    ids = iter(_ids(state, 120))
    client = Client(broker_url, model=model_name)  # the producer reaches Redis directly
    sent: dict[str, list[Any]] = {}
    try:
        before = send(client, [[next(ids)] for _ in range(10)], sent)
        st = wait_final(client, before, timeout=30)
        assert all(s["status"] == schema.STATUS_APPLIED for s in st.values()), st
        if mid_drain:
            before += send(client, [[next(ids)] for _ in range(BURST)], sent)
            _wait_serving(client, before[-BURST:])

        hang.blackhole()
        t0 = time.monotonic()
        during: list[str] = []
        while time.monotonic() - t0 < BLACKHOLE_S:
            during += send(client, [[next(ids)], [next(ids)]], sent)
            time.sleep(0.5)
        hung = hang.hung_links()
        hang.heal()
        healed = time.monotonic()
        after = send(client, [[next(ids)] for _ in range(5)], sent)

        bound = MID_DRAIN_BOUND_S if mid_drain else BOUND_S
        st = wait_final(client, before + during + after, timeout=bound)
        took = time.monotonic() - healed
        log = worker.log_text()
        not_applied = {rid: s for rid, s in st.items() if s.get("status") != schema.STATUS_APPLIED}
        assert not not_applied, (
            f"{len(not_applied)} of {len(st)} requests not applied {bound:g} s after the "
            f"heal ({hung} connections were hung): {list(not_applied.items())[:3]}\n"
            f"--- worker log ---\n{log[-4000:]}"
        )
        assert worker.proc.poll() is None, f"the worker exited:\n{log[-4000:]}"
        # applied exactly once: each request and each sample id once in the ledger and the model
        check_invariants(client, state, sent, st=statuses(client, list(sent)))
        # The hangs ended as timeouts, each handled as an infrastructure fault: retried later,
        # nothing rejected; Celery took kombu's for a lost broker connection and reconnected.
        if mid_drain:
            handled = r"redis failure \(TimeoutError: .*nothing is rejected for it"
        else:
            handled = r"periodic drain check failed \(TimeoutError: "
        assert re.search(handled, log), log[-4000:]
        assert re.search(r"Connection to broker lost\..*TimeoutError", log), log[-4000:]
        print(f"{hung} connections hung; every request applied {took:.1f} s after the heal")
    finally:
        client.close()


def _wait_serving(client: Client, rids: list[str]) -> None:
    """Wait until the first of ``rids`` is applied (the drain serving them is under way)."""
    deadline = time.monotonic() + 30
    while not any(
        s.get("status") == schema.STATUS_APPLIED for s in statuses(client, rids).values()
    ):
        assert time.monotonic() < deadline, "the burst is not being served"
        time.sleep(0.02)
