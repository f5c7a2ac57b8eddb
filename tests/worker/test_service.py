"""The removal service on a real core model (tiny data) and a real Redis; no Celery."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry

import core
from producer import Client, schema
from tests.conftest import make_state
from worker.doorbell import Doorbell
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.outbox import JOURNAL_FORMAT
from worker.service import RemovalService
from worker.stream import RequestStream


class Sent:
    """Records send_task(name, queue) calls (the Celery side of the service)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name: str, queue: str) -> None:
        self.calls.append((name, queue))

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def build(
    state: Path, rclient: redis.Redis, model_name: str, **kw: Any
) -> tuple[RemovalService, Sent, CollectorRegistry]:
    sent = Sent()
    reg = CollectorRegistry()
    consumer = kw.pop("consumer", "w1")
    service = RemovalService(
        model=core.load_model(state, device="cpu"),
        state_dir=state,
        stream=RequestStream(
            rclient, model_name, consumer, claim_idle_ms=kw.pop("claim_idle_ms", 10_000)
        ),
        ledger=Ledger(rclient, model_name, state / "ledger.jsonl"),
        metrics=ServiceMetrics(reg),
        doorbell=Doorbell(rclient, model_name, sent),
        send_task=sent,
        reload=kw.pop("reload", lambda: core.load_model(state, device="cpu")),
        **{"slice_seconds": 30.0, **kw},
    )
    return service, sent, reg


def drain_until_idle(service: RemovalService, drains: int) -> None:
    """Drain at most ``drains`` times, until nothing is pending or undelivered."""
    for _ in range(drains):
        service.drain()
        if service.stream.pending_count() == 0 and not service.stream.has_undelivered():
            return


def test_waiting_entries_fold_into_one_newton_step(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(50)])
    service, sent, reg = build(state, rclient, model_name)
    report = service.drain()
    assert (report.steps, report.rows_removed, report.requests) == (1, 50, 50)
    statuses = client.statuses(rids)
    assert {s["status"] for s in statuses.values()} == {"applied"}
    assert {s["method"] for s in statuses.values()} == {"newton"}
    assert all(s["applied_at"] >= s["requested_at"] for s in statuses.values())
    persisted = core.load_model(state, device="cpu")
    assert set((~persisted.alive).nonzero().flatten().tolist()) == set(range(50))
    assert service.stream.pending_count() == 0
    assert rclient.get(schema.doorbell_key(model_name)) is None  # released on exit
    assert reg.get_sample_value("certremove_removals_total", {"method": "newton"}) == 50
    assert reg.get_sample_value("certremove_batch_size_count") == 1
    assert reg.get_sample_value("certremove_requests_total", {"outcome": "applied"}) == 50
    assert reg.get_sample_value("certremove_training_samples") == persisted.n_alive
    journal = core.read_journal(state)  # the persisted journal names its format
    assert journal is not None and journal["format"] == JOURNAL_FORMAT
    assert sum(len(r["ids"]) for r in journal["records"]) == 50
    # one batch: each of its phases timed once (the drain's last read, which found nothing
    # more, is no batch: tests/worker/test_drain_phases.py)
    for phase in ("read", "plan", "step", "persist", "answer", "release"):
        assert (
            reg.get_sample_value("certremove_drain_phase_seconds_count", {"phase": phase}) == 1
        ), phase
    assert reg.get_sample_value("certremove_drain_phase_seconds_count", {"phase": "epoch"}) == 0


def test_max_batch_bounds_each_step(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    Client(broker_url, model=model_name).enqueue_many([[i] for i in range(40)])
    service, _, _ = build(state, rclient, model_name, max_batch=16)
    assert service.drain().steps == 3


def test_slice_end_requeues_and_keeps_the_bell(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    Client(broker_url, model=model_name).enqueue_many([[i] for i in range(40)])
    service, sent, _ = build(state, rclient, model_name, max_batch=16, slice_seconds=1e-6)
    report = service.drain()
    assert report.requeued and report.steps == 1
    assert sent.calls[-1] == (schema.TASK_DRAIN, schema.queue_name(model_name))
    assert rclient.get(schema.doorbell_key(model_name)) == b"1"


def test_bad_input_is_answered(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    key = schema.stream_key(model_name)
    ok = client.enqueue([1, 2])
    unknown = client.enqueue([3, 999_999])
    none_known = client.enqueue([999_998])
    empty = client.enqueue([])
    big = client.enqueue(list(range(10_001)))
    rclient.xadd(key, {"request_id": "mal", "sample_ids": "[1,"})
    rclient.xadd(key, {"request_id": "mal2", "sample_ids": json.dumps([1.5])})
    rclient.xadd(key, {"sample_ids": "[4]"})  # no request id: dead letter
    service, _, reg = build(state, rclient, model_name)
    service.drain()
    # a repeat of an applied request id and a request of removed ids, later
    client.enqueue([5], request_id=ok)
    again = client.enqueue([1, 3])
    service.drain()
    st = client.statuses([ok, unknown, none_known, empty, big, "mal", "mal2", again])
    assert st[ok]["status"] == "applied" and st[ok]["method"] == "newton"
    assert st[unknown]["status"] == "applied" and st[unknown]["unknown_ids"] == [999_999]
    assert st[none_known]["status"] == "rejected" and st[none_known]["unknown_ids"] == [999_998]
    assert st[empty]["status"] == "rejected" and "empty" in st[empty]["reason"]
    assert st[big]["status"] == "rejected" and "oversized" in st[big]["reason"]
    assert st["mal"]["status"] == "rejected" and "JSON" in st["mal"]["reason"]
    assert st["mal2"]["status"] == "rejected"
    assert st[again]["status"] == "applied" and sorted(st[again]["already_removed_ids"]) == [1, 3]
    model = service.model
    assert not model.alive[[1, 2, 3]].any() and bool(model.alive[5])  # the repeat had no effect
    dead = rclient.xrange(schema.dead_letter_key(model_name))
    assert len(dead) == 1 and b"request_id" in dead[0][1][b"reason"]
    assert service.stream.pending_count() == 0
    assert reg.get_sample_value("certremove_requests_total", {"outcome": "duplicate"}) == 1
    assert reg.get_sample_value("certremove_requests_total", {"outcome": "dead_letter"}) == 1


def test_overlapping_requests_in_one_batch(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    a, b = client.enqueue_many([[1, 2], [2, 3]])
    service, _, _ = build(state, rclient, model_name)
    report = service.drain()
    assert report.steps == 2
    st = client.statuses([a, b])
    assert st[a]["status"] == st[b]["status"] == "applied"
    assert st[b]["already_removed_ids"] == [2]


def test_retrain_folds_pending_requests(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(30)])
    service, sent, reg = build(state, rclient, model_name, retrain_lead=0.0)
    report = service.drain()
    assert report.retrain_requested and report.rows_removed == 10
    assert sent.names().count(schema.TASK_RETRAIN) == 1
    assert sent.calls[-1][1] == schema.retrain_queue_name(model_name)
    assert service.drain().steps == 0  # nothing applied while a retrain is due
    assert sent.names().count(schema.TASK_RETRAIN) == 1
    more = client.enqueue_many([[i] for i in range(30, 35)])
    report = service.retrain()
    assert report.retrained and report.rows_removed == 25
    st = client.statuses(rids + more)
    assert [s["method"] for s in st.values()] == ["newton"] * 10 + ["retrain"] * 25
    assert {s["model_version"] for s in st.values()} == {1, 2}
    persisted = core.load_model(state, device="cpu")
    assert persisted.version == 2 and persisted.n_alive == persisted.n_rows - 35
    assert reg.get_sample_value("certremove_retrains_total", {"reason": "max_removals"}) == 1
    assert reg.get_sample_value("certremove_removals_total", {"method": "retrain"}) == 25
    assert reg.get_sample_value("certremove_model_version") == 2
    assert service.stream.pending_count() == 0
    assert service.retrain().retrained is False  # a stale retrain message does nothing


def test_dead_consumer_entries_are_claimed(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(5)])
    dead = RequestStream(rclient, model_name, "dead-pod")
    dead.ensure_group()
    assert len(dead.read_new(10)) == 5  # delivered, never acknowledged
    service, _, _ = build(state, rclient, model_name, claim_idle_ms=0)
    service.drain()
    assert {s["status"] for s in client.statuses(rids).values()} == {"applied"}


def test_entries_delivered_many_times_are_never_dead_lettered_for_it(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    """Restarts and retries re-read the pending list, which Redis counts as deliveries: that is
    no fault of the entry's, so it is served as usual."""
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([7])
    own = RequestStream(rclient, model_name, "w1")
    own.ensure_group()
    own.read_new(10)
    for _ in range(30):
        own.read_own_pending(10)  # each replay counts as a delivery
    service, _, _ = build(state, rclient, model_name, max_failures=1)
    service.drain()
    st = client.status(rid)
    assert st["status"] == "applied" and st["method"] == "newton"
    assert not rclient.xrange(schema.dead_letter_key(model_name))
    assert not bool(service.model.alive[7])


def test_removal_core_would_refuse_is_rejected(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "s", n=40, d=4, max_removals=None)
    model = core.load_model(state, device="cpu")
    labels = model.dataset.y_train
    cls0 = [int(model.ids[i]) for i in range(model.n_rows) if labels[i] == labels[0]]
    client = Client(broker_url, model=model_name)
    fine = client.enqueue(
        [int(model.ids[i]) for i in range(model.n_rows) if labels[i] != labels[0]][:2]
    )
    whole_class = client.enqueue(cls0)
    service, _, _ = build(state, rclient, model_name)
    service.drain()
    st = client.statuses([fine, whole_class])
    assert st[fine]["status"] == "applied"
    assert st[whole_class]["status"] == "rejected" and "single class" in st[whole_class]["reason"]


def test_extractor_removals_remaining_and_limit(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(
        tmp_path / "s", n=200, d=4, extractor_dp=(0.1, 1e-6), extractor_limit=(1.0, 1e-4)
    )
    client = Client(broker_url, model=model_name)
    first = client.enqueue_many([[0], [1, 2]])
    service, _, reg = build(state, rclient, model_name)
    assert reg.get_sample_value("certremove_extractor_removals_remaining") == 10  # 1.0 / 0.1
    service.drain()
    assert reg.get_sample_value("certremove_extractor_removals_remaining") == 7
    too_many, small = client.enqueue_many([[3, 4, 5, 6, 7, 8, 9, 10], [11]])
    service.drain()
    st = client.statuses(first + [too_many, small])
    assert [st[r]["status"] for r in first] == ["applied", "applied"]
    assert st[too_many]["status"] == "rejected" and "extractor" in st[too_many]["reason"]
    assert st[small]["status"] == "applied" and not service.retrain_due
    assert reg.get_sample_value("certremove_extractor_removals_remaining") == 6


def test_no_extractor_no_gauge_value(state: Path, rclient: redis.Redis, model_name: str) -> None:
    service, _, reg = build(state, rclient, model_name)
    assert service.extractor_removals_remaining() is None
    assert reg.get_sample_value("certremove_extractor_removals_remaining") is None  # not exported


def test_a_deleted_stream_is_recreated(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    service, _, _ = build(state, rclient, model_name)
    rclient.delete(schema.stream_key(model_name))
    assert service.drain().steps == 0
    rid = Client(broker_url, model=model_name).enqueue([9])
    service.drain()
    assert Client(broker_url, model=model_name).status(rid)["status"] == "applied"


def test_background_retrain_takes_over_at_the_count(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    """The next epoch fits in a thread from a snapshot; at the count it takes over with a catch-up
    step and the same drain goes on: every request a Newton step, no retrain task sent."""
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    service, sent, reg = build(state, rclient, model_name, retrain_lead=0.5, max_batch=3)
    rids = client.enqueue_many([[i] for i in range(35)])
    report = service.drain()
    assert report.adopted >= 3 and not report.retrain_requested
    assert sent.names().count(schema.TASK_RETRAIN) == 0
    st = client.statuses(rids)
    assert [s["status"] for s in st.values()] == ["applied"] * 35
    assert {s["method"] for s in st.values()} == {"newton"}
    versions = [s["model_version"] for s in st.values()]
    assert versions == sorted(versions) and versions[0] == 1
    assert versions[-1] == 1 + report.adopted
    assert versions.count(1) == 10  # epoch 1 served exactly its max_removals
    # an epoch serves its max_removals minus the rows it caught up (removed after the snapshot,
    # taken once 10 - ceil(0.5 * 10) = 5 rows were used, in batches of 3): 4 or 3 rows
    assert all(6 <= versions.count(v) <= 7 for v in range(2, versions[-1]))
    persisted = core.load_model(state, device="cpu")
    assert persisted.version == versions[-1] and persisted.n_alive == persisted.n_rows - 35
    assert persisted.removed_in_epoch <= 10
    assert service.model.budget_used <= service.model.budget_total
    assert (
        reg.get_sample_value("certremove_retrains_total", {"reason": "max_removals"})
        == report.adopted
    )
    assert reg.get_sample_value("certremove_removals_total", {"method": "newton"}) == 35
    assert reg.get_sample_value("certremove_retrain_wait_seconds_count") == report.adopted
    service.close()


def test_a_background_retrain_that_cannot_take_over_falls_back_to_folding(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    service, sent, _ = build(state, rclient, model_name, retrain_lead=0.5, max_batch=3)
    real = service.model.adopt_retrain
    service.model.adopt_retrain = lambda *a, **k: None  # e.g. the catch-up did not fit
    rids = client.enqueue_many([[i] for i in range(14)])
    report = service.drain()
    assert report.retrain_requested and report.adopted == 0 and report.rows_removed == 10
    assert sent.names().count(schema.TASK_RETRAIN) == 1
    service.model.adopt_retrain = real
    assert service.retrain().retrained
    st = client.statuses(rids)
    assert [s["method"] for s in st.values()] == ["newton"] * 10 + ["retrain"] * 4
    service.close()


def test_entries_waiting_across_time_slices_are_not_counted_as_deliveries(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    """Requests behind several retrains wait through many time slices: they stay in memory, are
    never read again from the pending list, and so are never dead-lettered for it."""
    state = make_state(tmp_path / "s", max_removals=10)
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(60)])
    service, _, _ = build(
        state, rclient, model_name, retrain_lead=0.5, slice_seconds=1e-6, max_failures=1
    )
    drains, deadline = 0, time.monotonic() + 120  # a loaded machine: background fits are slow
    while service.stream.pending_count() or service.stream.has_undelivered():
        report = service.drain()
        assert report.requeued or report.steps == 0 or not service.stream.pending_count()
        drains += 1
        assert time.monotonic() < deadline, f"still waiting after {drains} drains"
    assert drains >= 5  # one step per slice: the last requests waited through many slices
    st = client.statuses(rids)
    assert [s["status"] for s in st.values()] == ["applied"] * 60
    assert not rclient.xrange(schema.dead_letter_key(model_name))
    service.close()


def test_claims_only_other_consumers_idle_entries(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    client.enqueue_many([[1], [2]])
    mine, other = RequestStream(rclient, model_name, "w1"), RequestStream(rclient, model_name, "w2")
    mine.claim_idle_ms = other.claim_idle_ms = 0
    mine.ensure_group()
    assert len(mine.read_new(1)) == 1 and len(other.read_new(1)) == 1
    claimed = mine.autoclaim(10)
    assert len(claimed) == 1  # w2's entry; its own is not claimed (and not counted) again
    counts = mine.delivery_counts([eid for eid, _ in claimed])
    assert list(counts.values()) == [2]
    own = rclient.xpending_range(mine.key, mine.group, "-", "+", 10, consumername="w1")
    assert len(own) == 2 and sorted(int(r["times_delivered"]) for r in own) == [1, 2]


def test_a_paged_pending_list_is_read_in_order_without_skipping(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    """A restarted worker replays its own pending list page by page across time slices: reads
    after an explicit id are exclusive, so no entry of the same millisecond is skipped."""
    state = make_state(tmp_path / "s", max_removals=None)
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(30)])  # one script: one millisecond
    dead = RequestStream(rclient, model_name, "w1")  # the same consumer, before a restart
    dead.ensure_group()
    assert len(dead.read_new(100)) == 30
    service, _, _ = build(state, rclient, model_name, max_batch=10, slice_seconds=1e-6)
    for _ in range(20):
        if not service.stream.pending_count():
            break
        service.drain()
    st = client.statuses(rids)
    assert [s["status"] for s in st.values()] == ["applied"] * 30
    order = sorted(rids, key=lambda r: st[r]["applied_at"])
    assert order == rids  # served in arrival order, page after page
    counts = [int(r["times_delivered"]) for r in rclient.xpending_range(
        service.stream.key, service.stream.group, "-", "+", 100)]  # fmt: skip
    assert counts == []  # all acknowledged
    service.close()
