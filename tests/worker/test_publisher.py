"""Statuses published on their own thread (worker.publisher): the queue itself, then whole drains
on a real core model and a real Redis whose status script fails on the publishing thread, for a
Redis fault and for a fault of one entry's own status key. Every request is answered, none is
removed twice, nothing stays pending."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, schema
from producer.deadletters import list_dead_letters
from tests.worker.test_service import build, drain_until_idle
from worker.publisher import Publisher
from worker.status_script import StatusPublisher


def test_publications_run_in_order_on_one_thread_and_a_failure_skips_the_rest() -> None:
    pub = Publisher()
    ran: list[tuple[int, str]] = []
    gate = threading.Event()

    def job(i: int, fail: bool = False) -> Any:
        def run() -> None:
            gate.wait(5)
            ran.append((i, threading.current_thread().name))
            if fail:
                raise ValueError(f"job {i}")

        return run

    entries = [[object()] for _ in range(4)]
    pub.submit(job(0), entries[0])  # type: ignore[arg-type]
    pub.submit(job(1, fail=True), entries[1])  # type: ignore[arg-type]
    pub.submit(job(2), entries[2])  # type: ignore[arg-type]
    assert pub.busy and pub.failure() is None  # nothing has ended yet: no failure to take
    gate.set()
    pub.wait()
    assert [i for i, _ in ran] == [0, 1]  # in order; the one after the failure never ran
    assert all(name.startswith("certremove-publish") for _, name in ran)
    assert pub.busy  # a failure not taken yet counts as busy (a release waits for it)
    failed = pub.failure()
    assert failed is not None
    exc, left = failed
    assert isinstance(exc, ValueError) and str(exc) == "job 1"
    assert left == entries[1] + entries[2]  # the failed one and the skipped one, in order
    assert not pub.busy and pub.failure() is None
    pub.submit(job(3), entries[3])  # type: ignore[arg-type]  # usable again
    pub.wait()
    assert [i for i, _ in ran] == [0, 1, 3] and pub.failure() is None


def _ledger(state: Path) -> tuple[Counter[Any], Counter[str]]:
    removed: Counter[Any] = Counter()
    answered: Counter[str] = Counter()
    for line in (state / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        removed.update(rec.get("x") or [])
        answered.update(rec["ids"])
    return removed, answered


def patch_publish(monkeypatch: pytest.MonkeyPatch, before: Callable[[str], None]) -> None:
    """Make StatusPublisher.publish call ``before(thread name)`` first (it may wait or raise)."""
    real = StatusPublisher.publish

    def publish(self: StatusPublisher, *args: Any, **kw: Any) -> None:
        before(threading.current_thread().name)
        real(self, *args, **kw)

    monkeypatch.setattr(StatusPublisher, "publish", publish)


def on_publishing_thread(thread: str) -> bool:
    return thread.startswith("certremove-publish")


def test_a_redis_fault_on_the_publishing_thread_leaves_the_entries_pending_then_served_once(
    state: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(60)])
    threads: list[str] = []

    def fail(thread: str) -> None:
        threads.append(thread)
        if len(threads) == 2:  # the second batch's statuses: the connection drops
            raise redis.ConnectionError("gone while publishing")

    patch_publish(monkeypatch, fail)
    service, _, _ = build(state, rclient, model_name, max_batch=10, sleep=lambda s: None)
    first = service.drain()
    assert first.infrastructure_error and "gone while publishing" in first.infrastructure_error
    assert "certremove-publish" in threads[0]  # published off the drain's thread
    # the drain stopped at the fault: what was not published is still pending (none lost)
    assert service.stream.pending_count() >= 10
    drain_until_idle(service, 10)
    assert service.stream.pending_count() == 0
    statuses = client.statuses(rids)
    assert {s["status"] for s in statuses.values()} == {"applied"}
    removed, answered = _ledger(state)
    assert set(removed) == set(range(60)) and set(removed.values()) == {1}  # each once
    assert set(answered) == set(rids)
    assert not service.model.alive[:60].any()


def test_a_status_key_fault_on_the_publishing_thread_is_isolated_to_its_entry(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(40)])
    poison = rids[17]
    rclient.delete(schema.status_key(model_name, poison))
    rclient.sadd(schema.status_key(model_name, poison), "a set, not a hash")
    service, _, _ = build(
        state, rclient, model_name, max_batch=8, max_failures=2, sleep=lambda s: None
    )
    drain_until_idle(service, 20)
    assert service.stream.pending_count() == 0
    others = [r for r in rids if r != poison]
    statuses = client.statuses(others)
    assert {s["status"] for s in statuses.values()} == {"applied"}
    [letter] = list_dead_letters(rclient, model_name)
    assert letter.request_id == poison
    removed, _ = _ledger(state)
    assert set(removed) == set(range(40)) and set(removed.values()) == {1}
    assert not service.outbox.suspect  # acknowledged (or dead-lettered): nothing left suspect


def test_a_drain_returns_with_every_status_out(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(30)] + [[5]])  # a repeat of a row
    service, _, reg = build(state, rclient, model_name, max_batch=7)
    report = service.drain()
    assert report.requests == 31
    statuses = client.statuses(rids)  # read at once: no wait for a thread
    assert all(s["status"] == "applied" for s in statuses.values())
    assert statuses[rids[-1]]["already_removed_ids"] == [5]
    assert not service.outbox.publisher.busy
    assert service.stream.pending_count() == 0
    # each batch's publication timed on its thread, once per batch like the loop's phases
    count = "certremove_drain_phase_seconds_count"
    batches = reg.get_sample_value(count, {"phase": "answer"})
    assert batches is not None and batches >= 5
    assert reg.get_sample_value(count, {"phase": "publish"}) == batches
