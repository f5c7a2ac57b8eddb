"""The handover to a noise epoch fitted in the background, on a real core model and a real Redis
(no Celery): one Newton step per batch at the epoch change, the epoch still ending exactly at its
count, and the release of the new epoch announced in parts while batches flow."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import redis

import core
from producer import Client, schema
from tests.conftest import make_state
from tests.worker.test_release_service import build as build_releasing
from tests.worker.test_service import build
from worker import release_announce
from worker.steps import NewtonSteps


class StepCounter:
    """Counts the Newton steps core runs in each batch of a service (``model.remove`` calls
    that removed rows, and catch-up steps of adopted epochs)."""

    def __init__(self, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.per_batch: list[int] = []
        model = service.model
        real_remove, real_adopt = model.remove, model.adopt_retrain
        real_step = NewtonSteps.step

        def remove(*a: Any, **k: Any) -> Any:
            res = real_remove(*a, **k)
            self.per_batch[-1] += bool(res.removed)
            return res

        def adopt(*a: Any, **k: Any) -> Any:
            res = real_adopt(*a, **k)
            self.per_batch[-1] += res is not None
            return res

        def step(steps: NewtonSteps, *a: Any, **k: Any) -> Any:
            self.per_batch.append(0)
            return real_step(steps, *a, **k)

        model.remove, model.adopt_retrain = remove, adopt
        monkeypatch.setattr(NewtonSteps, "step", step)


def test_one_newton_step_per_batch_at_each_epoch_change(
    tmp_path: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch that takes an epoch to its count runs the epoch's last step only; the rest of
    it rides in the next batch's catch-up step. Every epoch still serves exactly its count
    (catch-up rows included), every request is applied once, by a Newton step."""
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    service, sent, _ = build(state, rclient, model_name, retrain_lead=0.5, max_batch=4)
    counter = StepCounter(service, monkeypatch)
    rids = client.enqueue_many([[i] for i in range(41)])
    report = service.drain()
    assert report.adopted >= 3 and not report.retrain_requested
    assert sent.names().count(schema.TASK_RETRAIN) == 0
    assert max(counter.per_batch) == 1, counter.per_batch  # never two Newton steps in a batch
    assert sum(counter.per_batch) == report.steps
    st = client.statuses(rids)
    assert [s["status"] for s in st.values()] == ["applied"] * 41
    assert {s["method"] for s in st.values()} == {"newton"}
    versions = [s["model_version"] for s in st.values()]
    assert versions == sorted(versions)
    assert versions.count(1) == 10  # epoch 1 served exactly its max_removals
    # epoch v >= 2 serves its 10 rows: first the catch-up (the rows epoch v - 1 removed after
    # v's snapshot, taken once 5 to 8 of its rows were used: batches of 4), then the requests
    # answered at version v
    for v in range(2, versions[-1]):
        assert 5 <= versions.count(v) <= 8
    persisted = core.load_model(state, device="cpu")
    assert persisted.n_alive == persisted.n_rows - 41
    assert persisted.removed_in_epoch <= 10
    assert service.model.budget_used <= service.model.budget_total
    service.close()


def test_a_safety_net_firing_on_the_fits_catch_up_is_counted_and_retrains(
    tmp_path: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the catch-up on the fit's thread would pass the new epoch's budget (a b-dependent
    outcome, ``Model.catch_up`` returns None), that epoch never takes over: the firing is
    counted on the drain's thread and the blocking retrain folds the rest; nothing is lost.
    When the catch-up fails with an error instead, the adoption does the whole catch-up."""

    def drain_twelve(name: str) -> tuple[Client, Any, Any, list[str], Any, int]:
        """A service on a state of 10 removals per epoch, twelve requests, one drain."""
        state = make_state(tmp_path / name, max_removals=10)
        client = Client(broker_url, model=name)
        service, sent, _ = build(state, rclient, name, retrain_lead=0.5, max_batch=4)
        fired = service.model.safety_retrains
        rids = client.enqueue_many([[i] for i in range(12)])
        return client, service, sent, rids, service.drain(), fired

    monkeypatch.setattr(core.Model, "catch_up", lambda self, prepared: None)
    client, service, sent, rids, report, fired = drain_twelve(model_name)
    assert report.adopted == 0 and report.retrain_requested
    assert service.model.safety_retrains == fired + 1
    assert sent.names().count(schema.TASK_RETRAIN) == 1
    assert service.retrain().retrained
    statuses = client.statuses(rids)
    assert [s["status"] for s in statuses.values()] == ["applied"] * 12
    service.close()

    def broken(self: core.Model, prepared: Any) -> Any:
        raise RuntimeError("injected: the catch-up failed")

    monkeypatch.setattr(core.Model, "catch_up", broken)
    client, service, sent, rids, report, _ = drain_twelve(model_name + "b")
    assert report.adopted >= 1 and not report.retrain_requested
    assert {s["method"] for s in client.statuses(rids).values()} == {"newton"}
    service.close()


def test_without_a_fit_in_flight_the_rest_of_the_batch_folds_into_the_retrain(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    """No background fit (``retrain_lead`` 0): the epoch serves its count and the rest of the
    batch waits for the blocking retrain, as before (nothing is deferred to a next batch)."""
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    service, sent, _ = build(state, rclient, model_name, retrain_lead=0.0, max_batch=4)
    rids = client.enqueue_many([[i] for i in range(12)])
    report = service.drain()
    assert report.retrain_requested and report.rows_removed == 10 and report.adopted == 0
    assert sent.names().count(schema.TASK_RETRAIN) == 1
    assert service.retrain().retrained
    methods = [s["method"] for s in client.statuses(rids).values()]
    assert methods == ["newton"] * 10 + ["retrain"] * 2
    service.close()


def test_a_large_release_is_announced_in_parts_while_batches_flow(
    tmp_path: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release that covers many requests is announced a part per batch (at least
    ANNOUNCE_PART, else ANNOUNCE_RATE times the requests applied since the last part; the stream
    entry with the first part, ``announced`` in the record after the last), and a drain that
    empties the stream announces what is left: every status gets its ``released_version`` exactly
    once."""
    monkeypatch.setattr(release_announce, "ANNOUNCE_PART", 2)
    monkeypatch.setattr(release_announce, "ANNOUNCE_RATE", 2)
    state = Path(shutil.copytree(make_state(tmp_path / "t", max_removals=20), tmp_path / "s"))
    rel = tmp_path / "releases"
    service = build_releasing(state, rclient, model_name, "manual", rel, max_batch=4)
    assert service.releaser is not None
    client = Client(broker_url, model=model_name)

    def released(rids: list[str]) -> list[Any]:
        return [s.get("released_version") for s in client.statuses(rids).values()]

    rids = client.enqueue_many([[i] for i in range(10)])
    service.drain()  # 3 batches, nothing released (manual)
    rclient.set(schema.release_request_key(model_name), "1")
    service.release_tick()  # within BUSY_S of the last batch: the release and its first part
    entries = rclient.xrange(schema.releases_key(model_name))
    assert len(entries) == 1  # the stream entry went out with the first part
    number = int(entries[0][1][b"release"])
    assert released(rids).count(number) == 2 and released(rids).count(None) == 8
    assert number not in service.releaser.records.announced
    service.release_tick()  # still within BUSY_S of a batch: one more part, not all
    assert released(rids).count(number) == 4
    assert number not in service.releaser.records.announced
    more = client.enqueue_many([[10], [11]])
    # one batch of 2 requests (a part of 2 * 2); the drain then found the stream empty: idle,
    # so everything left is announced at its end, not at the next periodic check
    service.drain()
    assert released(rids) == [number] * 10 and released(more) == [None] * 2
    assert number in service.releaser.records.announced
    assert len(rclient.xrange(schema.releases_key(model_name))) == 1  # one entry per release
    service.close()


class FakeAnnouncer:
    """Records the parts it is asked to announce; fails the parts listed in ``fail``."""

    def __init__(self, fail: set[tuple[int, int]] = frozenset()) -> None:  # type: ignore[assignment]
        self.parts: list[tuple[int, int, int]] = []  # (release, start, end)
        self.fail = set(fail)

    def announce(
        self, rec: dict, covered: list, *, start: int = 0, stop: int | None = None
    ) -> bool:
        end = len(covered) if stop is None else min(stop, len(covered))
        if (int(rec["release"]), start) in self.fail:
            self.fail.discard((int(rec["release"]), start))
            raise ConnectionError("redis went away")
        self.parts.append((int(rec["release"]), start, end))
        return end == len(covered)


def test_the_announce_queue_goes_in_order_in_parts_and_redoes_a_failed_part() -> None:
    from worker.release_announce import AnnounceQueue  # noqa: PLC0415

    fake = FakeAnnouncer(fail={(1, 4)})
    queue = AnnounceQueue(fake)  # type: ignore[arg-type]
    queue.pending = [({"release": 1}, list(range(10))), ({"release": 2}, []), ({"release": 3}, [0])]
    queue.run(budget=4)
    assert fake.parts == [(1, 0, 4)] and queue.offset == 4
    with pytest.raises(ConnectionError):
        queue.run(budget=4)  # the part 4..8 fails: nothing moves
    assert queue.offset == 4 and len(queue.pending) == 3
    queue.run(budget=4)  # 4..8 again
    queue.run(budget=4)  # the last 2 of release 1, release 2 (no requests) and release 3 (one)
    assert fake.parts == [(1, 0, 4), (1, 4, 8), (1, 8, 10), (2, 0, 0), (3, 0, 1)]
    assert queue.pending == [] and queue.offset == 0
    queue.pending = [({"release": 4}, list(range(7)))]
    queue.run(whole=True)
    assert fake.parts[-1] == (4, 0, 7) and queue.pending == []


def test_background_jobs_run_at_their_nice_value_on_the_cpu() -> None:
    """Fits at BACKGROUND_NICE, shadow-run estimates lower still (ESTIMATE_NICE), on threads of
    their own: the drain loop's thread keeps its priority."""
    import os  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from worker.epochs import (  # noqa: PLC0415
        BACKGROUND_NICE,
        ESTIMATE_NICE,
        BackgroundRunner,
        niced,
    )

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = own_nice()
    fit = BackgroundRunner("t-fit").submit(niced, "cpu", own_nice).result(timeout=10)
    est = BackgroundRunner("t-est").submit(niced, "cpu", own_nice, nice=ESTIMATE_NICE)
    assert BACKGROUND_NICE < ESTIMATE_NICE
    assert fit == max(base, BACKGROUND_NICE) and est.result(timeout=10) == max(base, ESTIMATE_NICE)
    assert own_nice() == base


def test_estimates_ahead_sleep_after_each_shadow_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU an estimate ahead runs ESTIMATE_DUTY of the time: after each shadow step it
    sleeps for the step's time times (1 - duty) / duty; the estimate itself is unchanged."""
    from worker import epochs  # noqa: PLC0415

    slept: list[float] = []
    monkeypatch.setattr(epochs.time, "sleep", slept.append)
    pause = epochs._paced(0.25)
    pause(0.02)
    assert slept == [pytest.approx(0.06)]
    steps: list[float] = []
    paced = epochs._paced

    def recording(duty: float) -> Any:
        inner = paced(duty)

        def pause(seconds: float) -> None:
            steps.append(seconds)
            inner(seconds)

        return pause

    monkeypatch.setattr(epochs, "_paced", recording)
    ds = core.load_dataset("digits")
    model = core.train(ds.X_train, ds.y_train, lam=1e-2, sigma=1.0, device="cpu")  # "auto"
    slept.clear()
    basis = epochs._estimate_ahead(model, model.retrain_snapshot())
    assert basis is not None and basis[0] == model.n_alive and len(steps) >= 2
    duty = epochs.ESTIMATE_DUTY
    assert 0 < duty < 1 and all(s > 0 for s in steps)
    assert slept == [pytest.approx(s * (1 - duty) / duty) for s in steps]


def test_the_lead_covers_the_slowest_of_the_recent_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next fit starts retrain_lead of the epoch before its count, or earlier by twice the
    rows removed (at the recent rate) during the slowest of the last FIT_HISTORY fits; at most
    half the epoch. Counts and past timings only: the epoch in use still ends at its count."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from worker import epochs  # noqa: PLC0415
    from worker.metrics import ServiceMetrics  # noqa: PLC0415

    clock = [100.0]
    monkeypatch.setattr(epochs.time, "monotonic", lambda: clock[0])
    nxt = epochs.NextEpoch(0.2, ServiceMetrics(CollectorRegistry()))
    assert nxt.lead_rows(10_000) == 2_000 and nxt.fit_seconds is None
    for _ in range(4):  # 1,000 rows/s over the last 3 s
        nxt.mark_removed(1_000)
        clock[0] += 1.0
    clock[0] -= 1.0
    assert nxt.removal_rate() == pytest.approx(1_000.0)
    nxt.fitted(0.5)  # 2 * 1,000 * 0.5 = 1,000 rows < 2,000
    assert nxt.lead_rows(10_000) == 2_000
    nxt.fitted(1.5)  # 3,000 rows
    assert nxt.lead_rows(10_000) == 3_000
    nxt.fitted(0.1)
    nxt.fitted(0.1)  # the slow fit is still among the last 3
    assert nxt.fit_seconds == 0.1 and nxt.lead_rows(10_000) == 3_000
    assert nxt.lead_rows(4_000) == 2_000  # at most half the epoch
    nxt.fitted(0.1)  # now it is not
    assert nxt.lead_rows(10_000) == 2_000
