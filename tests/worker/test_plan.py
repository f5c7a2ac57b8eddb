"""Batch planning, table-driven: ``worker.batch.plan_batch`` and the ``Plan`` methods.

No Redis, no model: ids map to rows by a dict, the ledger and the guard are small fakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from producer import schema
from worker.batch import Plan, plan_batch
from worker.entries import Entry
from worker.status import Answer

N = 10
#: sample id "s<k>" is row k; rows 8 and 9 are removed already
IDS = np.array([f"s{k}" for k in range(N)], dtype=object)
ALIVE = np.array([True] * 8 + [False] * 2)
NOW = 100.0


def map_ids(ids: list[Any], n: int) -> tuple[list[int], list[Any]]:
    """Sample id "s<k>" is row k of ``n`` rows; anything else is unknown."""
    rows, unknown = [], []
    for i in ids:
        if isinstance(i, str) and i.startswith("s") and i[1:].isdigit() and int(i[1:]) < n:
            rows.append(int(i[1:]))
        else:
            unknown.append(i)
    return rows, unknown


def rows_for_ids(ids: list[Any]) -> tuple[list[int], list[Any]]:
    return map_ids(ids, N)


@dataclass
class FakeLedger:
    answers: dict[str, Answer] = field(default_factory=dict)

    def seen(self, rid: str) -> Answer | None:
        a = self.answers.get(rid)
        return None if a is None else Answer(**{**a.__dict__})

    def knows_any(self, rids: list[str]) -> bool:
        return not self.answers.keys().isdisjoint(rids)


@dataclass
class FakeGuard:
    """Refuses any removal that touches a row in ``refused``; ``safe``: can refuse nothing
    (``core.guard.RemovalGuard.safe``, which lets a batch be planned in one pass)."""

    refused: set[int] = field(default_factory=set)
    safe: bool = False

    def refuse(self, rows: list[int]) -> str | None:
        return "would leave one class" if self.refused.intersection(rows) else None


def entry(
    n: int,
    rid: str | None,
    ids: list[Any] | None,
    *,
    error: str | None = None,
    replay_of: str | None = None,
) -> Entry:
    return Entry(f"{n}-0".encode(), rid, ids, 1.0, error, {}, replay_of)


def plan(
    entries: list[Entry],
    *,
    ledger: FakeLedger | None = None,
    guard: FakeGuard | None = None,
    fold: bool = False,
    excluded: set[Any] | None = None,
) -> Plan:
    return plan_batch(
        entries,
        rows_for_ids=rows_for_ids,
        alive=ALIVE,
        sample_ids=IDS,
        ledger=ledger or FakeLedger(),  # type: ignore[arg-type]
        guard=guard or FakeGuard(),  # type: ignore[arg-type]
        now=NOW,
        fold_overlaps=fold,
        is_excluded=(lambda i: i in excluded) if excluded else None,
    )


def summary(p: Plan) -> dict[str, Any]:
    """What a plan decided, by request id."""
    return {
        "groups": {g.entry.request_id: g.rows for g in p.groups},
        "answers": {a.request_id: (a.status, a.reason[:20]) for a in p.answers},
        "ack_only": [eid.decode() for eid in p.ack_only],
        "dead": [e.entry_id.decode() for e in p.dead],
        "deferred": [e.request_id for e in p.deferred],
        "repeats": p.repeats,
    }


APPLIED_BEFORE = Answer("old", schema.STATUS_APPLIED, schema.METHOD_NEWTON, 1, applied_at=5.0)
DEAD_BEFORE = Answer("dl", schema.STATUS_REJECTED, reason="dead-lettered: x", dead_letter=True)

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "two plain requests become two groups",
        {"entries": [entry(1, "a", ["s0"]), entry(2, "b", ["s1", "s2"])]},
        {"groups": {"a": [0], "b": [1, 2]}},
    ),
    (
        "a request id repeated within the batch is acknowledged only",
        {"entries": [entry(1, "a", ["s0"]), entry(2, "a", ["s0"])]},
        {"groups": {"a": [0]}, "ack_only": ["2-0"], "repeats": 1},
    ),
    (
        "a request id the ledger answered is answered again from it",
        {"entries": [entry(1, "old", ["s0"])], "ledger": FakeLedger({"old": APPLIED_BEFORE})},
        {"answers": {"old": ("applied", "")}, "repeats": 1},
    ),
    (
        "a dead-lettered request id is a repeat ...",
        {"entries": [entry(1, "dl", ["s0"])], "ledger": FakeLedger({"dl": DEAD_BEFORE})},
        {"answers": {"dl": ("rejected", "dead-lettered: x")}, "repeats": 1},
    ),
    (
        "... unless an operator replayed the dead letter: served as new",
        {
            "entries": [entry(1, "dl", ["s0"], replay_of="9-0")],
            "ledger": FakeLedger({"dl": DEAD_BEFORE}),
        },
        {"groups": {"dl": [0]}},
    ),
    (
        "an entry without a request id is dead-lettered",
        {"entries": [entry(1, None, ["s0"])]},
        {"dead": ["1-0"]},
    ),
    (
        "an invalid entry is rejected with its error",
        {"entries": [entry(1, "a", None, error="malformed entry")]},
        {"answers": {"a": ("rejected", "malformed entry")}},
    ),
    (
        "a request with no known id is rejected",
        {"entries": [entry(1, "a", ["nope"])]},
        {"answers": {"a": ("rejected", "no known sample id i")}},
    ),
    (
        "a request whose ids are all removed already is applied at once",
        {"entries": [entry(1, "a", ["s8", "s9"])]},
        {"answers": {"a": ("applied", "")}},
    ),
    (
        "an id a full-pipeline retrain excluded counts as removed already",
        {"entries": [entry(1, "a", ["gone"])], "excluded": {"gone"}},
        {"answers": {"a": ("applied", "")}},
    ),
    (
        "an overlap defers the request and everything after it",
        {"entries": [entry(1, "a", ["s0", "s1"]), entry(2, "b", ["s1"]), entry(3, "c", ["s5"])]},
        {"groups": {"a": [0, 1]}, "deferred": ["b", "c"]},
    ),
    (
        "a retrain folds an overlap: only the new rows are the group's",
        {
            "entries": [entry(1, "a", ["s0", "s1"]), entry(2, "b", ["s1", "s2"])],
            "fold": True,
        },
        {"groups": {"a": [0, 1], "b": [2]}},
    ),
    (
        "the guard refuses a request: rejected, the rest go on",
        {"entries": [entry(1, "a", ["s3"]), entry(2, "b", ["s4"])], "guard": FakeGuard({3})},
        {"groups": {"b": [4]}, "answers": {"a": ("rejected", "would leave one clas")}},
    ),
    (
        "a request mapping that raises is rejected alone",
        {"entries": [entry(1, "a", [object()]), entry(2, "b", ["s4"])]},
        {"groups": {"b": [4]}, "answers": {"a": ("rejected", "no known sample id i")}},
    ),
]


@pytest.mark.parametrize(("name", "given", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plan_batch(name: str, given: dict[str, Any], expected: dict[str, Any]) -> None:
    got = summary(plan(given.pop("entries"), **given))
    want = {"groups": {}, "answers": {}, "ack_only": [], "dead": [], "deferred": [], "repeats": 0}
    assert got == {**want, **expected}


def test_an_unknown_id_next_to_a_known_one_is_reported() -> None:
    p = plan([entry(1, "a", ["s0", "nope"])])
    assert [(g.rows, g.unknown_ids) for g in p.groups] == [([0], ["nope"])]


def test_already_removed_ids_ride_with_the_group() -> None:
    p = plan([entry(1, "a", ["s0", "s9"])])
    assert [(g.rows, g.already_removed_ids) for g in p.groups] == [([0], ["s9"])]


# ---------------------------------------------------------------- Plan methods
def three() -> Plan:
    return plan([entry(1, "a", ["s0"]), entry(2, "b", ["s1", "s2"]), entry(3, "c", ["s3"])])


def test_rows_sizes_and_acknowledged() -> None:
    p = plan([entry(1, "a", ["s0"]), entry(2, "a", ["s0"]), entry(3, "b", ["s1", "s2"])])
    assert (p.rows, p.sizes) == ([0, 1, 2], [1, 2])
    assert p.acknowledged == [b"2-0"]
    assert p.served == 0


def test_reject_and_reject_all() -> None:
    p = three()
    p.reject(p.groups[0], "core said no", NOW)
    assert [(a.request_id, a.status, a.reason) for a in p.answers] == [
        ("a", "rejected", "core said no")
    ]
    p.reject_all("refused", NOW)
    assert p.groups == []
    assert [a.request_id for a in p.answers] == ["a", "a", "b", "c"]
    assert p.acknowledged == [b"1-0", b"1-0", b"2-0", b"3-0"]


def test_commit_certify_and_defer() -> None:
    p = plan([entry(1, "a", ["s0"]), entry(2, "b", ["s1", "s2"]), entry(3, "c", ["s5", "s1"])])
    assert [e.request_id for e in p.deferred] == ["c"]
    answers = p.commit(p.groups[:1], schema.METHOD_NEWTON, 7, NOW, IDS)
    assert [(a.request_id, a.method, a.model_version, a.removed_ids) for a in answers] == [
        ("a", "newton", 7, ["s0"])
    ]
    p.certify(NOW + 1)
    assert [a.applied_at for a in p.committed] == [NOW + 1]
    p.defer(p.groups[1:])
    assert [e.request_id for e in p.deferred] == ["b", "c"]
    assert p.acknowledged == [b"1-0"]
    assert p.served == 1


@pytest.mark.parametrize(
    ("left", "wait", "kept", "rejected", "waiting"),
    [
        (10, False, {"a": [0], "b": [1, 2], "c": [3]}, [], []),
        (3, False, {"a": [0], "b": [1, 2]}, ["c"], []),
        # rejected groups do not hold later ones back; waiting ones do (arrival order)
        (2, False, {"a": [0], "c": [3]}, ["b"], []),
        (2, True, {"a": [0]}, [], ["b", "c"]),
        (0, True, {}, [], ["a", "b", "c"]),
    ],
)
def test_limit_to_the_extractor_allowance(
    left: int, wait: bool, kept: dict[str, list[int]], rejected: list[str], waiting: list[str]
) -> None:
    p = three()
    out = p.limit(left, wait=wait, reason="spent", now=NOW)
    assert {g.entry.request_id: g.rows for g in p.groups} == kept
    assert [a.request_id for a in p.answers] == rejected
    assert all(a.reason == "spent" for a in p.answers)
    assert [e.request_id for e in out] == waiting


def test_limit_hands_shared_rows_to_a_kept_group() -> None:
    # folded (a retrain): b shares row 1 with a; when a is dropped, b needs row 1 itself
    p = plan([entry(1, "a", ["s0", "s1"]), entry(2, "b", ["s1", "s2"])], fold=True)
    assert [g.rows for g in p.groups] == [[0, 1], [2]]
    p.groups = p.groups[1:]  # as if a had been answered already
    p.limit(5, wait=False, reason="spent", now=NOW)
    assert [g.rows for g in p.groups] == [[1, 2]]
