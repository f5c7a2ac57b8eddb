"""core.compact_json: orjson for plain JSON values, the json module for the rest; the same
values back through ``json.loads`` either way, and what the json module refused still refused
(a NaN, a datetime, a UUID, an Enum, a dataclass: orjson would have written each)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from core import compact_json
from core.steplog import encode_record, log_path, read_log


def _same(obj: object) -> None:
    out = compact_json.dumps(obj)
    assert isinstance(out, bytes)
    assert json.loads(out) == obj
    assert json.loads(out) == json.loads(json.dumps(obj))


@pytest.mark.parametrize(
    "obj",
    [
        {"s": "applied", "m": "newton", "v": 3, "t": 1764669000.123456, "ids": ["a", "b"]},
        {"q": [1764669000.1 + k * 1e-6 for k in range(1000)], "x": list(range(1000))},
        {"text": 'größe 東京 \u2028 "quoted" \\ back', "none": None, "b": [True, False]},
        {"small": 5e-324, "big": 1.7976931348623157e308, "neg": -0.0, "e": 1e16},
        {"nested": {"l": {"r1": [[7], []]}}, "tuple": (1, 2)},
        [],
    ],
)
def test_values_round_trip_as_with_the_json_module(obj: object) -> None:
    if isinstance(obj, dict) and "tuple" in obj:
        out = json.loads(compact_json.dumps(obj))
        assert out == json.loads(json.dumps(obj))  # a tuple is an array in both
        return
    _same(obj)


def test_compact_and_in_the_callers_key_order() -> None:
    out = compact_json.dumps({"z": 1, "a": [1, 2], "m": "x"})
    assert out == b'{"z":1,"a":[1,2],"m":"x"}'
    assert b" " not in compact_json.dumps({"k": list(range(50))})


def test_what_orjson_refuses_goes_through_the_json_module() -> None:
    big = {"x": [10**30, -(10**25)]}  # past 64 bits: orjson refuses, json writes it
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(big)
    assert json.loads(compact_json.dumps(big)) == big
    keyed = {1: "a", 2: "b"}  # non-string keys: json writes them as strings
    assert json.loads(compact_json.dumps(keyed)) == {"1": "a", "2": "b"}


class Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "bad",
    [
        {"o": object()},
        {"n": np.int64(3)},
        {"s": {1, 2}},
        {"t": datetime.date(2020, 1, 1)},
        {"u": uuid.UUID(int=5)},
        {"e": Colour.RED},
        {"p": Point(1)},
        [Point(2)],
    ],
)
def test_what_the_json_module_refused_is_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        json.dumps(bad)  # the oracle
    with pytest.raises(TypeError):
        compact_json.dumps(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"n": float("nan")},
        {"q": [1.5, None, float("inf")]},
        {"q": (float("-inf"),)},
        [[1.0, float("nan")]],
        {"q": [float("inf"), float("-inf")]},
    ],
)
def test_non_finite_floats_are_refused_unless_allowed(bad: object) -> None:
    with pytest.raises(ValueError):
        compact_json.dumps(bad)
    allowed = compact_json.dumps(bad, allow_nan=True)  # as json.dumps(allow_nan=True) writes
    assert allowed == json.dumps(bad, separators=(",", ":")).encode()


def test_large_finite_floats_whose_sum_overflows_are_plain() -> None:
    big = {"q": [1.7e308, 1.7e308, -5.0]}
    assert json.loads(compact_json.dumps(big)) == big


def test_subclasses_of_str_and_int_are_written_as_the_json_module_writes_them() -> None:
    class Name(str):
        pass

    class Count(int):
        pass

    obj = {"s": Name("a"), "n": Count(3), "l": [Name("b")]}
    assert json.loads(compact_json.dumps(obj)) == {"s": "a", "n": 3, "l": ["b"]}


def test_a_step_log_record_with_such_a_journal_reads_back(tmp_path: Path) -> None:
    """The record's header: the state by the json module, the journal by compact_json; a
    reader gets both back (and a non-finite state is still refused)."""
    journal = {
        "format": 2,
        "records": [
            {"s": "applied", "ids": ["r1", "r\u00e9"], "x": [10**30, "s\u00f8"], "xn": [1, 1],
             "q": [1764669000.25, None], "t": 1764669001.5, "v": 2, "m": "newton"},
        ],
        "lease_token": 7,
        "state_id": "abc",
    }  # fmt: skip
    state = {"seq": 5, "budget_used": 0.25, "hyper": {"subsample_ratio": None}}
    record = encode_record(
        base="000004",
        state=state,
        rows=np.array([3, 9]),
        weights=np.ones((4, 1)),
        journal=journal,
    )
    path = log_path(tmp_path, "000004")
    path.parent.mkdir()
    path.write_bytes(record)
    (rec,) = read_log(tmp_path, "000004")
    assert rec.journal == journal
    assert rec.header["state"] == state
    assert rec.rows.tolist() == [3, 9]
    for state_, journal_ in (({"seq": 5, "budget_used": float("nan")}, None),
                             ({"seq": 5}, {"records": [{"q": [float("nan")]}]})):  # fmt: skip
        with pytest.raises(ValueError):
            encode_record(
                base="000004",
                state=state_,
                rows=np.array([3]),
                weights=np.ones((4, 1)),
                journal=journal_,
            )
