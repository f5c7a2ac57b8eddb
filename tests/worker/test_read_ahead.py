"""Reading the next batch ahead (``Intake.read_ahead``) while a batch is served: stream order is
kept, nothing is served twice, and entries read ahead and dropped come back with the pending
list (real Redis)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client
from tests.worker.test_service import build
from worker.stream import Intake, RequestStream


def _rids(entries: list[Any]) -> list[str]:
    return [e.request_id for e in entries]


@pytest.fixture
def sent(broker_url: str, model_name: str) -> list[str]:
    with Client(broker_url, model=model_name) as client:
        return client.enqueue_many([[i] for i in range(10)])


def _wait_delivered(
    rclient: redis.Redis, intake: Intake, count: int, timeout: float = 10.0
) -> None:
    """Wait until ``count`` entries of the intake's stream are delivered (pending)."""
    stream = intake.stream
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(rclient.xpending(stream.key, stream.group)["pending"]) >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"fewer than {count} entries delivered within {timeout} s")


def _intake(rclient: redis.Redis, model_name: str, max_batch: int = 4) -> Intake:
    stream = RequestStream(rclient, model_name, "w1")
    stream.ensure_group()
    return Intake(stream, max_batch)


def test_entries_read_ahead_follow_the_carry_in_stream_order(
    rclient: redis.Redis, model_name: str, sent: list[str]
) -> None:
    intake = _intake(rclient, model_name)
    first = intake.fill(intake.recover())
    assert _rids(first) == sent[:4]
    intake.read_ahead()
    second = intake.fill(first[3:])  # one entry deferred: it goes first, then 3 read ahead
    assert _rids(second) == [sent[3], *sent[4:7]]
    intake.read_ahead()  # one left from the first read ahead, then up to 3 more
    third = intake.fill([])
    assert _rids(third) == sent[7:10]
    intake.read_ahead()
    assert intake.fill([]) == []


def test_holding_keeps_what_was_read_ahead_and_the_pending_list_adds_nothing_twice(
    rclient: redis.Redis, model_name: str, sent: list[str]
) -> None:
    intake = _intake(rclient, model_name)
    intake.recover()  # the pending list read once (empty)
    batch = intake.fill([])
    intake.read_ahead()
    intake.hold(batch[2:])  # the time slice ends: the unserved entries wait in memory
    intake.reread_pending()  # and the pending list is read again: it holds them all too
    again = intake.recover()
    assert _rids(again) == [*sent[2:4], *sent[4:8]]
    assert _rids(intake.fill(again)) == sent[2:6]  # max_batch: the rest waits, in order
    # the two left hold a quarter of max_batch or more: served as they are, not topped up
    assert _rids(intake.fill([])) == sent[6:8]
    assert _rids(intake.fill([])) == sent[8:10]  # nothing held: read from the stream


def test_a_small_batch_is_topped_up_and_a_large_one_is_served_as_it_is(
    broker_url: str, rclient: redis.Redis, model_name: str, sent: list[str]
) -> None:
    small = _intake(rclient, model_name, max_batch=80)  # tops up below 20 entries
    small.recover()
    small.read_ahead()  # reads the ten sent
    with Client(broker_url, model=model_name) as client:
        more = client.enqueue_many([[i] for i in range(10, 15)])
    assert _rids(small.fill([])) == sent + more  # ten read ahead, topped up with five
    with Client(broker_url, model=model_name) as client:
        later = client.enqueue_many([[i] for i in range(15, 35)])
    large = small
    large.max_batch = 40  # tops up below 10 entries
    large.read_ahead()  # reads the twenty
    # (on its own thread: the five below must arrive after it has read, or it reads them too)
    _wait_delivered(rclient, large, 15 + 20)
    with Client(broker_url, model=model_name) as client:
        last = client.enqueue_many([[i] for i in range(35, 40)])
    assert _rids(large.fill([])) == later  # twenty: served without a read
    assert _rids(large.fill([])) == last


def test_forgotten_entries_read_ahead_come_back_once_with_the_pending_list(
    rclient: redis.Redis, model_name: str, sent: list[str]
) -> None:
    intake = _intake(rclient, model_name, max_batch=20)
    intake.recover()  # the pending list read once (empty)
    intake.read_ahead()  # reads all ten
    intake.forget()  # a failure: what was read ahead is dropped, and pending
    back = intake.recover()
    assert sorted(_rids(back)) == sorted(sent)
    assert len(back) == len({e.entry_id for e in back})


def test_a_read_ahead_that_fails_raises_where_its_entries_are_taken(
    rclient: redis.Redis, model_name: str, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = _intake(rclient, model_name)
    intake.recover()

    def down(count: int, block_ms: int | None = None) -> Any:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(intake.stream, "read_new", down)
    intake.read_ahead()
    with pytest.raises(redis.ConnectionError):
        intake.fill([])
    monkeypatch.undo()
    assert _rids(intake.fill([])) == sent[:4]  # the failed read delivered nothing


def test_a_drain_with_reads_ahead_serves_every_request_once(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    with Client(broker_url, model=model_name) as client:
        rids = client.enqueue_many([[i] for i in range(40)] + [[5]])  # the last: removed already
        service, _, _ = build(state, rclient, model_name, max_batch=7)
        reads: list[int] = []
        read_new = service.stream.read_new

        def counted(count: int, block_ms: int | None = None) -> Any:
            got = read_new(count, block_ms)
            reads.append(len(got))
            return got

        service.stream.read_new = counted  # type: ignore[method-assign]
        report = service.drain()
        st = client.statuses(rids)
    assert report.requests == 41 and sum(reads) == 41
    assert [s["status"] for s in st.values()] == ["applied"] * 41
    assert st[rids[-1]]["already_removed_ids"] == [5]
    assert service.model.n_alive == service.model.n_rows - 40
    assert service.stream.pending_count() == 0


def test_one_reader_thread_serves_every_read_ahead_and_stops_with_its_intake(
    rclient: redis.Redis, model_name: str, sent: list[str]
) -> None:
    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("certremove-read-ahead")]

    before = set(readers())
    intake = _intake(rclient, model_name, max_batch=3)
    intake.recover()
    got: list[Any] = []
    for _ in range(5):
        intake.read_ahead()
        got += intake.fill([])
    assert _rids(got) == sent  # in stream order, nothing twice
    (thread,) = set(readers()) - before  # one thread for the five reads
    del intake
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_what_arrives_during_a_step_is_read_ahead_before_the_batch_is_persisted(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    # A burst: entries keep arriving while a batch's Newton step runs. After the step the intake
    # reads ahead again (the first read ahead, started before the step, found nothing new), so
    # they are read on the reader thread beside the persist and answer, not by the next fill on
    # the drain's thread; every request is still served once, in stream order.
    with Client(broker_url, model=model_name) as client:
        first = client.enqueue_many([[i] for i in range(5)])
        service, _, _ = build(state, rclient, model_name, max_batch=50)
        later: list[str] = []
        reads: list[tuple[str, int]] = []
        read_new = service.stream.read_new
        remove = service.model.remove

        def counted(count: int, block_ms: int | None = None) -> Any:
            got = read_new(count, block_ms)
            reads.append((threading.current_thread().name, len(got)))
            return got

        def remove_while_more_arrive(rows: Any, **kw: Any) -> Any:
            if not later:
                later.extend(client.enqueue_many([[i] for i in range(100, 120)]))
            return remove(rows, **kw)

        service.stream.read_new = counted  # type: ignore[method-assign]
        service.served.model.remove = remove_while_more_arrive  # type: ignore[method-assign]
        report = service.drain()
        st = client.statuses(first + later)
    assert report.requests == 25 and report.steps == 2
    assert {s["status"] for s in st.values()} == {"applied"}
    ahead = [n for name, n in reads if name.startswith("certremove-read-ahead")]
    assert 20 in ahead  # the 20 that arrived during the step: read ahead, all at once
    assert sum(n for _, n in reads) == 25  # each entry read once
    assert service.stream.pending_count() == 0


def test_a_step_reads_ahead_after_its_newton_step_and_after_its_persist(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    service, _, _ = build(state, rclient, model_name)
    calls: list[int] = []
    saves = {"n": 0}
    save = service.model.save

    def counted_save(*args: Any, **kw: Any) -> Any:
        saves["n"] += 1
        return save(*args, **kw)

    service.model.save = counted_save  # type: ignore[method-assign]
    read_ahead = service.intake.read_ahead

    def traced() -> None:
        calls.append(saves["n"])  # how many persists had run at each read ahead
        read_ahead()

    service.steps.stepped = traced
    with Client(broker_url, model=model_name) as client:
        rid = client.enqueue([5])
        service.drain()
        assert client.status(rid)["status"] == "applied"
    assert calls == [0, 1]  # once before the batch's persist, once after it
