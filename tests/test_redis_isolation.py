"""The suite's Redis is its own: a private server by default, and, on a shared one, a cleanup that
deletes a test's keys and nothing else (tests/conftest.py explains the scheme)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from producer import Client
from tests.conftest import (
    EXTERNAL_VAR,
    KOMBU_SEP,
    NOWHERE,
    PIDBOX_BINDINGS,
    SessionRedis,
    delete_model_keys,
)


def test_the_session_redis_is_the_private_server_unless_configured(
    session_redis: SessionRedis, broker_url: str, rclient: redis.Redis
) -> None:
    if not session_redis.private:
        assert session_redis.url == os.environ[EXTERNAL_VAR]
        pytest.skip(f"{EXTERNAL_VAR} is set: the suite runs on that Redis and never flushes it")
    assert session_redis.server is not None
    assert urlsplit(broker_url).hostname == "127.0.0.1"
    assert urlsplit(broker_url).port not in (None, 6379)
    info = rclient.info("server")
    # the process that answers is the one this session started, in its temporary directory
    assert info["process_id"] == session_redis.server.process.pid
    assert (
        Path(str(rclient.config_get("dir")["dir"])).resolve()
        == session_redis.server.directory.resolve()
    )
    assert rclient.config_get("save")["save"] == ""
    assert rclient.config_get("appendonly")["appendonly"] == "no"


def test_the_broker_variable_leads_nowhere_during_the_session(model_name: str) -> None:
    """Code that falls back to $CERTREMOVE_BROKER_URL (or would fall back to 6379) fails."""
    assert os.environ["CERTREMOVE_BROKER_URL"] == NOWHERE
    with Client(model=model_name) as client, pytest.raises(redis.ConnectionError):
        client.redis.ping()


def _keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(count=1000))


def test_delete_model_keys_deletes_only_the_tests_keys(
    broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    other = f"u{uuid.uuid4().hex[:10]}"  # another test's model
    shorter = model_name[:-1]  # a name that is a prefix of the test's: not the test's
    # Real keys: enqueue writes the status, the stream, the doorbell, and kombu's queue and
    # bindings (the doorbell's drain message); the suffixed model is the test's too.
    for name, ids in ((model_name, [1]), (f"{model_name}b", [2]), (other, [3]), (shorter, [4])):
        with Client(broker_url, model=name) as client:
            client.enqueue(ids)
    unrelated = f"{other}:someone-else"
    rclient.set(unrelated, "keep me")
    # Entries in kombu's shared keys: a message left unacknowledged, a worker's pidbox binding.
    ours, theirs = f"{model_name}-tag", f"{other}-tag"
    for tag, queue in ((ours, f"certremove.{model_name}"), (theirs, f"certremove.{other}")):
        rclient.hset("unacked", tag, json.dumps([{"body": ""}, queue, queue]))
        rclient.zadd("unacked_index", {tag: 1.0})
    pidbox = {
        name: KOMBU_SEP * 2 + f"{name}@host.celery.pidbox".encode() for name in (model_name, other)
    }
    rclient.sadd(PIDBOX_BINDINGS, *pidbox.values())
    created = _keys(rclient)
    assert {k for k in created if model_name.encode() in k} >= {
        f"certremove:{model_name}:requests".encode(),
        f"certremove:{model_name}b:requests".encode(),
        f"certremove.{model_name}".encode(),
        f"_kombu.binding.certremove.{model_name}".encode(),
    }
    foreign = {k for k in created if model_name.encode() not in k}
    try:
        assert delete_model_keys(rclient, model_name) > 0
        left = _keys(rclient)
        assert not {k for k in left if model_name.encode() in k}
        assert foreign <= left  # other models', the unrelated key and kombu's shared keys
        assert rclient.get(unrelated) == b"keep me"
        assert ours.encode() not in rclient.hkeys("unacked")
        assert theirs.encode() in rclient.hkeys("unacked")
        assert rclient.zscore("unacked_index", ours) is None
        assert rclient.zscore("unacked_index", theirs) == 1.0
        assert pidbox[model_name] not in rclient.smembers(PIDBOX_BINDINGS)
        assert pidbox[other] in rclient.smembers(PIDBOX_BINDINGS)
    finally:  # on an external Redis the other names are this test's to remove too
        delete_model_keys(rclient, other)
        delete_model_keys(rclient, shorter)
        rclient.delete(unrelated)
