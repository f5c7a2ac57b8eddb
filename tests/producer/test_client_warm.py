"""``Client.warm``: the Celery connection is set up before the first request, which then still
rings exactly once (real Redis)."""

from __future__ import annotations

import redis

from producer import Client, schema


def test_warm_sends_nothing_and_the_first_ring_still_sends_one_drain(
    broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    with Client(broker_url, model=model_name) as client:
        client.warm()
        assert client._celery is not None  # set up now, not at the first ring
        assert rclient.llen(schema.queue_name(model_name)) == 0
        assert rclient.get(schema.doorbell_key(model_name)) is None
        assert not rclient.exists(schema.stream_key(model_name))
        client.warm()  # again: harmless
        rids = client.enqueue_many([[1], [2]])
        assert rclient.llen(schema.queue_name(model_name)) == 1
        assert [s["status"] for s in client.statuses(rids).values()] == ["queued", "queued"]
