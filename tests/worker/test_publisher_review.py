"""Faults found in review of the publisher (statuses published on their own thread,
worker.publisher): a real core model and a real Redis, the publishing thread held or made to fail
where the fault needs it. Each test names the promise it checks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client
from tests.worker.test_publisher import on_publishing_thread, patch_publish
from tests.worker.test_release_service import build as build_releasing
from tests.worker.test_service import build
from worker import stream as stream_module
from worker.errors import ServiceStoppedError
from worker.publisher import Publisher
from worker.releases import Releaser, read_latest

FENCED = "CERTREMOVE_FENCED this worker no longer holds the model lease"


def _released_before_applied(statuses: dict[str, dict[str, Any]]) -> list[str]:
    """Requests whose status carries a release while it does not say ``applied`` yet."""
    return [
        rid
        for rid, s in statuses.items()
        if s.get("released_version") is not None and s.get("status") != "applied"
    ]


def test_an_interval_release_is_not_made_while_the_statuses_it_covers_are_queued(
    state: Path,
    tmp_path: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RemovalService._release asked Releaser.release_due whether a release would be made, then
    # Releaser.settle asked the policy again: under interval:T the interval can run out between
    # the two clock readings, and the release was made (and announced on the status hashes)
    # while the batch's statuses were still queued on the publishing thread.
    now = [1000.0]
    rel = tmp_path / "releases"
    service = build_releasing(state, rclient, model_name, "interval:60", rel, clock=lambda: now[0])
    assert read_latest(rel, model_name) == 1
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(5)])

    gate = threading.Event()

    def hold(thread: str) -> None:
        if on_publishing_thread(thread):
            gate.wait(10)  # held until the release policy after the batch is done

    real_due = Releaser.release_due

    def release_due(self: Releaser, model: Any) -> bool:
        due = real_due(self, model)
        now[0] += 61  # the interval runs out right after this reading of the clock
        return due

    seen: list[dict[str, dict[str, Any]]] = []
    real_settle = Releaser.settle

    def settle(self: Releaser, model: Any, **kw: Any) -> int | None:
        try:
            return real_settle(self, model, **kw)
        finally:
            seen.append(client.statuses(rids))  # before the batch's publication runs
            gate.set()

    patch_publish(monkeypatch, hold)
    monkeypatch.setattr(Releaser, "release_due", release_due)
    monkeypatch.setattr(Releaser, "settle", settle)
    service.drain()
    assert seen, "the release policy ran while the batch's publication was queued"
    for statuses in seen:
        assert not _released_before_applied(statuses)
    final = client.statuses(rids)
    assert {s["status"] for s in final.values()} == {"applied"}
    assert {s.get("released_version") for s in final.values()} == {2}  # released after all
    assert read_latest(rel, model_name) == 2


def test_a_lost_lease_on_the_publishing_thread_stops_the_service_whatever_else_failed(
    state: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The status script refused for a lost lease (CERTREMOVE_FENCED) while the drain's own
    # thread failed on something else first (the next read: Redis was away, the lease lapsed
    # and another worker took it). _on_failure waited for the publication, took its failure
    # and dropped it, and backed off as for the read's Redis fault: the worker went on serving
    # without the lease. Before the publisher, the refused status failed the batch's step and
    # the service stopped.
    client = Client(broker_url, model=model_name)
    client.enqueue_many([[i] for i in range(3)])
    gate = threading.Event()

    def refuse(thread: str) -> None:
        if on_publishing_thread(thread):
            gate.wait(10)  # runs once the drain waits for it (its failure handling)
            raise redis.ResponseError(FENCED)

    real_wait = Publisher.wait

    def wait(self: Publisher) -> None:
        gate.set()
        real_wait(self)

    def read_new(stream: Any, count: int) -> list[Any]:
        raise redis.ConnectionError("Redis went away during the read ahead")

    patch_publish(monkeypatch, refuse)
    monkeypatch.setattr(Publisher, "wait", wait)
    monkeypatch.setattr(stream_module, "_read_new", read_new)
    fatal: list[BaseException] = []
    service, _, _ = build(state, rclient, model_name, on_fatal=fatal.append, sleep=lambda s: None)
    with pytest.raises(redis.ResponseError, match="CERTREMOVE_FENCED"):
        service.drain()
    assert fatal and "CERTREMOVE_FENCED" in str(fatal[0])
    with pytest.raises(ServiceStoppedError, match="lost the lease"):
        service.drain()


def test_entries_served_again_are_released_once_their_statuses_are_out(
    state: Path,
    tmp_path: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before the publisher, a status script that failed for an entry's own reason failed the
    # step, whose halves were served (statuses written) before the release after the batch.
    # Now the entries come back as Outbox.suspect; when the slice ends at that moment they are
    # held for the next slice, and RemovalService.drain's closing release (policy every) would
    # cover them at once, their statuses still 'queued' (found by review, failed before the
    # fix). The next slices serve the held entries (statuses published at once), and only then
    # does a release cover them: every status applied, then released.
    rel = tmp_path / "releases"
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(6)])
    calls = {"n": 0}

    def wrong_type_once(thread: str) -> None:
        if on_publishing_thread(thread):
            calls["n"] += 1
            if calls["n"] == 1:
                raise redis.ResponseError(
                    "WRONGTYPE Operation against a key holding the wrong kind of value"
                )

    patch_publish(monkeypatch, wrong_type_once)
    service = build_releasing(state, rclient, model_name, "every", rel, slice_seconds=0.0)
    first = service.drain()
    assert first.requeued and calls["n"] == 1
    assert not _released_before_applied(client.statuses(rids))
    for _ in range(10):
        service.drain()
        assert not _released_before_applied(client.statuses(rids))
        if service.stream.pending_count() == 0 and not service.outbox.suspect:
            break
    final = client.statuses(rids)
    assert {s["status"] for s in final.values()} == {"applied"}
    assert all(s.get("released_version") for s in final.values())
    assert not service.outbox.suspect
