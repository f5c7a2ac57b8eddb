"""Entries read as Redis sends them (``worker.stream`` reads without redis-py's dict per entry):
parsed from the flat list of names and values, the same as from the dict, every case; the
dead-letter copy of a flat entry the same as of its dict."""

from __future__ import annotations

import pytest
import redis

from producer import Client, schema
from worker.entries import Entry, fields_dict, parse_entries
from worker.status_script import dead_letter_record
from worker.stream import RequestStream

R, IDS, A = b"request_id", b"sample_ids", b"requested_at"

CASES = [
    [R, b"r1", IDS, b"[17]", A, b"1764669000.25"],
    [R, b"r1", IDS, b"[-3]", A, b"1.5"],
    [R, b"r1", IDS, b"[017]", A, b"1.5"],
    [R, b"r1", IDS, b"[1,2]", A, b"1.5"],
    [R, b"r1", IDS, b'["a"]', A, b"1.5"],
    [R, b"r1", IDS, b"[17]", A, b"nan"],
    [R, b"r1", IDS, b"[17]", A, b"inf"],
    [R, b"r1", IDS, b"[17]", A, b""],
    [R, b"r1", IDS, b"[17]", A, b"soon"],
    [R, b"r1", IDS, b"[17]", A, "1.5".encode("utf-16")],
    [R, b"", IDS, b"[17]", A, b"1.5"],
    [R, b"\xff\xfe", IDS, b"[17]", A, b"1.5"],
    [R, b"r1", IDS, b"[1234567890123456789]", A, b"1.5"],
    [R, b"r1", IDS, b"[]", A, b"1.5"],
    [R, b"r1", IDS, b"[17", A, b"1.5"],
    [IDS, b"[17]", R, b"r1", A, b"1.5"],  # another order
    [R, b"r1", IDS, b"[17]"],  # no time
    [R, b"r1", IDS, b"[17]", A, b"1.5", schema.FIELD_REPLAY_OF.encode(), b"9-0"],
    [R, b"r1", IDS, b"[17]", A, b"1.5", b"extra", b"x"],
    [R, b"r1", R, b"r2", IDS, b"[17]"],  # a name twice: the last value, as a dict has it
    [b"other", b"x"],
    [],
]


@pytest.mark.parametrize("flat", CASES)
def test_flat_fields_parse_as_the_dict(flat: list[bytes]) -> None:
    (from_flat,) = parse_entries([(b"1-0", flat)])
    (from_dict,) = parse_entries([(b"1-0", fields_dict(flat))])
    for name in ("entry_id", "request_id", "sample_ids", "requested_at", "error", "replay_of"):
        assert getattr(from_flat, name) == getattr(from_dict, name), name
    assert fields_dict(from_flat.fields) == fields_dict(flat)
    assert dead_letter_record(b"1-0", from_flat.fields, "why") == dead_letter_record(
        b"1-0", fields_dict(flat), "why"
    )


def test_deleted_entries_and_dicts_still_parse() -> None:
    deleted, given = parse_entries([(b"1-0", None), (b"2-0", {R: b"r", IDS: b"[4]", A: b"2.0"})])
    assert deleted.request_id is None and deleted.error is not None
    assert (given.request_id, given.sample_ids, given.requested_at) == ("r", [4], 2.0)


def test_the_stream_reads_flat_fields_the_producer_wrote(
    rclient: redis.Redis, broker_url: str, model_name: str
) -> None:
    stream = RequestStream(rclient, model_name, "c1")
    stream.ensure_group()
    with Client(broker_url, model=model_name) as client:
        rids = client.enqueue_many([[5], [6, 7], ["s"]])
    raw = stream.read_new(10)
    assert [type(f) for _, f in raw] == [list, list, list]
    entries: list[Entry] = parse_entries(raw)
    assert [e.request_id for e in entries] == rids
    assert [e.sample_ids for e in entries] == [[5], [6, 7], ["s"]]
    assert all(isinstance(e.requested_at, float) and e.error is None for e in entries)
    # the caller's client keeps redis-py's dict per entry: only the stream's reads are raw
    again = rclient.xrange(schema.stream_key(model_name))
    assert isinstance(again[0][1], dict)
    assert stream.read_own_pending(10)[0][0] == raw[0][0]
