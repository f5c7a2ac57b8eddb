from __future__ import annotations

import json

import pytest

from worker.entries import parse_entry


def _entry(**fields: object) -> dict[bytes, bytes]:
    return {
        k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in fields.items()
    }


def test_valid_entry() -> None:
    e = parse_entry(b"1-0", _entry(request_id="r", sample_ids=[1, "a"], requested_at="12.5"))
    assert (e.request_id, e.sample_ids, e.requested_at, e.error) == ("r", [1, "a"], 12.5, None)


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({"sample_ids": [1]}, "no request_id"),
        ({"request_id": "r"}, "no sample_ids"),
        ({"request_id": "r", "sample_ids": "[1,"}, "not JSON"),
        ({"request_id": "r", "sample_ids": {"a": 1}}, "JSON list"),
        ({"request_id": "r", "sample_ids": []}, "empty request"),
        ({"request_id": "r", "sample_ids": list(range(10_001))}, "oversized"),
        ({"request_id": "r", "sample_ids": [1, 2.5]}, "integers or strings"),
        ({"request_id": "r", "sample_ids": [True]}, "integers or strings"),
        ({"request_id": "r", "sample_ids": [[1]]}, "integers or strings"),
    ],
)
def test_bad_entries_get_a_reason(fields: dict[str, object], reason: str) -> None:
    e = parse_entry(b"1-0", _entry(**fields))
    assert e.error is not None and reason in e.error
    assert e.sample_ids is None


def test_limit_is_inclusive_and_bad_time_is_tolerated() -> None:
    e = parse_entry(
        b"1-0", _entry(request_id="r", sample_ids=list(range(10_000)), requested_at="x")
    )
    assert e.error is None and e.requested_at is None


def test_undecodable_bytes() -> None:
    e = parse_entry(b"1-0", {b"request_id": b"\xff\xfe", b"sample_ids": b"[1]"})
    assert e.request_id is None and e.error


def test_an_integer_past_the_digit_limit_is_malformed_not_an_exception() -> None:
    # Python 3.11 json.loads raises a plain ValueError for ints over 4,300 digits
    e = parse_entry(b"1-0", {b"request_id": b"r", b"sample_ids": b"[" + b"7" * 5000 + b"]"})
    assert (e.request_id, e.sample_ids) == ("r", None)
    assert e.error is not None and "not JSON" in e.error


def test_parse_entry_never_raises() -> None:
    e = parse_entry(b"1-0", {b"request_id": b"r", b"sample_ids": 5})  # type: ignore[dict-item]
    assert e.request_id == "r" and e.sample_ids is None
    assert e.error is not None and e.error.startswith("malformed entry")


@pytest.mark.parametrize("bad", [{"id": 987654}, 987654.0, [987654], None])
def test_a_bad_sample_id_is_named_by_type_and_position_never_quoted(bad: object) -> None:
    # The reason is logged (worker.outbox.log_rejections) and logs never carry sample ids: a
    # mistyped id ({"id": 987654}, 987654.0, [987654]) is still one, so it is not echoed.
    e = parse_entry(b"1-0", _entry(request_id="r", sample_ids=[5, bad]))
    assert e.error is not None and "integers or strings" in e.error
    assert "987654" not in e.error and "position 1" in e.error
    assert type(bad).__name__ in e.error
