"""The history file (``worker/history.py``) and the overview hash (``worker/info.py``): written by
the real service on a real model and a real Redis (no Celery), bounded, torn lines tolerated, and
neither ever fails a step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

import core
from producer import Client, schema
from producer.overview import INFO_FIELDS, decode_info, read_overview
from tests.conftest import make_state
from tests.worker.test_service import build
from worker.history import HISTORY_NAME, History, history_record, read_history
from worker.info import InfoPublisher
from worker.integrity import state_contents
from worker.state_cli import app as state_app

#: every key a history line may have (no sample id, no request id, no noise)
LINE_KEYS = {
    "t",
    "event",
    "model",
    "version",
    "rows",
    "training_rows",
    "removed_in_epoch",
    "max_removals",
    "budget_used",
    "budget_limit",
    "accounting",
    "epsilon",
    "delta",
    "certified",
    "accuracy",
    "reason",
}


def lines(state: Path) -> list[dict]:
    return [json.loads(x) for x in (state / HISTORY_NAME).read_text().splitlines()]


def test_the_service_writes_a_line_per_start_and_step_and_the_info_hash(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    client.enqueue_many([[i] for i in range(30)])
    service, _, _ = build(state, rclient, model_name)
    service.drain()
    client.enqueue_many([[i] for i in range(30, 50)] + [[10**9]])
    service.drain()
    recs = lines(state)
    assert [r["event"] for r in recs] == ["start", "step", "step"]
    assert [r["rows"] for r in recs] == [0, 30, 20]
    persisted = core.load_model(state, device="cpu")
    last = recs[-1]
    assert last["model"] == model_name and last["version"] == persisted.version == 1
    assert last["training_rows"] == persisted.n_alive == 600 - 50
    assert last["removed_in_epoch"] == 50 and last["max_removals"] == 1000
    # a load re-anchors: it adds the anchor's rounding margins (about 1e-11 here) to the budget
    assert last["budget_used"] == pytest.approx(persisted.budget_used, rel=1e-6)
    assert last["budget_used"] <= persisted.budget_used
    assert last["budget_limit"] == persisted.budget_total and last["accounting"] == "exact"
    assert (last["epsilon"], last["delta"], last["certified"]) == (1.0, 1e-4, False)
    assert 0 < last["accuracy"] <= 1
    for rec in recs:
        assert set(rec) <= LINE_KEYS, rec
    text = (state / HISTORY_NAME).read_text()
    assert str(10**9) not in text and "sample" not in text  # no sample id ever

    info = decode_info(rclient.hgetall(schema.info_key(model_name)))
    assert set(info) == set(INFO_FIELDS)
    assert info["version"] == 1 and info["training_samples"] == 550
    assert info["removed_in_epoch"] == 50 and info["max_removals"] == 1000
    assert info["budget_used"] == pytest.approx(persisted.budget_used, rel=1e-6)
    assert info["budget_limit"] == persisted.budget_total
    assert info["test_accuracy"] == pytest.approx(last["accuracy"], abs=1e-6)
    assert (info["epsilon"], info["delta"], info["certified"]) == (1.0, 1e-4, False)
    assert info["device"] == "cpu" and info["accounting"] == "exact"
    assert info["last_retrain_at"] is None and info["last_retrain_reason"] is None
    assert info["consumer"] is None  # unfenced here; a worker names its consumer

    # The state checks and `certremove train` ignore the file.
    assert not any("history" in x for x in state_contents(state))
    out = CliRunner().invoke(state_app, ["verify", "--state", str(state)])
    assert out.exit_code == 0, out.output


def test_a_blocking_retrain_is_a_retrain_line_with_its_reason_and_survives_a_restart(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = make_state(tmp_path / "state", n=300, d=4, max_removals=10)
    client = Client(broker_url, model=model_name)
    client.enqueue_many([[i] for i in range(15)])
    service, _, _ = build(state, rclient, model_name, retrain_lead=0.0)
    service.drain()
    assert service.retrain_due == "max_removals"
    service.retrain()
    recs = lines(state)
    retrain = [r for r in recs if r["event"] == "retrain"]
    assert len(retrain) == 1 and retrain[0]["reason"] == "max_removals"
    assert retrain[0]["version"] == 2 and sum(r["rows"] for r in recs) == 15
    info = decode_info(rclient.hgetall(schema.info_key(model_name)))
    assert info["last_retrain_reason"] == "max_removals"
    assert info["last_retrain_at"] == pytest.approx(retrain[0]["t"], abs=1e-3)

    again, _, _ = build(state, rclient, model_name)  # a restart: appended, the retrain known
    assert [r["event"] for r in lines(state)][-1] == "start"
    assert again.served.last_retrain_reason == "max_removals"
    info = decode_info(rclient.hgetall(schema.info_key(model_name)))
    assert info["last_retrain_at"] == pytest.approx(retrain[0]["t"], abs=1e-3)


def test_the_overview_reads_the_hash_backlog_and_dead_letters(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    ov = read_overview(rclient, model_name, 1e10)
    assert ov["published"] is False and ov["version"] is None and ov["dead_letters"] == 0
    client = Client(broker_url, model=model_name)
    client.enqueue_many([[1], [2]])
    service, _, _ = build(state, rclient, model_name)
    assert read_overview(rclient, model_name, 1e10)["backlog"]["undelivered"] == 2
    service.drain()
    rclient.xadd(schema.stream_key(model_name), {"sample_ids": "[3]"})  # no request id: dead
    service.drain()
    ov = read_overview(rclient, model_name, service.served.clock())
    assert ov["published"] and ov["version"] == 1 and ov["dead_letters"] == 1
    assert ov["backlog"]["waiting"] == 0 and ov["removed_in_epoch"] == 2
    assert ov["budget_used_ratio"] == pytest.approx(ov["budget_used"] / ov["budget_limit"])
    assert ov["age_seconds"] is not None and 0 <= ov["age_seconds"] < 30


def test_torn_last_line_is_cut_and_skipped(tmp_path: Path, state: Path) -> None:
    model = core.load_model(state, device="cpu")
    path = tmp_path / HISTORY_NAME
    history = History(path)
    for i in range(3):
        rec = history_record(model, event="step", model_name="m", rows=i, now=100.0 + i)
        assert history.append(rec)
    with open(path, "ab") as f:
        f.write(b'{"t": 104, "event": "st')  # a crash mid-append
    read = read_history(path)
    assert len(read.records) == 3 and read.skipped == 1
    reopened = History(path)  # cut at open, so the next line is whole
    assert path.read_bytes().endswith(b"\n")
    reopened.append(history_record(model, event="retrain", model_name="m", rows=1, now=105.0))
    read = read_history(path)
    assert [r["event"] for r in read.records] == ["step", "step", "step", "retrain"]
    assert read.skipped == 0 and History(path).last_retrain is not None

    # a partial line a failed write left behind is cut before the next append
    with open(path, "ab") as f:
        f.write(b'{"partial')
    reopened.append(history_record(model, event="step", model_name="m", rows=1, now=106.0))
    assert read_history(path).skipped == 0 and len(read_history(path).records) == 5


def test_compaction_bounds_the_file_keeps_retrains_and_summarises(
    tmp_path: Path, state: Path
) -> None:
    model = core.load_model(state, device="cpu")
    path = tmp_path / HISTORY_NAME
    history = History(path, max_lines=200)
    base = history_record(model, event="step", model_name="m", rows=1, now=0.0)
    total = 0
    for i in range(2000):
        version = 1 + i // 50
        event = "retrain" if i % 50 == 0 and i else "step"
        rec = {**base, "t": float(i), "event": event, "version": version}
        if event == "retrain":
            rec["reason"] = "max_removals"
        history.append(rec)
        total += 1
    data = path.read_text().splitlines()
    assert len(data) <= 201
    read = read_history(path)
    assert read.summary is not None and read.summary["since"] == 0.0
    assert read.summary["compactions"] >= 1
    assert read.summary["dropped_lines"] + len(read.records) == total
    ts = [r["t"] for r in read.records]
    assert ts == sorted(ts) and ts[-1] == 1999.0
    newest = [r["t"] for r in read.records[-100:]]
    assert newest == [float(t) for t in range(1900, 2000)]  # the newest half, as written
    older = read.records[:-100]
    assert any(r["event"] == "retrain" for r in older)  # retrains outlive the steps


def test_a_history_that_cannot_be_written_never_raises(
    tmp_path: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = core.load_model(state, device="cpu")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    history = History(blocker / HISTORY_NAME)
    rec = history_record(model, event="step", model_name="m", rows=1, now=1.0)
    with caplog.at_level(logging.WARNING, logger="certremove.worker"):
        assert history.append(rec) is False
        assert history.append(rec) is False
    assert sum("history file" in r.getMessage() for r in caplog.records) == 1  # once per streak


def test_an_unreachable_redis_never_fails_the_overview_write(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert InfoPublisher(gone, model_name).publish({"version": 1}) is False
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([5])
    service, _, _ = build(state, rclient, model_name)
    service.served.info = InfoPublisher(gone, model_name)
    report = service.drain()
    assert report.steps == 1 and client.status(rid)["status"] == "applied"


def test_a_line_with_wrong_types_is_skipped_by_reads_compaction_and_report(
    tmp_path: Path, state: Path
) -> None:
    # Valid JSON, wrong types (a hand edit, a damaged disk block): skipped like a torn line, so
    # `certremove report` draws the rest, compaction keeps working and the worker's start does
    # not take a text as the last retrain's time.
    from worker.report import write_report

    model = core.load_model(state, device="cpu")
    path = tmp_path / HISTORY_NAME
    history = History(path, max_lines=20)
    good = history_record(model, event="step", model_name="m", rows=1, now=100.0)
    assert history.append(good)
    with open(path, "ab") as f:
        f.write(b'{"t": "x", "event": "retrain", "version": "a", "reason": "budget"}\n')
        f.write(b'{"t": 101, "event": "step", "version": 1, "rows": true}\n')
    read = read_history(path)
    assert len(read.records) == 1 and read.skipped == 2
    assert History(path).last_retrain is None
    summary = write_report(tmp_path, tmp_path / "report.png")
    assert summary["lines"] == 1 and (tmp_path / "report.png").stat().st_size > 0
    for i in range(40):  # past max_lines: compaction runs and bounds the file
        assert history.append({**good, "t": 102.0 + i})
    assert len(path.read_text().splitlines()) <= 21
