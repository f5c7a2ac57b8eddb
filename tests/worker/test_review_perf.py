"""Review of the performance changes (read ahead, fast planning path, grouped journal): whole
drains on a real core model and a real Redis, checked end to end: every request answered once,
every row removed once (the ledger file's ``x`` lists), nothing left pending."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from producer import Client, schema
from producer.deadletters import list_dead_letters
from tests.worker.test_service import build, drain_until_idle


def _removed_in_ledger(state: Path) -> Counter[Any]:
    """How often each sample id appears in the ``x`` (removed) lists of the ledger file."""
    out: Counter[Any] = Counter()
    for line in (state / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.update(rec.get("x") or [])
    return out


def _answers_in_ledger(state: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in (state / "ledger.jsonl").read_text().splitlines():
        out.update(json.loads(line)["ids"])
    return out


def test_read_ahead_with_a_poison_entry_slice_ends_and_a_failed_read_serves_all_once(
    state: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    client = Client(broker_url, model=model_name)
    single = client.enqueue_many([[i] for i in range(100, 140)])
    mixed = client.enqueue_many([[105], [120, 121], [99_999_999], [130, 131], [141]])
    rids = single + mixed
    poison = single[13]
    rclient.delete(schema.status_key(model_name, poison))
    rclient.sadd(schema.status_key(model_name, poison), "a set, not a hash")
    service, _, _ = build(
        state, rclient, model_name, max_batch=6, max_failures=2, slice_seconds=1e-6,
        sleep=lambda s: None,
    )  # fmt: skip
    read_new = service.stream.read_new
    calls = {"n": 0}

    def flaky(count: int, block_ms: int | None = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # one read (ahead or not) meets an outage
            raise redis.ConnectionError("gone for one read")
        return read_new(count, block_ms)

    service.stream.read_new = flaky  # type: ignore[method-assign]
    drain_until_idle(service, 60)
    assert service.stream.pending_count() == 0
    others = [r for r in rids if r != poison]
    statuses = client.statuses(others)
    assert {s["status"] for s in statuses.values()} <= {"applied", "rejected"}
    assert statuses[mixed[2]]["status"] == "rejected"  # unknown id
    [letter] = list_dead_letters(rclient, model_name)
    assert letter.request_id == poison
    removed = _removed_in_ledger(state)
    assert all(n == 1 for n in removed.values()), removed  # never removed twice
    expected_rows = set(range(100, 140)) | {141}
    assert set(removed) == expected_rows
    assert not service.model.alive[sorted(expected_rows)].any()
    answered = _answers_in_ledger(state)
    assert set(others) <= set(answered)
