"""The state record (``certremove:{model}:state``, ``worker.state_marker``) written by the status
script with the acknowledgements of a drain's steps: it names every acknowledged snapshot, it
never goes back to an older one, and a snapshot persisted but not acknowledged does not hold a
restart of its own directory back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, schema
from tests.worker.test_service import build
from worker.lease import Lease
from worker.state_marker import StateBehindError, snapshot_seq


class Crash(Exception):
    pass


def record(rclient: redis.Redis, model_name: str) -> dict[str, str]:
    raw = rclient.hgetall(schema.state_marker_key(model_name))
    return {k.decode(): v.decode() for k, v in raw.items()}


def serve(state: Path, rclient: redis.Redis, model_name: str, lease: Lease, **kw: Any) -> Any:
    service, _, _ = build(state, rclient, model_name, lease=lease, **kw)
    service.ledger.fence = lease.fence_token
    return service


def served_once(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> tuple[Lease, Any, Client, str]:
    """A worker on ``state`` under a lease, after one drain that removed sample id 1."""
    lease = Lease(rclient, model_name, "w1", state, ttl_ms=5000)
    lease.acquire()
    service = serve(state, rclient, model_name, lease)
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([1])
    service.drain()
    return lease, service, client, rid


def test_each_acknowledged_snapshot_is_named_and_an_older_backup_is_refused(
    state: Path, tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    backup = Path(shutil.copytree(state, tmp_path / "backup"))
    lease = Lease(rclient, model_name, "w1", state, ttl_ms=5000)
    lease.acquire()
    service = serve(state, rclient, model_name, lease)
    client = Client(broker_url, model=model_name)
    for ids in ([1], [2, 3]):
        rid = client.enqueue(ids)
        service.drain()
        assert client.status(rid)["status"] == "applied"
        rec = record(rclient, model_name)
        # the snapshot holding the removal, acknowledged by the same script
        assert int(rec["seq"]) == snapshot_seq(state) > snapshot_seq(backup)
        assert rec["state_id"] == lease.state_id and rec["consumer"] == "w1"
    lease.release()
    # the backup (same directory id) lacks acknowledged removals: refused
    (backup / "state-id").write_text(lease.state_id + "\n")
    with pytest.raises(StateBehindError, match="behind"):
        Lease(rclient, model_name, "w2", backup, ttl_ms=5000).acquire(wait_s=0)


def test_a_snapshot_not_acknowledged_leaves_the_record_and_its_directory_restarts(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    lease, service, client, first = served_once(state, broker_url, rclient, model_name)
    acknowledged = int(record(rclient, model_name)["seq"])
    # the next batch is persisted, then the process dies before its status script runs
    second = client.enqueue([2])

    def die(answers: Any) -> None:
        raise Crash

    service.ledger.record = die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        service.drain()
    assert snapshot_seq(state) > acknowledged  # persisted ...
    assert int(record(rclient, model_name)["seq"]) == acknowledged  # ... not acknowledged
    assert client.status(second)["status"] == "queued"
    lease.release()
    # the same directory restarts (ahead of the record); the request is answered from the
    # snapshot's journal, and that script names the snapshot
    again = Lease(rclient, model_name, "w1", state, ttl_ms=5000)
    again.acquire(wait_s=0)
    restarted = serve(state, rclient, model_name, again)
    restarted.drain()
    assert client.status(first)["status"] == "applied"
    assert client.status(second)["status"] == "applied"
    assert int(record(rclient, model_name)["seq"]) == snapshot_seq(state)
    again.release()


def test_the_record_never_goes_back_to_an_older_snapshot(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    lease, service, client, _ = served_once(state, broker_url, rclient, model_name)
    seq = int(record(rclient, model_name)["seq"])
    # a later snapshot's record written at once (as a retrain's persist does); the next step's
    # script carries an older snapshot than that
    lease.mark_state(seq + 5)
    written = record(rclient, model_name)
    rid = client.enqueue([2])
    service.drain()
    assert client.status(rid)["status"] == "applied"
    assert service.served.mark_due == seq + 1
    assert record(rclient, model_name) == written
    lease.release()


def test_without_the_lease_token_in_the_status_script_the_persist_writes_the_record(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    lease = Lease(rclient, model_name, "w1", state, ttl_ms=5000)
    lease.acquire()
    service, _, _ = build(state, rclient, model_name, lease=lease)  # no ledger.fence
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([1])
    service.drain()
    assert client.status(rid)["status"] == "applied"
    assert int(record(rclient, model_name)["seq"]) == snapshot_seq(state)
    assert service.served.mark_due is None
    lease.release()
