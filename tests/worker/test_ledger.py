from __future__ import annotations

from pathlib import Path

import redis

from producer import Client, schema
from worker.ledger import Answer, Ledger
from worker.stream import RequestStream


def test_publish_writes_statuses_and_acks(
    broker_url: str, rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[1], [2]])
    stream = RequestStream(rclient, model_name, "c")
    stream.ensure_group()
    entries = stream.read_new(10)
    assert stream.pending_count() == 2
    ledger = Ledger(rclient, model_name, tmp_path / "ledger.jsonl")
    answers = [
        Answer(rids[0], "applied", "newton", 4, [], [7], requested_at=1.0, applied_at=2.0),
        Answer(rids[1], "rejected", reason="bad", applied_at=2.0),
    ]
    ledger.record(answers)
    ledger.publish(answers, [eid for eid, _ in entries])
    assert stream.pending_count() == 0
    st = client.status(rids[0])
    assert st["status"] == "applied" and st["method"] == "newton" and st["model_version"] == 4
    assert st["already_removed_ids"] == [7] and st["unknown_ids"] == []
    assert st["applied_at"] == 2.0
    assert client.status(rids[1])["reason"] == "bad"


def test_only_if_queued_never_overwrites_a_final_status(
    broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    ledger = Ledger(rclient, model_name, None)
    key = schema.status_key(model_name, "r1")
    rclient.hset(key, mapping={"status": "applied", "method": "retrain"})
    ledger.publish([Answer("r1", "applied", "newton", 1, only_if_queued=True)], [])
    assert rclient.hget(key, "method") == b"retrain"
    rclient.hset(key, "status", "queued")
    ledger.publish([Answer("r1", "applied", "newton", 1, only_if_queued=True)], [])
    assert rclient.hget(key, "method") == b"newton"


def test_ledger_file_survives_a_restart(
    rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger(rclient, model_name, path).record(
        [Answer("a", "applied", "newton", 2, applied_at=5.0), Answer("b", "rejected", reason="x")]
    )
    with open(path, "a") as f:
        f.write('{"s": "applied", "ids": ["torn')  # a crash mid-append
    again = Ledger(rclient, model_name, path)
    assert len(again) == 2
    seen = again.seen("a")
    assert (
        seen is not None
        and seen.only_if_queued
        and (seen.method, seen.model_version) == ("newton", 2)
    )
    assert again.seen("b").status == "rejected"  # type: ignore[union-attr]
    assert again.seen("zzz") is None


def test_a_torn_last_line_is_cut_so_the_next_record_survives(
    rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger(rclient, model_name, path).record([Answer("a", "applied", "newton", 2, applied_at=5.0)])
    with open(path, "a") as f:
        f.write('{"s": "applied", "ids": ["torn')  # a crash mid-append
    Ledger(rclient, model_name, path).record([Answer("b", "applied", "newton", 3, applied_at=6.0)])
    assert path.read_text().endswith("\n")
    again = Ledger(rclient, model_name, path)
    assert len(again) == 2 and again.seen("b") is not None


def test_a_replayed_rejection_keeps_its_reason(
    broker_url: str, rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger(rclient, model_name, path).record(
        [Answer("r", "rejected", reason="oversized request", applied_at=1.0)]
    )
    seen = Ledger(rclient, model_name, path).seen("r")
    assert seen is not None and seen.reason == "oversized request"
    Ledger(rclient, model_name, None).publish([seen], [])  # status missing: written again
    assert Client(broker_url, model=model_name).status("r")["reason"] == "oversized request"
