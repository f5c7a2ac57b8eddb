"""The one-pass plan of a batch of common requests (``worker.batch._plan_common``): the same
plan as the entry-by-entry loop, on random batches mixing every case it must hand back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from tests.worker.test_plan import FakeGuard, FakeLedger, map_ids
from worker.batch import Plan, plan_batch
from worker.entries import Entry
from worker.status import Answer

N = 60
IDS = np.array([f"s{k}" for k in range(N)], dtype=object)
ALIVE = np.array([k % 7 != 3 for k in range(N)])  # rows 3, 10, 17, ... removed already


def rows_for_ids(ids: list[Any]) -> tuple[list[int], list[Any]]:
    if "boom" in ids:
        raise ValueError("cannot map")
    return map_ids(ids, N)


def _plan(entries: list[Entry], ledger: FakeLedger, guard: FakeGuard, fast: bool) -> Plan:
    return plan_batch(
        entries,
        rows_for_ids=rows_for_ids,
        alive=ALIVE,
        sample_ids=IDS,
        ledger=ledger,  # type: ignore[arg-type]
        guard=guard,  # type: ignore[arg-type]
        now=5.0,
        fast=fast,
    )


def _shape(p: Plan) -> dict[str, Any]:
    return {
        "groups": [
            (g.entry.entry_id, g.rows, g.already_removed_ids, g.unknown_ids, g.needs)
            for g in p.groups
        ],
        "answers": [(a.request_id, a.status, a.reason, a.already_removed_ids) for a in p.answers],
        "answered": [e.entry_id for e in p.answered],
        "ack_only": p.ack_only,
        "dead": [e.entry_id for e in p.dead],
        "deferred": [e.entry_id for e in p.deferred],
        "repeats": p.repeats,
    }


def _batch(rng: random.Random, n: int, twist: str) -> tuple[list[Entry], FakeLedger, FakeGuard]:
    rows = rng.sample([k for k in range(N) if ALIVE[k]], n)
    entries = [
        Entry(f"{k}-0".encode(), f"r{k}", [f"s{r}"], 1.0 + k, None, {}) for k, r in enumerate(rows)
    ]
    ledger, guard = FakeLedger(), FakeGuard(safe=True)
    k = rng.randrange(n)
    e = entries[k]
    if twist == "repeat-ledger":
        ledger.answers[e.request_id] = Answer(e.request_id, "applied", "newton", 1)  # type: ignore[index]
    elif twist == "repeat-batch":
        e.request_id = entries[(k + 1) % n].request_id
    elif twist == "no-rid":
        e.request_id = None
    elif twist == "error":
        e.error, e.sample_ids = "malformed entry: bad", None
    elif twist == "two-ids":
        e.sample_ids = [f"s{rows[k]}", f"s{rows[(k + 1) % n]}"]
    elif twist == "unknown":
        e.sample_ids = ["nope"]
    elif twist == "dead-row":
        e.sample_ids = ["s3"]
    elif twist == "same-row":
        e.sample_ids = list(entries[(k + 1) % n].sample_ids or [])
    elif twist == "raises":
        e.sample_ids = ["boom"]
    elif twist == "guard":
        guard = FakeGuard(refused={rows[k]})
    elif twist == "guard-unsafe":
        guard = FakeGuard()
    return entries, ledger, guard


TWISTS = ["none", "repeat-ledger", "repeat-batch", "no-rid", "error", "two-ids", "unknown",
          "dead-row", "same-row", "raises", "guard", "guard-unsafe"]  # fmt: skip


@pytest.mark.parametrize("twist", TWISTS)
def test_the_same_plan_as_entry_by_entry(twist: str) -> None:
    rng = random.Random(hash(twist) % 1000)
    for _ in range(30):
        n = rng.randrange(2, 40)
        entries, ledger, guard = _batch(rng, n, twist)
        fast = _plan(entries, ledger, guard, fast=True)
        slow = _plan(entries, ledger, guard, fast=False)
        assert _shape(fast) == _shape(slow)


def test_a_common_batch_takes_the_one_pass_and_others_do_not(monkeypatch) -> None:
    import worker.batch as batch

    calls: list[bool] = []
    real = batch._plan_common

    def spy(*args: Any) -> Plan | None:
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(batch, "_plan_common", spy)
    rng = random.Random(1)
    for twist, taken in [("none", True), ("repeat-ledger", False), ("dead-row", False)]:
        entries, ledger, guard = _batch(rng, 20, twist)
        p = _plan(entries, ledger, guard, fast=True)
        assert calls[-1] is taken
        if taken:
            assert [g.rows for g in p.groups] == [[int(e.sample_ids[0][1:])] for e in entries]
            assert all(g.rows is not g.needs for g in p.groups)  # separate lists, as the loop's


@pytest.mark.parametrize(
    "rows",
    [[10**6], [-1], [2.0], ["3"], [None]],
    ids=["past the mask", "negative", "float", "str", "none"],
)
def test_rows_the_loop_would_not_take_as_they_are_go_entry_by_entry(rows: list[Any]) -> None:
    """A mapping that returns rows outside the alive mask or not integers (a model and its
    mask out of step): the one-pass plan steps aside and the loop decides, never raising."""

    def odd(ids: list[Any]) -> tuple[list[Any], list[Any]]:
        return rows * len(ids), []

    entries = [Entry(b"1-0", "r1", ["s1"], 1.0, None, {})]
    for fast in (True, False):
        p = plan_batch(
            entries,
            rows_for_ids=odd,
            alive=ALIVE,
            sample_ids=IDS,
            ledger=FakeLedger(),  # type: ignore[arg-type]
            guard=FakeGuard(safe=True),  # type: ignore[arg-type]
            now=5.0,
            fast=fast,
        )
        if fast:
            got = _shape(p)
        else:
            assert _shape(p) == got
