"""``producer.client.encode_sample_ids``: the JSON the worker reads, written without the json
module for a list of plain ints, by it for anything else (so a mistyped id is still answered
as the worker always answered it)."""

from __future__ import annotations

import json

import pytest

from producer.client import encode_sample_ids
from worker.entries import parse_entry


@pytest.mark.parametrize(
    "ids",
    [[17], [0], [-3], [1, 2, 3], [10**17, -(10**17)], [10**30], ["a", 1], ["ä"], [], [17.0],
     [True], [None], [[17]], [{"id": 17}]],
)  # fmt: skip
def test_the_same_json_as_the_json_module(ids: list) -> None:
    text = encode_sample_ids(ids)
    assert json.loads(text) == ids
    assert json.loads(text) == json.loads(json.dumps(ids))


def test_plain_ints_skip_the_json_module_and_bools_do_not() -> None:
    assert encode_sample_ids([17]) == "[17]"
    assert encode_sample_ids((1, 2)) == "[1,2]"
    assert encode_sample_ids([True]) == "[true]"  # a bool is not a sample id: json writes it


@pytest.mark.parametrize("ids", [[17], [1, 2, 3], ["s1", 4], [True], [17.0], []])
def test_the_worker_reads_what_it_read_before(ids: list) -> None:
    def entry(text: str):
        fields = {b"request_id": b"r1", b"sample_ids": text.encode(), b"requested_at": b"1.5"}
        return parse_entry(b"1-0", fields)

    new, old = entry(encode_sample_ids(ids)), entry(json.dumps(ids))
    assert (new.sample_ids, new.error) == (old.sample_ids, old.error)


@pytest.mark.parametrize("value", [None, "abc", 5, {"a": 1}, 1.5, True])
def test_a_value_that_is_no_list_is_written_as_json_dumps_writes_it(value: object) -> None:
    """A ``certremove.remove`` task message may carry anything: written as it always was (a
    string never becomes a list of its characters), and the worker rejects it as not a list."""
    assert encode_sample_ids(value) == json.dumps(value)
    fields = {b"request_id": b"r1", b"sample_ids": encode_sample_ids(value).encode()}
    entry = parse_entry(b"1-0", fields)
    assert entry.sample_ids is None and "must be a JSON list" in str(entry.error)


def test_what_is_not_json_still_raises() -> None:
    with pytest.raises(TypeError):
        encode_sample_ids({1, 2})
    with pytest.raises(TypeError):
        encode_sample_ids([object()])
