"""Faults that are not the requests' own never reject or lose them; an entry that fails on its
own is isolated; the ledger keeps the permanent answer (real core model, real Redis, no Celery).
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core
from producer import Client, schema
from producer.deadletters import list_dead_letters, replay_dead_letters
from tests.worker.test_service import build
from worker.lease import Lease, LeaseHeldError
from worker.ledger import Answer, Ledger, read_records, removed_sample_ids
from worker.state_marker import StateBehindError


class Crash(BaseException):
    """Stands for the process dying: nothing in the service catches a BaseException."""


def test_a_crash_between_persist_and_ledger_is_answered_with_method_and_version(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[1, 2], [3]])
    service, _, _ = build(state, rclient, model_name)
    version = service.model.version

    def die(answers: Any) -> None:
        raise Crash

    service.ledger.record = die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        service.drain()
    assert {s["status"] for s in client.statuses(rids).values()} == {"queued"}
    # the restarted worker: the persisted snapshot holds the removal and its journal
    again, _, _ = build(state, rclient, model_name, consumer="w1")
    again.drain()
    st = client.statuses(rids)
    for rid in rids:
        assert st[rid]["status"] == "applied"
        assert st[rid]["method"] == "newton" and st[rid]["model_version"] == version
        assert st[rid]["already_removed_ids"] == []
    assert sorted(removed_sample_ids(state)) == [1, 2, 3]
    assert not again.model.alive[[1, 2, 3]].any()


def test_a_full_disk_is_retried_and_rejects_nothing(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(10, 20)])
    waits: list[float] = []
    service, sent, reg = build(state, rclient, model_name, sleep=waits.append, max_backoff=4.0)
    save = service.model.save
    full = {"left": 4}

    def flaky_save(*args: Any, **kw: Any) -> Any:
        if full["left"]:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kw)

    for _ in range(4):
        service.model.save = flaky_save  # a reload after the failure brings a fresh model
        report = service.drain()
        assert report.infrastructure_error and "No space" in report.infrastructure_error
        assert {s["status"] for s in client.statuses(rids).values()} == {"queued"}
    assert waits == [0.5, 1.0, 2.0, 4.0]  # exponential backoff, capped
    assert reg.get_sample_value("certremove_infrastructure_errors_total", {"kind": "disk"}) == 4
    assert reg.get_sample_value("certremove_infrastructure_backoff_seconds") == 4.0
    assert sent.names().count(schema.TASK_DRAIN) >= 4  # each failure queued its retry
    service.drain()
    st = client.statuses(rids)
    assert {s["status"] for s in st.values()} == {"applied"}
    assert reg.get_sample_value("certremove_infrastructure_backoff_seconds") == 0.0
    assert not rclient.xrange(schema.dead_letter_key(model_name))
    assert core.load_model(state, device="cpu").n_alive == service.model.n_alive


def test_a_ledger_write_failure_after_the_persist_keeps_the_method(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([5])
    service, _, _ = build(state, rclient, model_name, sleep=lambda s: None)
    append = service.ledger._append
    calls = {"n": 0}

    def flaky(text: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EROFS, "Read-only file system")
        append(text)

    service.ledger._append = flaky  # type: ignore[method-assign]
    assert service.drain().infrastructure_error
    assert client.status(rid)["status"] == "queued"
    service.drain()
    st = client.status(rid)
    assert st["status"] == "applied" and st["method"] == "newton"
    assert st["already_removed_ids"] == []


def test_a_replayed_answer_keeps_unknown_and_already_removed_ids(
    broker_url: str, rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger(rclient, model_name, path).record(
        [
            Answer("a", "applied", "newton", 2, [99], [7], applied_at=1.0, removed_ids=[8]),
            Answer("b", "applied", "newton", 2, applied_at=1.0, removed_ids=[9, 10]),
        ]
    )
    again = Ledger(rclient, model_name, path)
    seen = again.seen("a")
    assert seen is not None and (seen.unknown_ids, seen.already_removed_ids) == ([99], [7])
    assert again.seen("b").already_removed_ids == []  # type: ignore[union-attr]
    assert removed_sample_ids(tmp_path) == [8, 9, 10]


def test_the_ledger_rotates_into_segments_that_are_kept(
    rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(rclient, model_name, path, rotate_bytes=300)
    for i in range(20):
        ledger.record(
            [Answer(f"r{i}", "applied", "newton", 1, applied_at=float(i), removed_ids=[i])]
        )
    segments = sorted(tmp_path.glob("ledger-*.jsonl.gz"))
    assert len(segments) >= 3
    assert removed_sample_ids(tmp_path) == list(range(20))
    again = Ledger(rclient, model_name, path)
    assert len(again) == 20 and again.seen("r0") is not None
    assert [r["ids"] for r in read_records(tmp_path)] == [[f"r{i}"] for i in range(20)]


def test_a_damaged_ledger_line_is_refused_by_name(
    rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger(rclient, model_name, path).record([Answer("a", "applied", "newton", 1, applied_at=1.0)])
    with open(path, "a") as f:
        f.write('{"s": "applied", "ids": ["torn')  # a crash mid-append: cut, not refused
    Ledger(rclient, model_name, path)
    with open(path, "a") as f:
        f.write("{garbage\n" + json.dumps({"s": "applied", "ids": ["b"]}) + "\n")
    from worker.ledger import LedgerDamagedError

    with pytest.raises(LedgerDamagedError, match=r"ledger.jsonl: line 2 is damaged"):
        Ledger(rclient, model_name, path)


def test_statuses_expire_and_the_ledger_still_answers_a_repeat(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([4])
    service, _, _ = build(state, rclient, model_name)
    service.ledger.status_ttl = 100
    service.drain()
    assert 0 < rclient.ttl(schema.status_key(model_name, rid)) <= 100
    rclient.delete(schema.status_key(model_name, rid))  # expired
    client.enqueue([4], request_id=rid)
    service.drain()
    st = client.status(rid)
    assert st["status"] == "applied" and st["method"] == "newton"


def test_the_stream_is_trimmed_but_never_of_unacknowledged_entries(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    from worker.stream import RequestStream

    client = Client(broker_url, model=model_name)
    key = schema.stream_key(model_name)
    first = client.enqueue_many([[i] for i in range(30, 40)])
    service, _, reg = build(state, rclient, model_name, stream_retention=0)
    service.stream.claim_idle_ms = 10**9  # never claim the other consumer's entry here
    service.drain()
    assert {s["status"] for s in client.statuses(first).values()} == {"applied"}
    assert rclient.xlen(key) == 1  # acknowledged entries went; the last delivered one stays
    held_rid = client.enqueue([40])
    held = RequestStream(rclient, model_name, "gone").read_new(1)  # pending elsewhere
    later = client.enqueue_many([[41], [42]])
    service._trimmed_at = 0.0
    service.drain()
    ids = [fields[b"request_id"].decode() for _, fields in rclient.xrange(key)]
    assert held and ids[0] == held_rid  # nothing from the pending entry on is trimmed
    assert set(later) <= set(ids) or rclient.xlen(key) >= 1
    assert {s["status"] for s in client.statuses(later).values()} == {"applied"}
    assert client.status(held_rid)["status"] == "queued"
    assert reg.get_sample_value("certremove_stream_trimmed_entries_total") == 10
    # a retention window keeps recent acknowledged entries
    service.stream_retention, service._trimmed_at = 3600, 0.0
    service.drain()
    assert rclient.xlen(key) == 3


ENTRY_FIELDS = st.dictionaries(
    st.sampled_from([b"request_id", b"sample_ids", b"requested_at", b"replay_of", b"x", b"\xff"]),
    st.one_of(
        st.binary(max_size=40),
        st.text(max_size=20).map(str.encode),
        st.lists(
            st.one_of(st.integers(-5, 10**20), st.text(max_size=5), st.booleans(), st.none()),
            max_size=5,
        ).map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"nan", b"inf", b"1e400", b"[1]", b"[]", b"{}", b"null", b"[[1]]"]),
    ),
    max_size=6,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=st.lists(ENTRY_FIELDS, min_size=1, max_size=6), wrongtype=st.booleans())
def test_random_entries_always_end_final_and_valid_requests_flow(
    state: Path,
    broker_url: str,
    rclient: redis.Redis,
    entries: list[dict[bytes, bytes]],
    wrongtype: bool,
) -> None:
    model_name = f"h{time.monotonic_ns()}"
    client = Client(broker_url, model=model_name)
    key = schema.stream_key(model_name)
    for fields in entries:
        if not fields:
            fields = {b"x": b""}
        rid = fields.get(b"request_id")
        if wrongtype and rid:  # a status key of another Redis type around the entry
            rclient.rpush(schema.status_key(model_name, rid.decode("utf-8", "replace")), "x")
        rclient.xadd(key, fields)
    valid = client.enqueue_many([[i] for i in range(200, 204)])
    service, _, _ = build(state, rclient, model_name, max_failures=2)
    for _ in range(12):
        service.drain()
        if not service.stream.pending_count() and not service.stream.has_undelivered():
            break
    assert service.stream.pending_count() == 0 and not service.stream.has_undelivered()
    assert {s["status"] for s in client.statuses(valid).values()} == {"applied"}
    dead = {d.entry_id for d in list_dead_letters(rclient, model_name)}
    for eid, fields in rclient.xrange(key):
        rid = fields.get(b"request_id")
        if eid.decode() in dead:
            continue
        assert rid, f"entry {eid!r} without a request id is not in the dead-letter stream"
        status = rclient.hget(
            schema.status_key(model_name, rid.decode("utf-8", "replace")), "status"
        )
        assert status in (b"applied", b"rejected"), (fields, status)
    service.close()


def test_a_dead_letter_replayed_after_the_fault_is_fixed_is_applied(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([6])
    key = schema.status_key(model_name, rid)
    rclient.delete(key)
    rclient.set(key, "a string, not a hash")
    service, _, _ = build(state, rclient, model_name, max_failures=1)
    service.drain()
    [letter] = list_dead_letters(rclient, model_name)
    assert letter.request_id == rid and "WRONGTYPE" in letter.reason
    rclient.delete(key)  # the operator fixed it
    queued, refused = replay_dead_letters(rclient, model_name, [letter.id])
    assert queued == [rid] and not refused
    assert client.status(rid)["status"] == "queued"
    service.drain()
    st = client.status(rid)
    assert st["status"] == "applied" and st["method"] == "newton"
    assert not list_dead_letters(rclient, model_name)
    assert replay_dead_letters(rclient, model_name, [letter.id])[1]  # gone: refused
    assert sorted(removed_sample_ids(state)) == [6]


def test_a_second_owner_is_refused_and_a_stale_one_is_fenced(
    state: Path, tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    other = Path(shutil.copytree(state, tmp_path / "other"))
    (other / "state-id").unlink(missing_ok=True)
    a = Lease(rclient, model_name, "a", state, ttl_ms=1000)
    a.acquire()
    b = Lease(rclient, model_name, "b", other, ttl_ms=1000)
    with pytest.raises(LeaseHeldError, match="already served by consumer 'a'"):
        b.acquire(wait_s=0)
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([11])
    service, _, _ = build(state, rclient, model_name, lease=a, sleep=lambda s: None)
    service.ledger.fence = a.fence_token
    service.drain()
    assert client.status(rid)["status"] == "applied"
    # a pauses past its ttl; c (same state directory, elsewhere) takes the model over
    time.sleep(1.2)
    c = Lease(rclient, model_name, "c", state, ttl_ms=1000)
    c.state_id = a.state_id
    c.acquire(wait_s=0)
    later = client.enqueue([12])
    fatal: list[BaseException] = []
    service._on_fatal = fatal.append
    with pytest.raises(Exception, match="lease"):
        service.drain()
    assert fatal and client.status(later)["status"] == "queued"  # a wrote nothing
    c.release()
    # the other state directory is behind the model's history: refused even with no lease
    time.sleep(1.2)
    with pytest.raises(StateBehindError, match="another state directory"):
        Lease(rclient, model_name, "b", other, ttl_ms=1000).acquire(wait_s=0)


def test_one_poison_entry_in_a_large_batch_costs_a_few_steps_not_one_per_entry(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(100, 164)])
    poison = rids[37]
    rclient.delete(schema.status_key(model_name, poison))
    rclient.sadd(schema.status_key(model_name, poison), "a set, not a hash")
    service, _, reg = build(state, rclient, model_name, max_failures=2)
    save = service.model.save
    saves = {"n": 0}

    def counting(*args: Any, **kw: Any) -> Any:
        saves["n"] += 1
        return save(*args, **kw)

    service.model.save = counting  # type: ignore[method-assign]
    for _ in range(4):
        service.drain()
    others = [r for r in rids if r != poison]
    assert {s["status"] for s in client.statuses(others).values()} == {"applied"}
    assert saves["n"] <= 16  # bisection: about log2(64) steps per failure, not 64
    [letter] = list_dead_letters(rclient, model_name)
    assert letter.request_id == poison
    assert reg.get_sample_value("certremove_entry_failures_total") == 2
    assert service.stream.pending_count() == 0
    assert not service.model.alive[100:164].any()


def test_a_lease_that_lapsed_while_redis_was_away_is_taken_again_if_nobody_took_it(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    lease = Lease(rclient, model_name, "w1", state, ttl_ms=5000)
    lease.acquire()
    client = Client(broker_url, model=model_name)
    service, _, _ = build(state, rclient, model_name, lease=lease, sleep=lambda s: None)
    service.ledger.fence = lease.fence_token
    rclient.delete(schema.lease_key(model_name))  # expired during an outage
    first = client.enqueue([21])
    service.drain()  # the status script takes it again: nobody else did
    assert client.status(first)["status"] == "applied"
    assert int(rclient.get(schema.lease_key(model_name))) == lease.token
    rclient.delete(schema.lease_key(model_name))
    rclient.incr(schema.lease_counter_key(model_name))  # another worker took a token since
    later = client.enqueue([22])
    service._on_fatal = lambda exc: None
    with pytest.raises(redis.ResponseError, match="CERTREMOVE_FENCED"):
        service.drain()
    assert client.status(later)["status"] == "queued"
