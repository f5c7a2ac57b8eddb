from __future__ import annotations

import json

import pytest
import redis

from producer import Client, schema
from producer.client import redis_py_url


def test_enqueue_writes_queued_status_then_entry_and_rings(
    broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    with Client(broker_url, model=model_name) as client:
        rid = client.enqueue([3, "x"])
        st = client.status(rid)
        assert st["status"] == "queued" and st["requested_at"] > 0
        ((eid, fields),) = rclient.xrange(schema.stream_key(model_name))
        assert fields[b"request_id"].decode() == rid
        assert json.loads(fields[b"sample_ids"]) == [3, "x"]
        assert float(fields[b"requested_at"]) == st["requested_at"]
        # the doorbell is held and exactly one drain message was sent
        assert rclient.get(schema.doorbell_key(model_name)) == b"1"
        assert rclient.llen(schema.queue_name(model_name)) == 1
        client.enqueue([4])
        assert rclient.llen(schema.queue_name(model_name)) == 1


def test_enqueue_many_is_pipelined_and_ordered(
    broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    with Client(broker_url, model=model_name) as client:
        rids = client.enqueue_many([[i] for i in range(2500)])
        assert len(set(rids)) == 2500
        entries = rclient.xrange(schema.stream_key(model_name))
        assert [f[b"request_id"].decode() for _, f in entries] == rids
        assert all(s["status"] == "queued" for s in client.statuses(rids[:50]).values())


def test_repeated_request_id_keeps_a_final_status(
    broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    with Client(broker_url, model=model_name) as client:
        rclient.hset(schema.status_key(model_name, "r1"), mapping={"status": "applied"})
        assert client.enqueue([1], request_id="r1") == "r1"
        assert client.status("r1")["status"] == "applied"


def test_wait_times_out_with_queued_statuses(broker_url: str, model_name: str) -> None:
    with Client(broker_url, model=model_name) as client:
        rid = client.enqueue([1])
        out = client.wait([rid], timeout=0.2)
        assert out[rid]["status"] == "queued"
        assert client.status("nobody") == {}


def test_bad_arguments(broker_url: str, model_name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        Client(broker_url, model="no spaces")
    with Client(broker_url, model=model_name) as client, pytest.raises(TypeError):
        client.enqueue(5)  # type: ignore[arg-type]


def test_url_translation() -> None:
    assert redis_py_url("redis+socket:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redis_py_url("redis://h:1/2") == "redis://h:1/2"


def test_decode_status_types() -> None:
    raw = {
        b"status": b"applied",
        b"model_version": b"3",
        b"unknown_ids": b"[1]",
        b"applied_at": b"2.5",
    }
    assert schema.decode_status(raw) == {
        "status": "applied",
        "model_version": 3,
        "unknown_ids": [1],
        "applied_at": 2.5,
    }
