"""The drain's fast paths give exactly what the general code gives (oracles: the general path,
written out here or reached by making the fast path inapplicable), and the journal's grouped
records read back as the answers they were written from, old per-answer journals included."""

from __future__ import annotations

import gc
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry, Histogram

from core.guard import RemovalGuard
from core.ids import IdIndex, sample_id_key
from core.requests import alive_groups, validate_rows
from worker.batch import Plan, applied_answers, plan_batch
from worker.collector import collector_paused
from worker.entries import parse_entries, parse_entry
from worker.errors import StateDamagedError
from worker.ledger import Answer, Ledger, read_records
from worker.observe import observe_many
from worker.outbox import JOURNAL_FORMAT, Outbox
from worker.status import answer_records, answers_from_record, group_answers


# ----------------------------------------------------------------------------- entries
def _general_time(value: bytes | None) -> float | None:
    """The enqueue time as the parser read it before its bytes fast path (the oracle)."""
    if value is None:
        return None
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    try:
        at = float(text)
    except ValueError:
        return None
    return at if math.isfinite(at) else None


@pytest.mark.parametrize(
    "raw",
    [
        b"1700000000.123456",
        b" 12.5 ",
        b"1_000.5",
        b"nan",
        b"-inf",
        b"1e400",
        b"",
        b"x",
        b"\xff\xfe",
        "\uff11\uff12".encode(),  # full-width digits: a number as text, not as ASCII bytes
        "\u00a012".encode(),  # a non-breaking space around digits
    ],
)
def test_requested_at_reads_as_the_general_path_did(raw: bytes) -> None:
    e = parse_entry(b"1-0", {b"request_id": b"r", b"sample_ids": b"[1]", b"requested_at": raw})
    assert e.requested_at == _general_time(raw) or (
        e.requested_at is None and _general_time(raw) is None
    )


def test_parse_entries_matches_parse_entry_one_by_one() -> None:
    raw: list[Any] = [
        (b"1-0", {b"request_id": b"a", b"sample_ids": b"[3]", b"requested_at": b"1.5"}),
        (b"2-0", {b"request_id": b"b", b"sample_ids": b'[1, "x"]', b"replay_of": b"9-0"}),
        (b"3-0", {b"sample_ids": b"[1]"}),
        (b"4-0", None),  # deleted from the stream
        (b"5-0", {b"request_id": b"c", b"sample_ids": 5}),  # raises inside: malformed
        (b"6-0", {b"request_id": b"d", b"sample_ids": b"[-12]", b"replay_of": b""}),
    ]
    got = parse_entries(raw)
    want = [parse_entry(eid, fields or {}) for eid, fields in raw]
    assert got == want
    assert got[0].sample_ids == [3] and got[0].requested_at == 1.5
    assert got[1].replay_of == "9-0" and got[5].replay_of is None
    assert got[4].error is not None and got[4].error.startswith("malformed entry: TypeError")


# ----------------------------------------------------------------------------- ids and rows
def test_id_index_maps_as_sample_id_key_says() -> None:
    ints = IdIndex(np.array([10, 11, 12, -3], dtype=np.int64))
    rows, unknown = ints.rows_for_ids([12, "11", True, 10.0, " -3", -3, 99, np.int64(10)])
    assert rows == [2, 1, 3, 3, 0] and unknown == [True, 10.0, 99]
    strs = IdIndex(np.array(["a", "7"], dtype=object))
    rows, unknown = strs.rows_for_ids(["7", 7, "a", "b"])
    assert rows == [1, 1, 0] and unknown == ["b"]
    # the oracle: the key of each id looked up in an index keyed as sample_id_key says
    rng = random.Random(0)
    ids = np.array(rng.sample(range(-50, 50), 40), dtype=np.int64)
    index = {sample_id_key(True, v): i for i, v in enumerate(ids.tolist())}
    asked = [rng.choice([int, str])(rng.randrange(-60, 60)) for _ in range(200)]
    rows, unknown = IdIndex(ids).rows_for_ids(asked)
    assert rows == [index[sample_id_key(True, a)] for a in asked if sample_id_key(True, a) in index]
    assert unknown == [a for a in asked if sample_id_key(True, a) not in index]


def _alive_groups_oracle(
    rows: list[int], sizes: list[int], alive: torch.Tensor
) -> tuple[list[list[int]], list[int]]:
    groups, already, start = [], [], 0
    for size in sizes:
        part = rows[start : start + size]
        groups.append([r for r in part if alive[r]])
        already += [r for r in part if not alive[r]]
        start += size
    return groups, already


@pytest.mark.parametrize("dead", [[], [3, 7]])
@pytest.mark.parametrize(
    "sizes",
    # one row per request (the fast path), and as many sizes as rows that are not all ones
    [[1, 2, 0, 3], [1, 1, 1, 1, 1, 1], [0, 2, 1, 1, 1, 1], [2, 0, 1, 1, 1, 1], [6], [3, 3]],
)
def test_alive_groups_split_on_request_boundaries(dead: list[int], sizes: list[int]) -> None:
    alive = torch.ones(12, dtype=torch.bool)
    alive[dead] = False
    rows = [5, 3, 0, 7, 11, 2]
    assert alive_groups(rows, sizes, alive) == _alive_groups_oracle(rows, sizes, alive)
    assert alive_groups([], [0, 0], alive) == ([[], []], [])


@pytest.mark.parametrize(
    "rows,message",
    [([1, 12], "out of range"), ([-1], "out of range"), ([2, 2], "repeated"), ([1.5], "dtype")],
)
def test_validate_rows_still_refuses(rows: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_rows(rows, None, 12)
    assert validate_rows(np.array([4, 0], dtype=np.uint8), [1, 1], 12) == ([4, 0], [1, 1])


# ----------------------------------------------------------------------------- planning
class _Ledger:
    def __init__(self, known: dict[str, Answer]) -> None:
        self.known = known

    def seen(self, rid: str) -> Answer | None:
        a = self.known.get(rid)
        return None if a is None else Answer(**{**a.__dict__})


def _entries(n: int, rng: random.Random) -> list[Any]:
    raw = []
    for k in range(n):
        rid = f"r{rng.randrange(n)}" if rng.random() < 0.1 else f"q{k}"
        ids = [rng.randrange(0, 45)] if rng.random() < 0.8 else [rng.randrange(0, 45), "zz"]
        raw.append(
            (
                f"{k}-0".encode(),
                {b"request_id": rid.encode(), b"sample_ids": json.dumps(ids).encode()},
            )
        )
    return parse_entries(raw)


def _summary(plan: Plan) -> Any:
    return (
        [
            (g.entry.entry_id, g.rows, g.already_removed_ids, g.unknown_ids, g.needs)
            for g in plan.groups
        ],
        [
            (a.request_id, a.status, a.reason, a.unknown_ids, a.already_removed_ids)
            for a in plan.answers
        ],
        [e.entry_id for e in plan.answered],
        plan.ack_only,
        [e.entry_id for e in plan.deferred],
        plan.repeats,
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fold", [False, True])
def test_the_one_row_fast_path_plans_as_the_general_path(seed: int, fold: bool) -> None:
    """The oracle: the same batch planned with every id mapped one entry at a time through a
    mapper that also reports an unknown id, which keeps every entry off the fast path."""
    rng = random.Random(seed)
    n_rows = 40
    ids = np.array([str(i) for i in range(n_rows)], dtype=object)
    alive = np.array([rng.random() > 0.2 for _ in range(n_rows)])
    labels = np.array([int(i < 5) for i in range(n_rows)])  # a small class: the guard refuses
    index = {str(i): i for i in range(n_rows)}

    def rows_for_ids(asked: list[Any]) -> tuple[list[int], list[Any]]:
        rows = [index[str(a)] for a in asked if str(a) in index]
        return rows, [a for a in asked if str(a) not in index]

    entries = _entries(60, rng)
    known = {"r3": Answer("r3", "applied", "newton", 1, applied_at=1.0)}

    def plan(mapper: Any, guard_at_most: int | None) -> Plan:
        return plan_batch(
            entries,
            rows_for_ids=mapper,
            alive=alive,
            sample_ids=ids,
            ledger=_Ledger(known),  # type: ignore[arg-type]
            guard=RemovalGuard(labels, alive, True, guard_at_most),
            now=5.0,
            fold_overlaps=fold,
        )

    def slow(asked: list[Any]) -> tuple[list[int], list[Any]]:
        rows, unknown = rows_for_ids(asked)
        return rows, unknown + ["not-an-id"]  # never mapped in one call: entry by entry

    for at_most in (None, 10_000):  # a guard that must be asked, and a safe one
        fast, general = plan(rows_for_ids, at_most), plan(slow, at_most)
        f, g = _summary(fast), _summary(general)
        # the slow mapper adds its marker to the unknown ids of every entry it maps
        g = (
            [(e, r, a, [u for u in un if u != "not-an-id"], nd) for e, r, a, un, nd in g[0]],
            [(i, s, re, [u for u in un if u != "not-an-id"], al) for i, s, re, un, al in g[1]],
            *g[2:],
        )
        assert f == g


def test_applied_answers_carry_each_groups_sample_ids() -> None:
    entries = parse_entries(
        [(b"1-0", {b"request_id": b"a", b"sample_ids": b"[1]"}),
         (b"2-0", {b"request_id": b"b", b"sample_ids": b"[2, 3]"})]
    )  # fmt: skip
    for ids in (np.array([10, 11, 12, 13]), np.array(["w", "x", "y", "z"]),
                np.array([10, "x", np.int64(12), 13], dtype=object)):  # fmt: skip
        plan = plan_batch(
            entries,
            rows_for_ids=lambda a: ([int(i) for i in a], []),
            alive=np.ones(4, dtype=bool),
            sample_ids=ids,
            ledger=_Ledger({}),  # type: ignore[arg-type]
            guard=None,
            now=1.0,
        )
        got = [a.removed_ids for a in applied_answers(plan.groups, "newton", 2, 3.0, ids)]
        want = [[v.item() if hasattr(v, "item") else v for v in ids[g.rows]] for g in plan.groups]
        assert got == want and [type(v) for v in got[1]] == [type(v) for v in want[1]]
        assert all(type(v) in (int, str) for part in got for v in part)


# ----------------------------------------------------------------------------- journal records
def _answers() -> list[Answer]:
    return [
        Answer("a", "applied", "newton", 3, requested_at=1.0, applied_at=9.0, removed_ids=[1]),
        Answer(
            "b",
            "applied",
            "newton",
            3,
            [7],
            [],
            requested_at=None,
            applied_at=9.0,
            removed_ids=[2, "s3"],
        ),  # fmt: skip
        Answer("c", "applied", "", None, [], [5], applied_at=8.0),
        Answer("d", "rejected", reason="no", requested_at=2.5, applied_at=8.0),
        Answer("e", "rejected", reason="dead", applied_at=8.0, dead_letter=True),
        Answer("f", "applied", "newton", 3, requested_at=4.0, applied_at=9.0, removed_ids=[]),
    ]


def test_journal_records_read_back_as_their_answers() -> None:
    answers = _answers()
    records = answer_records(group_answers(answers), requested_at=True)
    assert [r["ids"] for r in records] == [["a", "b", "f"], ["c"], ["d"], ["e"]]
    assert records[0]["xn"] == [1, 2, 0] and records[0]["q"] == [1.0, None, 4.0]
    back = [a for rec in json.loads(json.dumps(records)) for a in answers_from_record(rec)]
    assert sorted(back, key=lambda a: a.request_id) == answers


def test_answer_records_are_the_ledger_lines(
    rclient: redis.Redis, model_name: str, tmp_path: Path
) -> None:
    """The ledger writes the records without ``q``: written out here as the ledger wrote them
    before records were shared with the journal, in compact JSON (``core.compact_json``) since
    2026-12-02 (lines written before, with spaces, read the same)."""
    ledger = Ledger(rclient, model_name, tmp_path / "ledger.jsonl")
    ledger.record(_answers() + [Answer("g", "applied", "newton", 1, only_if_queued=True)])
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {
        "s": "applied", "m": "newton", "v": 3, "t": 9.0, "ids": ["a", "b", "f"],
        "l": {"b": [[7], []]}, "x": [1, 2, "s3"], "xn": [1, 2, 0],
    }  # fmt: skip
    assert json.loads(lines[3]) == {
        "s": "rejected",
        "m": "",
        "v": None,
        "t": 8.0,
        "r": "dead",
        "d": 1,
        "ids": ["e"],
    }
    assert lines[0].startswith('{"s":"applied","m":"newton","v":3,"t":9.0,"ids"')
    assert [r["ids"] for r in read_records(tmp_path)] == [["a", "b", "f"], ["c"], ["d"], ["e"]]
    assert ledger.removed_ids == [1, 2, "s3"] and len(ledger) == 6


@pytest.mark.parametrize("form", ["records", "format 2", "answers"])
def test_a_journal_of_either_form_is_replayed_into_the_ledger(
    rclient: redis.Redis, model_name: str, tmp_path: Path, form: str
) -> None:
    answers = [a for a in _answers() if not a.dead_letter]
    if form in ("records", "format 2"):  # records without a format: the version before it
        journal: dict[str, Any] = {
            "records": answer_records(group_answers(answers), requested_at=True)
        }
        if form == "format 2":
            journal["format"] = JOURNAL_FORMAT
    else:  # written by earlier versions: an object per answer, every key present
        journal = {"answers": [
            {"rid": a.request_id, "s": a.status, "m": a.method, "v": a.model_version,
             "u": a.unknown_ids, "a": a.already_removed_ids, "r": a.reason,
             "q": a.requested_at, "t": a.applied_at, "x": a.removed_ids}
            for a in answers
        ]}  # fmt: skip
    ledger = Ledger(rclient, model_name, tmp_path / "ledger.jsonl")
    ledger.record([answers[0]])  # in the ledger already: not recorded twice
    got: list[Answer] = []
    ledger.listeners.append(got.extend)
    outbox = Outbox(ledger, rclient, None)  # type: ignore[arg-type]
    outbox.replay_journal(json.loads(json.dumps(journal)))
    assert [a.request_id for a in got] == ["b", "f", "c", "d"]
    assert {a.request_id: a.removed_ids for a in got} == {"b": [2, "s3"], "f": [], "c": [], "d": []}
    assert got[0].requested_at is None and got[1].requested_at == 4.0
    again = Ledger(rclient, model_name, tmp_path / "ledger.jsonl")
    for a in answers:
        seen = again.seen(a.request_id)
        assert seen is not None and seen.key() == a.key()
        assert (seen.unknown_ids, seen.already_removed_ids) == (
            a.unknown_ids,
            a.already_removed_ids,
        )


@pytest.mark.parametrize("fmt", [JOURNAL_FORMAT + 1, 0, "2", 2.0, True, None, [2]])
def test_a_journal_of_a_format_this_version_does_not_know_is_refused(
    rclient: redis.Redis, model_name: str, tmp_path: Path, fmt: Any
) -> None:
    # a newer version's journal, read in part, would lose the answers it holds: refused whole,
    # before anything is recorded
    answers = [a for a in _answers() if not a.dead_letter]
    journal = {"format": fmt, "records": answer_records(group_answers(answers))}
    ledger = Ledger(rclient, model_name, tmp_path / "ledger.jsonl")
    outbox = Outbox(ledger, rclient, None)  # type: ignore[arg-type]
    with pytest.raises(StateDamagedError, match="journal has format .*a newer certremove"):
        outbox.replay_journal(journal)
    assert len(ledger) == 0 and not (tmp_path / "ledger.jsonl").exists()


def test_a_record_of_several_requests_without_its_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        answers_from_record({"s": "applied", "ids": ["a", "b"], "x": [1, 2]})


def test_an_answer_to_json_leaves_defaults_out_and_reads_back() -> None:
    for a in _answers():
        rec = a.to_json()
        assert all(v not in ("", [], None) for v in rec.values() if v is not a.status)
        back = Answer.from_json(json.loads(json.dumps(rec)))
        assert back == Answer(**{**a.__dict__, "dead_letter": False})


# ----------------------------------------------------------------------------- metrics, gc
def test_observe_many_is_observe_one_by_one() -> None:
    amounts = [0.0, 0.004, 0.005, 0.0051, 1.0, 7.5, 59.0, 61.0, math.inf, math.nan, 0.3]
    one, many = (
        Histogram("h", "h", buckets=(0.005, 0.1, 1.0, 60.0), registry=CollectorRegistry())
        for _ in range(2)
    )
    for a in amounts:
        one.observe(a)
    observe_many(many, amounts)
    observe_many(many, [])

    def samples(h: Histogram) -> list[tuple[str, Any]]:
        return [(s.name + str(s.labels), s.value) for m in h.collect() for s in m.samples
                if not s.name.endswith("_created")]  # fmt: skip

    a, b = samples(one), samples(many)
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b, strict=True):
        assert (math.isnan(x) and math.isnan(y)) or x == y, name


def test_observe_many_on_labelled_children_and_a_parent() -> None:
    h = Histogram("h", "h", ["k"], buckets=(1.0,), registry=CollectorRegistry())
    observe_many(h.labels(k="a"), [0.5, 2.0])
    assert h.labels(k="a")._sum.get() == 2.5  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        observe_many(h, [0.5])  # the parent of labelled children cannot observe


def test_the_collector_is_paused_and_restored() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("seed", range(5))
def test_the_ledger_remembers_lists_as_recording_one_by_one_would(
    rclient: redis.Redis, model_name: str, seed: int
) -> None:
    """The oracle: a dict updated answer by answer, in the order given."""
    rng = random.Random(seed)
    ledger = Ledger(rclient, model_name, None)
    want: dict[str, tuple[list[Any], list[Any]]] = {}
    for _ in range(8):
        batch = []
        for _ in range(rng.randrange(1, 12)):
            rid = f"r{rng.randrange(10)}"
            u = [rng.randrange(99)] if rng.random() < 0.3 else []
            a = [rng.randrange(99)] if rng.random() < 0.2 else []
            batch.append(
                Answer(rid, "applied", "newton", 1, u, a, applied_at=float(rng.randrange(2)))
            )
        ledger.record(batch)
        for ans in [a for g in group_answers(batch).values() for a in g]:  # as a line each
            if ans.unknown_ids or ans.already_removed_ids:
                want[ans.request_id] = (ans.unknown_ids, ans.already_removed_ids)
            else:
                want.pop(ans.request_id, None)
        for rid in {a.request_id for a in batch}:
            seen = ledger.seen(rid)
            assert seen is not None
            assert (seen.unknown_ids, seen.already_removed_ids) == want.get(rid, ([], []))
