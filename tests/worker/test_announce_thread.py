"""Release announcements on the announcing thread (``worker.release_announce``, the service's
queue): after a batch a part is handed over and the drain goes on; nothing is handed over while
one runs; a failure is raised by the next call and the part done again; any call that does not
hand over (a whole announcement, the periodic check, the start) waits for the part in flight and
runs on the caller's thread; a new release waits for it before it changes the queue."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, schema
from tests.conftest import make_state
from tests.worker.test_release_service import build as build_releasing
from worker import release_announce
from worker.release_announce import AnnounceQueue


class GatedAnnouncer:
    """Announces on whatever thread calls it, once ``gate`` opens; records (release, start,
    end, thread name); fails the parts listed in ``fail`` once each."""

    def __init__(self, fail: set[tuple[int, int]] | None = None) -> None:
        self.parts: list[tuple[int, int, int, str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail = set(fail or ())

    def announce(
        self, rec: dict[str, Any], covered: list[Any], *, start: int = 0, stop: int | None = None
    ) -> bool:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        end = len(covered) if stop is None else min(stop, len(covered))
        if (int(rec["release"]), start) in self.fail:
            self.fail.discard((int(rec["release"]), start))
            raise ConnectionError("redis went away")
        self.parts.append((int(rec["release"]), start, end, threading.current_thread().name))
        return end == len(covered)


def test_a_part_runs_on_the_announcing_thread_and_the_caller_goes_on() -> None:
    fake = GatedAnnouncer()
    queue = AnnounceQueue(fake)  # type: ignore[arg-type]
    queue.pending = [({"release": 1}, list(range(10)))]
    queue.run(budget=4, hand_over=True)  # handed over: returns while the part waits at the gate
    assert fake.entered.wait(10) and queue.running() and fake.parts == []
    queue.applied = 3
    queue.run(budget=4, hand_over=True)  # a part in flight: nothing more is handed over
    assert queue.applied == 3  # ... and the requests applied meanwhile size the next part
    fake.gate.set()
    queue.wait()
    assert not queue.running()
    assert [p[:3] for p in fake.parts] == [(1, 0, 4)] and queue.offset == 4
    assert fake.parts[0][3].startswith("certremove-announce")
    queue.run(hand_over=True)  # max(ANNOUNCE_PART, 2 * 3): the rest of release 1
    queue.wait()
    assert [p[:3] for p in fake.parts] == [(1, 0, 4), (1, 4, 10)] and queue.pending == []


def test_a_failed_part_is_raised_by_the_next_call_and_done_again() -> None:
    fake = GatedAnnouncer(fail={(1, 0)})
    fake.gate.set()
    queue = AnnounceQueue(fake)  # type: ignore[arg-type]
    queue.pending = [({"release": 1}, list(range(6)))]
    queue.run(budget=4, hand_over=True)
    queue.wait()  # it failed on the announcing thread: nothing moved yet
    assert fake.parts == [] and queue.offset == 0 and len(queue.pending) == 1
    with pytest.raises(ConnectionError):
        queue.run(
            budget=4, hand_over=True
        )  # the failure, raised once (the caller logs and counts it)
    queue.run(budget=4, hand_over=True)  # the part again
    queue.wait()
    assert [p[:3] for p in fake.parts] == [(1, 0, 4)]
    queue.run(whole=True)  # whole: on the caller's thread, everything left
    assert [p[:3] for p in fake.parts] == [(1, 0, 4), (1, 4, 6)] and queue.pending == []
    assert fake.parts[-1][3] == threading.current_thread().name


def test_a_whole_announcement_waits_for_the_part_in_flight() -> None:
    fake = GatedAnnouncer()
    queue = AnnounceQueue(fake)  # type: ignore[arg-type]
    queue.pending = [({"release": 1}, list(range(10))), ({"release": 2}, [0, 1])]
    queue.run(budget=4, hand_over=True)
    assert fake.entered.wait(10)
    opener = threading.Timer(0.2, fake.gate.set)
    opener.start()
    queue.run(whole=True)  # waits for 0..4, then announces the rest in order
    opener.join()
    assert [p[:3] for p in fake.parts] == [(1, 0, 4), (1, 4, 10), (2, 0, 2)]
    assert queue.pending == [] and not queue.running()


def test_a_call_that_does_not_hand_over_waits_and_runs_here() -> None:
    fake = GatedAnnouncer()
    queue = AnnounceQueue(fake)  # type: ignore[arg-type]
    queue.pending = [({"release": 1}, list(range(10)))]
    queue.run(budget=4, hand_over=True)
    assert fake.entered.wait(10)
    opener = threading.Timer(0.2, fake.gate.set)
    opener.start()
    queue.run(budget=3)  # waits for 0..4 on the announcing thread, then 4..7 here
    opener.join()
    assert [p[:3] for p in fake.parts] == [(1, 0, 4), (1, 4, 7)] and not queue.running()
    assert fake.parts[0][3].startswith("certremove-announce")
    assert fake.parts[1][3] == threading.current_thread().name


def test_the_service_announces_on_its_thread_and_a_release_waits_for_the_part(
    tmp_path: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real service (Redis, ledger, release files, policy ``every``): the part of the first
    batch's release is announced on the announcing thread while the next batch is served; that
    batch's release waits for the part before it writes its record (the records and the queue
    change on one thread at a time); the drain's end (the stream empty) waits for what is left
    and announces it: every status has the release that covers it, one stream entry each."""
    monkeypatch.setattr(release_announce, "ANNOUNCE_PART", 2)
    monkeypatch.setattr(release_announce, "ANNOUNCE_RATE", 1)
    state = make_state(tmp_path / "s", max_removals=40)
    service = build_releasing(state, rclient, model_name, "every", tmp_path / "rel", max_batch=4)
    releaser = service.releaser
    assert releaser is not None
    releaser.queue.run(whole=True)  # the trained model's release, announced before the test
    announce, gate = releaser.announcer.announce, threading.Event()
    threads: list[str] = []

    def gated(*args: Any, **kwargs: Any) -> bool:
        threads.append(threading.current_thread().name)
        assert gate.wait(10)
        return announce(*args, **kwargs)

    releaser.announcer.announce = gated  # type: ignore[method-assign]
    appended: list[tuple[str, bool]] = []
    append = releaser.records.append

    def watched(rec: dict[str, Any]) -> None:
        if threading.current_thread() is threading.main_thread():
            appended.append(("release" if "release" in rec else "other", releaser.queue.running()))
        append(rec)

    releaser.records.append = watched  # type: ignore[method-assign]
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(8)])
    opener = threading.Timer(0.3, gate.set)  # the first part is held 0.3 s on its thread
    opener.start()
    service.drain()  # 2 batches, a release after each
    opener.join()
    assert threads and threads[0].startswith("certremove-announce")
    assert [kind for kind, _ in appended] == ["release", "release"]
    assert not any(running for _, running in appended)  # the second waited for the part
    statuses = client.statuses(rids)
    versions = [statuses[r].get("released_version") for r in rids]
    assert None not in versions
    assert len(set(versions[:4])) == 1 and len(set(versions[4:])) == 1
    assert versions[0] < versions[4]
    entries = [int(e[1][b"release"]) for e in rclient.xrange(schema.releases_key(model_name))]
    assert entries == sorted(set(entries)) and entries[-2:] == [versions[0], versions[4]]
    assert {versions[0], versions[4]} <= releaser.records.announced
    service.close()
