"""The removal service under bad entries, overlapping retrains, the DP extractor's allowance, a
failed reload and dead letters (real core model, real Redis, no Celery)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import core
from producer import Client, schema
from tests.conftest import make_state
from tests.worker.test_service import build
from worker.errors import ServiceStoppedError


def alive(state: Path, sample_id: int) -> bool:
    model = core.load_model(state, device="cpu")
    return bool(model.alive[model.rows_for_ids([sample_id])[0][0]])


def test_an_unreadable_entry_is_rejected_and_the_model_goes_on(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rclient.xadd(
        schema.stream_key(model_name), {"request_id": "huge", "sample_ids": f"[{'9' * 5000}]"}
    )
    ok = client.enqueue([4])
    service, _, _ = build(state, rclient, model_name)
    service.drain()
    st = client.statuses(["huge", ok])
    assert st["huge"]["status"] == "rejected" and "not JSON" in st["huge"]["reason"]
    assert st[ok]["status"] == "applied"
    assert service.stream.pending_count() == 0
    later = client.enqueue([5])
    service.drain()
    assert client.status(later)["status"] == "applied"


def test_an_entry_whose_planning_raises_is_rejected_alone(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    a, poison, b = client.enqueue_many([[1], ["boom"], [2]])
    service, _, _ = build(state, rclient, model_name)
    rows_for_ids = service.model.rows_for_ids

    def fragile(ids: list[Any]) -> Any:
        if "boom" in ids:
            raise RuntimeError("cannot map 'boom'")
        return rows_for_ids(ids)

    service.model.rows_for_ids = fragile
    service.drain()
    st = client.statuses([a, poison, b])
    assert st[a]["status"] == st[b]["status"] == "applied"
    assert st[poison]["status"] == "rejected" and "cannot map 'boom'" in st[poison]["reason"]
    assert service.stream.pending_count() == 0


def test_a_retrain_never_applies_a_request_on_rows_of_a_dropped_one(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    # the extractor covers 10 rows, max_removals 2 sends the batch after the first to a retrain
    state = make_state(
        tmp_path / "s", n=200, d=4, max_removals=2,
        extractor_dp=(0.1, 1e-6), extractor_limit=(1.0, 1e-4),
    )  # fmt: skip
    client = Client(broker_url, model=model_name)
    first, small, big, overlap = client.enqueue_many([[0, 1], [2], list(range(3, 12)), [3]])
    service, _, _ = build(state, rclient, model_name, retrain_lead=0.0)
    service.drain()
    assert service.retrain_due == "max_removals"
    service.retrain()  # 8 rows left: `small` fits, `big` (9) does not, `overlap` shares row 3
    st = client.statuses([first, small, big, overlap])
    assert st[small]["status"] == "applied" and st[small]["method"] == "retrain"
    assert st[big]["status"] == "rejected" and "extractor" in st[big]["reason"]
    assert st[overlap]["status"] == "applied" and st[overlap]["method"] == "retrain"
    assert not alive(state, 3) and alive(state, 4)  # row 3 really went, with `overlap`
    assert service.stream.pending_count() == 0


def test_a_retrain_guards_overlapping_requests(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "s", n=40, d=4, max_removals=1)
    model = core.load_model(state, device="cpu")
    labels = model.dataset.y_train
    ids = [int(i) for i in model.ids]
    ones = [ids[i] for i in range(model.n_rows) if labels[i] == labels[0]]
    others = [ids[i] for i in range(model.n_rows) if labels[i] != labels[0]]
    client = Client(broker_url, model=model_name)
    # `whole` shares a row with `fine` and would leave a single class
    first, fine, whole = client.enqueue_many([[others[0]], [others[1]], [others[1]] + ones])
    service, _, _ = build(state, rclient, model_name, retrain_lead=0.0)
    service.drain()
    assert service.retrain_due == "max_removals"
    service.retrain()
    st = client.statuses([first, fine, whole])
    assert st[fine]["status"] == "applied" and st[fine]["method"] == "retrain"
    assert st[whole]["status"] == "rejected" and "single class" in st[whole]["reason"]


def fake_pipeline(runs: list[list[int]]) -> Any:
    """A stand-in for ``core.pipeline.retrain_pipeline``: the head on the rows left, the removed
    ids recorded in the new dataset's ``meta["excluded_ids"]``."""

    def run(model: Any, rows: list[int]) -> tuple[Any, Any]:
        runs.append(list(rows))
        ds = model.dataset
        dead = ~model.alive.cpu().numpy()
        dead[rows] = True
        gone = set(ds.meta.get("excluded_ids", [])) | {int(i) for i in ds.ids_train[dead]}
        keep = torch_mask(~dead)
        new_ds = core.Dataset(
            ds.X_train[keep], ds.y_train[keep], ds.ids_train[~dead], ds.X_test, ds.y_test,
            meta={**ds.meta, "excluded_ids": sorted(gone)},
        )  # fmt: skip
        h = model.hyper
        new = core.train(new_ds.X_train, new_ds.y_train, ids=new_ds.ids_train, seed=0,
                         device="cpu", max_removals=h.max_removals, extractor_dp=h.extractor_dp,
                         extractor_limit=h.extractor_limit)  # fmt: skip
        new.version = model.version + 1
        new.dataset = new_ds
        return new_ds, new

    return run


def torch_mask(mask: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(mask)


def test_a_head_retrain_leaves_requests_past_the_extractor_to_the_pipeline(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(
        tmp_path / "s", n=200, d=4, max_removals=2,
        extractor_dp=(0.1, 1e-6), extractor_limit=(1.0, 1e-4),
    )  # fmt: skip
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[0, 1], [2], list(range(3, 12)), [12]])
    first, small, big, after = rids
    runs: list[list[int]] = []
    service, sent, _ = build(state, rclient, model_name, pipeline=fake_pipeline(runs),
                             pipeline_off_reason="no source data is configured", retrain_lead=0.0)  # fmt: skip
    service.drain()
    assert service.retrain_due == "max_removals"
    report = service.retrain()  # a head retrain: `big` does not fit the extractor, `after` waits
    st = client.statuses(rids)
    assert st[small]["status"] == "applied" and st[small]["method"] == "retrain"
    assert st[big]["status"] == st[after]["status"] == "queued"
    assert service.stream.pending_count() == 2
    assert service.retrain_due == "extractor" and report.retrain_requested
    assert sent.names().count(schema.TASK_RETRAIN) == 2
    assert not runs
    service.retrain()  # the full-pipeline retrain
    st = client.statuses(rids)
    assert [st[r]["status"] for r in rids] == ["applied"] * 4
    assert all("no source data" not in st[r].get("reason", "") for r in rids)
    assert len(runs) == 1 and len(runs[0]) == 10
    assert service.stream.pending_count() == 0 and not service.retrain_due
    # 7: ids a pipeline retrain excluded are removed already, not unknown
    again = client.enqueue([5, 0])
    service.drain()
    st = client.status(again)
    assert st["status"] == "applied" and sorted(st["already_removed_ids"]) == [0, 5]


def test_ids_excluded_from_the_data_count_as_removed(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    ds = core.load_dataset("synthetic:n=200,d=4,classes=2,seed=0")
    ds.meta["excluded_ids"] = [10_000, 10_001]
    model = core.train(ds.X_train, ds.y_train, ids=ds.ids_train, seed=0, device="cpu")
    model.save(tmp_path / "s", dataset=ds)
    client = Client(broker_url, model=model_name)
    gone, mixed, text, unknown = client.enqueue_many([[10_000], [10_001, 5], ["10000"], [99_999]])
    service, _, _ = build(tmp_path / "s", rclient, model_name)
    service.drain()
    st = client.statuses([gone, mixed, text, unknown])
    assert st[gone]["status"] == "applied" and st[gone]["already_removed_ids"] == [10_000]
    assert st[mixed]["status"] == "applied" and st[mixed]["already_removed_ids"] == [10_001]
    assert st[mixed]["method"] == "newton" and not bool(service.model.alive[5])
    assert st[text]["status"] == "applied" and st[text]["already_removed_ids"] == ["10000"]
    assert st[unknown]["status"] == "rejected"


def test_a_dead_letter_keeps_an_answer_the_ledger_holds(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    """An entry whose status hash is of another Redis type makes every status script fail: it is
    isolated, counted and dead-lettered (its applied answer, recorded before, stays the answer
    in the ledger), and the requests around it flow."""
    client = Client(broker_url, model=model_name)
    before, rid, after = client.enqueue_many([[1], [7], [2]])
    key = schema.status_key(model_name, rid)
    rclient.delete(key)
    rclient.rpush(key, "not a hash")
    service, _, reg = build(state, rclient, model_name, max_failures=3)
    for _ in range(5):
        service.drain()
    st = client.statuses([before, after])
    assert st[before]["status"] == st[after]["status"] == "applied"
    dead = rclient.xrange(schema.dead_letter_key(model_name))
    assert len(dead) == 1 and dead[0][1][b"request_id"] == rid.encode()
    assert b"WRONGTYPE" in dead[0][1][b"reason"]
    assert service.stream.pending_count() == 0
    assert reg.get_sample_value("certremove_entry_failures_total") == 3
    assert not rclient.exists(schema.failures_key(model_name))
    seen = service.ledger.seen(rid)
    assert seen is not None and seen.status == "applied" and seen.method == "newton"
    assert not bool(service.model.alive[7])  # removed once, never twice
    later = client.enqueue([3])
    service.drain()
    assert client.status(later)["status"] == "applied"


def test_a_dead_letter_is_never_acknowledged_before_its_copy(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    rclient.xadd(schema.stream_key(model_name), {"sample_ids": "[1]"})  # no request id
    rclient.set(schema.dead_letter_key(model_name), "not a stream")  # the XADD fails
    service, _, _ = build(state, rclient, model_name, max_failures=2)
    with pytest.raises(redis.ResponseError):
        for _ in range(4):
            service.drain()
    assert service.stream.pending_count() == 1  # not acknowledged: it is dead-lettered later
    rclient.delete(schema.dead_letter_key(model_name))
    service.drain()
    service.drain()
    assert service.stream.pending_count() == 0
    assert len(rclient.xrange(schema.dead_letter_key(model_name))) == 1


def test_a_failed_reload_stops_the_service(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([3])
    fatal: list[BaseException] = []

    def reload() -> Any:
        raise OSError("state unreadable")

    service, _, _ = build(state, rclient, model_name, reload=reload, on_fatal=fatal.append)

    def save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    service.model.save = save  # the step ran in memory; persisting it fails
    with pytest.raises(OSError, match="disk full"):
        service.drain()
    assert len(fatal) == 1 and "state unreadable" in str(fatal[0])
    for serve in (service.drain, service.retrain):
        with pytest.raises(ServiceStoppedError):
            serve()
    assert client.status(rid)["status"] == "queued"  # never answered from the unsaved model
    assert service.stream.pending_count() == 1


def test_the_default_on_fatal_exits_the_process() -> None:
    code = "from worker.service import exit_process; exit_process(OSError('x')); print('alive')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1 and "alive" not in done.stdout
