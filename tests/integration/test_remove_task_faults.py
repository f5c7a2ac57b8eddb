"""A ``certremove.remove`` task whose append meets a Redis fault must not lose its request.

The task appends its request to the stream (``producer.client.append_requests``). When a pooled
connection of the worker's redis-py client is half-open (a failover, a partition that healed for
new connections only), the append never reaches Redis; ``CERTREMOVE_REDIS_TIMEOUT`` turns what
was a hang into a ``TimeoutError``. Celery acknowledges a task that failed (late acks
acknowledge failures), on its own connection, which works: unless the task leaves its message
for another try, the request is gone (no stream entry, no status, nothing to replay). Here a
real worker process talks to Redis through a proxy that swallows, once, the connection that
carries the append; its Celery connection is left alone.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import core
from producer import Client, routing, schema
from tests.integration.conftest import StartWorker
from tests.integration.fault_support import HangProxy, _Link

pytestmark = pytest.mark.integration


class SwallowOnce(HangProxy):
    """A :class:`HangProxy` that hangs the first connection whose client sends ``pattern``
    (that send is swallowed too); every other connection forwards."""

    def __init__(self, upstream: tuple[str, int] | str, pattern: bytes) -> None:
        self.pattern = pattern
        self.swallowed = 0
        super().__init__(upstream)

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        while not link.closed:
            try:
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(65536)
            except (OSError, ValueError):
                break
            if not data:
                break
            if src is link.client and self.pattern in data and not self.swallowed:
                self.swallowed += 1
                link.hung = True
            if link.hung:
                continue
            try:
                dst.sendall(data)
            except OSError:
                break
        link.close()


def test_a_remove_task_whose_append_times_out_is_not_lost(
    state: Path,
    broker_url: str,
    model_name: str,
    rclient: redis.Redis,
    start_worker_process: StartWorker,
) -> None:
    assert broker_url.startswith("redis://"), "plain redis:// only"
    parts = broker_url.split("//", 1)[1].split("/", 1)
    host, port = parts[0].rsplit(":", 1)
    proxy = SwallowOnce((host, int(port)), b"status:during")
    via_proxy = f"redis://127.0.0.1:{proxy.port}/{parts[1]}"
    worker = start_worker_process(
        state, via_proxy, model_name, redis_timeout=2.0, drain_interval=1.0, max_backoff=1.0
    )
    ids = [int(i) for i in core.load_model(state, device="cpu").ids[:2]]
    app = Celery("sender", broker=broker_url, set_as_current=False)
    app.conf.update(routing.celery_config(model_name))
    client = Client(broker_url, model=model_name)
    try:
        app.send_task(schema.TASK_REMOVE, kwargs={"request_id": "warm", "sample_ids": [ids[0]]})
        _wait_applied(client, "warm", 60, worker.log_text)
        app.send_task(schema.TASK_REMOVE, kwargs={"request_id": "during", "sample_ids": [ids[1]]})
        deadline = time.monotonic() + 30
        while not proxy.swallowed:
            assert time.monotonic() < deadline, worker.log_text()[-3000:]
            time.sleep(0.1)
        _wait_applied(client, "during", 45, worker.log_text)
        log = worker.log_text()
        assert "appending request during failed (TimeoutError" in log, log[-3000:]
        assert worker.proc.poll() is None
        # the swallowed append never reached Redis: the request is in the stream once
        entries: Any = rclient.xrange(schema.stream_key(model_name))
        assert [f[b"request_id"] for _, f in entries].count(b"during") == 1
    finally:
        client.close()
        app.close()
        worker.stop()
        proxy.close()


def _wait_applied(client: Client, rid: str, timeout: float, log: object) -> None:
    deadline = time.monotonic() + timeout
    while client.status(rid).get("status") != schema.STATUS_APPLIED:
        assert time.monotonic() < deadline, (
            f"request {rid!r} not applied: {client.status(rid)}\n{log()[-4000:]}"  # type: ignore[operator]
        )
        time.sleep(0.2)
