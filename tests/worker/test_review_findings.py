"""Faults found in review of the reliability change (real core model, real Redis, no Celery).

Each test names the promise it checks: a deletion request is never rejected because of an
infrastructure fault, never lost for replay, and the ledger stays readable after a disk fault.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

import core
from core.errors import InvalidInputError
from core.model import Model
from producer import Client, schema
from producer.deadletters import list_dead_letters, replay_dead_letters
from tests.worker.test_pipeline_retrain import features, make_service  # noqa: F401
from tests.worker.test_service import build
from worker import faults
from worker.ledger import Answer, Ledger, read_records


def test_torch_running_out_of_memory_is_an_infrastructure_fault(
    state: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch reports an allocation failure as a RuntimeError (CPU) or torch.OutOfMemoryError, a
    # RuntimeError too (CUDA), never as MemoryError: the request must wait, not be dead-lettered.
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([7])
    remove = Model.remove
    short = {"left": 3}

    def tight(self: Model, *args: Any, **kw: Any) -> Any:
        if short["left"]:
            short["left"] -= 1
            torch.empty(10**14, dtype=torch.float64)  # the real allocator failure
        return remove(self, *args, **kw)

    monkeypatch.setattr(Model, "remove", tight)
    waits: list[float] = []
    service, _, _ = build(state, rclient, model_name, max_failures=2, sleep=waits.append)
    for _ in range(3):
        service.drain()
        assert client.status(rid)["status"] == "queued"
    assert not list_dead_letters(rclient, model_name)
    service.drain()
    st = client.status(rid)
    assert st["status"] == "applied" and st["method"] == "newton"
    assert waits  # backed off instead
    assert faults.is_infrastructure(torch.OutOfMemoryError("CUDA out of memory. Tried to ..."))


def test_a_redis_fault_inside_a_script_is_an_infrastructure_fault(
    session_redis: Any, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    # Redis 6 wraps an error raised by a command inside a script: "Error running script (call to
    # f_...): @user_script:1: @user_script: 1: -OOM command not allowed ...". The status script
    # is the step that meets a full Redis first.
    if not session_redis.private:
        pytest.skip("changes the server's maxmemory")
    ledger = Ledger(rclient, model_name, None)
    old = rclient.config_get("maxmemory")["maxmemory"]
    rclient.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError) as caught:
            ledger.publish([Answer("r", schema.STATUS_APPLIED, "newton", 1, applied_at=1.0)], [])
    finally:
        rclient.config_set("maxmemory", old)
    # Redis 6 says "-OOM ..." inside the script's error text; Redis 7 with redis-py raises
    # OutOfMemoryError, whose message lacks the word
    assert "OOM" in str(caught.value) or isinstance(caught.value, redis.exceptions.OutOfMemoryError)
    assert faults.is_infrastructure(caught.value), str(caught.value)


def test_a_rotation_that_fails_after_moving_the_live_file_leaves_a_readable_ledger(
    broker_url: str, rclient: redis.Redis, model_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(rclient, model_name, path)
    ledger.record([Answer(f"a{i}", "applied", "newton", 1, applied_at=1.0) for i in range(10)])
    ledger.record([Answer("b", "applied", "newton", 1, applied_at=2.0)])
    touch = Path.touch

    def full(self: Path, *args: Any, **kw: Any) -> None:
        if self == path:
            raise OSError(errno.ENOSPC, "No space left on device")
        touch(self, *args, **kw)

    monkeypatch.setattr(Path, "touch", full)
    with pytest.raises(OSError):
        ledger.rotate()  # the segment is written and the live file moved aside; then the disk
    monkeypatch.setattr(Path, "touch", touch)
    ledger.record([Answer("c", "applied", "newton", 1, applied_at=3.0)])  # the retry
    ids = [rid for rec in read_records(tmp_path) for rid in rec["ids"]]
    assert {"a0", "a9", "b", "c"} <= set(ids)
    assert b"\x00" not in path.read_bytes()
    again = Ledger(rclient, model_name, path)
    assert again.seen("c") is not None and again.seen("b") is not None


def test_a_dead_letter_interrupted_by_redis_is_still_copied(
    state: Path,
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # When Redis drops before the copy and the XACK, the retry must still copy the entry, or the
    # request is answered "dead-lettered" with no dead letter an operator could replay.
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([8])
    remove = Model.remove
    broken = {"on": True}

    def poisoned(self: Model, rows: Any, **kw: Any) -> Any:
        if broken["on"]:
            raise RuntimeError("the step diverged on this request")  # the entry's own fault
        return remove(self, rows, **kw)

    monkeypatch.setattr(Model, "remove", poisoned)
    service, _, _ = build(state, rclient, model_name, max_failures=1, sleep=lambda s: None)
    publish = service.ledger.publish
    calls = {"n": 0}

    def drops(answers: Any, ack_ids: Any, dead: Any = None) -> None:
        if dead:
            calls["n"] += 1
            if calls["n"] == 1:
                raise redis.ConnectionError("Connection reset by peer")
        publish(answers, ack_ids, dead)

    service.ledger.publish = drops  # type: ignore[method-assign]
    assert service.drain().infrastructure_error
    service.drain()
    assert service.stream.pending_count() == 0
    st = client.status(rid)
    assert st["status"] == "rejected" and "dead-lettered" in st["reason"]
    letters = list_dead_letters(rclient, model_name)
    assert [d.request_id for d in letters] == [rid]
    broken["on"] = False  # the operator fixed the fault
    queued, refused = replay_dead_letters(rclient, model_name, [letters[0].id])
    assert queued == [rid] and not refused
    service.drain()
    assert client.status(rid)["status"] == "applied"
    assert not rclient.hlen(schema.failures_key(model_name))


def test_a_pipeline_retrain_that_cannot_read_its_images_rejects_nothing(
    tmp_path: Path,
    features: tuple[Path, Path],  # noqa: F811
    broker_url: str,
    rclient: redis.Redis,
    model_name: str,
) -> None:
    # core.images wraps an I/O error reading the source images into InvalidInputError (from the
    # OSError): a disk fault, not the requests'. They must wait, and the pipeline stay on.
    runs: list[list[int]] = []

    def pipeline(model: Any, rows: list[int]) -> Any:
        runs.append(list(rows))
        if len(runs) == 1:
            try:
                raise OSError(errno.EIO, "Input/output error")
            except OSError as exc:
                raise InvalidInputError(f"MNIST not found or unreadable ({exc})") from exc
        raise AssertionError("a second run is not needed to see the fault")

    service, sent, ds = make_service(tmp_path / "state", features[1], rclient, model_name, pipeline)
    service._sleep = lambda s: None
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[int(i)] for i in ds.ids_train[:5]])
    service.drain()
    assert service.retrain_due == "extractor"
    report = service.retrain()
    st = client.statuses(rids)
    assert [st[r]["status"] for r in rids[3:]] == ["queued", "queued"], st
    assert report.infrastructure_error
    assert service._pipeline is not None
    assert core.load_model(tmp_path / "state", device="cpu").version == 1


def test_trim_never_deletes_an_entry_delivered_while_it_looks(
    broker_url: str, rclient: redis.Redis, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another consumer (a worker losing its lease reads on until it is fenced) takes entries
    # between the trim's two looks at the group: they are pending, and must stay in the stream.
    from worker.stream import RequestStream

    client = Client(broker_url, model=model_name)
    stream = RequestStream(rclient, model_name, "w1")
    stream.ensure_group()
    rids = client.enqueue_many([[i] for i in range(5)])
    other = RequestStream(rclient, model_name, "w0")
    looks = {"xpending": rclient.xpending, "xinfo_groups": rclient.xinfo_groups}
    taken: list[Any] = []

    def between(name: str) -> Any:
        def look(*args: Any, **kw: Any) -> Any:
            result = looks[name](*args, **kw)
            if not taken:
                taken.extend(other.read_new(5))  # right after the trim's first look
            return result

        return look

    monkeypatch.setattr(rclient, "xpending", between("xpending"))
    monkeypatch.setattr(rclient, "xinfo_groups", between("xinfo_groups"))
    stream.trim(0, time.time() + 60)
    assert len(taken) == 5
    kept = {f[b"request_id"].decode() for _, f in rclient.xrange(schema.stream_key(model_name))}
    assert set(rids) <= kept


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.OutOfMemoryError(
            "command not allowed when used memory > 'maxmemory'. script: e0b9, on @user_script:31."
        ),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
    ],
)
def test_redis_py_classes_of_transient_replies_are_infrastructure(exc: Exception) -> None:
    """redis-py strips the reply's first word (OOM, READONLY) into the exception's class: the
    class alone must say "infrastructure" (Redis 7 raises it from inside the status script)."""
    assert faults.is_infrastructure(exc)
    assert not faults.is_infrastructure(redis.ResponseError("WRONGTYPE Operation against a key"))
