"""Shared fixtures: a real Redis (the one on 127.0.0.1:6379 when it answers, else one started
here), one database number per test from a private range, and small trained models.

Tests never mock Redis or Celery (STYLE.md "Tests"); each flushes the database it used.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.embedded_redis import redis_answers, start_redis
from worker.launcher import free_port

# Databases 9-15 are this suite's (other suites may share the Redis on 6379).
_DBS = itertools.cycle(range(9, 16))


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    """``redis://host:port`` of a Redis that answers (without the database number)."""
    default = os.environ.get("CERTREMOVE_TEST_REDIS", "redis://127.0.0.1:6379")
    if redis_answers(f"{default}/0"):
        yield default
        return
    server = start_redis(port=free_port())
    try:
        yield server.url.rsplit("/", 1)[0]
    finally:
        server.stop()


@pytest.fixture
def broker_url(redis_base: str) -> Iterator[str]:
    """A Redis URL on a database of its own, flushed before and after the test."""
    url = f"{redis_base}/{next(_DBS)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def rclient(broker_url: str) -> Iterator[redis.Redis]:
    """A redis-py client (bytes replies) on the test's database."""
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


@pytest.fixture
def model_name() -> str:
    """A model name no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


def make_state(
    path: Path,
    *,
    n: int = 600,
    d: int = 8,
    max_removals: int | str | None = 1000,
    **kw: object,
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


@pytest.fixture(scope="session")
def small_state_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained small model (600 rows, max_removals 1000), trained once per session."""
    return make_state(tmp_path_factory.mktemp("template") / "state")
