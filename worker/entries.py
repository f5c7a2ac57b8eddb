"""Parse and validate request-stream entries (docs/design.md "Stream entry fields").

Bad input is answered, never dropped: an entry that cannot be read becomes an :class:`Entry`
with ``error`` set, which the service records as ``rejected`` with that reason (or sends to the
dead-letter stream when it has no request id to answer).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from producer import schema

Fields = dict[bytes, bytes]
#: an entry's fields as the stream read gives them: a flat list of names and values
#: (``worker.stream``, read without redis-py's dict per entry), a dict, or None (deleted)
RawFields = Fields | list[bytes] | None
RawEntry = tuple[bytes, RawFields]

_RID = schema.FIELD_REQUEST_ID.encode()
_IDS = schema.FIELD_SAMPLE_IDS.encode()
_AT = schema.FIELD_REQUESTED_AT.encode()
_REPLAY = schema.FIELD_REPLAY_OF.encode()
_ONE_INT = re.compile(rb"\[(-?[0-9]{1,18})\]")  # the common single-id request, without json


@dataclass(slots=True)
class Entry:
    """One stream entry, parsed.

    Attributes:
        entry_id: the stream entry id (bytes, as Redis returned it).
        request_id: the request id, or None when the entry has none.
        sample_ids: the validated sample ids (1 to 10,000 ints or strings), None on error.
        requested_at: enqueue time (epoch seconds), None when absent or unreadable.
        error: why the entry is rejected, None when it is valid.
        fields: the raw fields, kept for the dead-letter stream (a dict, or the flat list of
            names and values of an entry read in place: :func:`fields_dict`).
        replay_of: the dead letter's entry id when an operator replayed this entry (it is then
            served as new even though its request id was dead-lettered before).
    """

    entry_id: bytes
    request_id: str | None
    sample_ids: list[int | str] | None
    requested_at: float | None
    error: str | None
    fields: Fields | list[bytes]
    replay_of: str | None = None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def validate_sample_ids(value: Any, limit: int = schema.MAX_IDS_PER_REQUEST) -> str | None:
    """Why ``value`` is not a valid id list (a reason), or None when it is."""
    if not isinstance(value, list):
        return f"malformed entry: sample_ids must be a JSON list, got {type(value).__name__}"
    if not value:
        return "empty request: sample_ids is an empty list"
    if len(value) > limit:
        return f"oversized request: {len(value)} sample ids (at most {limit} per request)"
    for pos, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | str):
            # named by type and position, never quoted: a mistyped id (17.0, [17], {"id": 17})
            # is still a sample id, and this reason is logged (worker.outbox.log_rejections)
            return (
                "malformed entry: sample ids must be integers or strings, got a "
                f"{type(item).__name__} at position {pos}"
            )
    return None


def parse_entry(entry_id: bytes, fields: Fields) -> Entry:
    """Parse one raw stream entry; never raises: an entry that makes parsing fail in any way
    is returned malformed with the error (so it is answered or dead-lettered, never retried)."""
    try:
        return _parse(entry_id, fields)
    except Exception as exc:  # noqa: BLE001 - one bad entry must never stop the model
        return _malformed(entry_id, fields, exc)


def _malformed(entry_id: bytes, fields: Fields, exc: Exception) -> Entry:
    """The malformed entry of one whose parsing raised ``exc``."""
    try:
        rid = _text(fields.get(_RID))
    except Exception:  # noqa: BLE001
        rid = None
    reason = f"malformed entry: {type(exc).__name__}: {exc}"[:500]
    return Entry(entry_id, rid or None, None, None, reason, fields)


def _requested_at(value: bytes | None) -> float | None:
    """The enqueue time of an entry: a finite float, else None (absent, unreadable, nan/inf)."""
    if not value:
        return None
    if type(value) is bytes:
        try:
            number = float(value)  # ASCII: no decode needed (the producer writes repr(time))
        except ValueError:
            pass  # not ASCII, or not a number: read as text below (same result as before)
        else:
            return number if math.isfinite(number) else None
    text = _text(value)
    if not text:
        return None
    try:
        at = float(text)
    except ValueError:
        return None
    return at if math.isfinite(at) else None  # nan/inf: no usable enqueue time


def _parse(entry_id: bytes, fields: Fields) -> Entry:
    get = fields.get
    return _parse_values(entry_id, get(_RID), get(_IDS), get(_AT), get(_REPLAY), fields)


def _parse_values(
    entry_id: bytes,
    rid_raw: bytes | None,
    ids_raw: bytes | None,
    at_raw: bytes | None,
    replay: bytes | None,
    fields: Fields | list[bytes],
) -> Entry:
    """An entry from its field values, however they were read (a dict or the flat list)."""
    rid = _text(rid_raw)
    requested_at = _requested_at(at_raw)
    if not rid:
        entry = Entry(entry_id, None, None, requested_at, "malformed entry: no request_id", fields)
    else:
        entry = _parse_ids(entry_id, rid, ids_raw, requested_at, fields)
    if replay is not None:
        entry.replay_of = _text(replay) or None
    return entry


def _parse_ids(
    entry_id: bytes,
    rid: str,
    raw: bytes | None,
    requested_at: float | None,
    fields: Fields | list[bytes],
) -> Entry:
    one = _ONE_INT.fullmatch(raw) if raw is not None else None
    if one is not None:
        return Entry(entry_id, rid, [int(one.group(1))], requested_at, None, fields)
    raw_ids = _text(raw)
    if raw_ids is None:
        return Entry(entry_id, rid, None, requested_at, "malformed entry: no sample_ids", fields)
    try:
        ids = json.loads(raw_ids)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, int digit limit
        return Entry(
            entry_id,
            rid,
            None,
            requested_at,
            f"malformed entry: sample_ids is not JSON we can read ({str(exc)[:200]})",
            fields,
        )
    error = validate_sample_ids(ids)
    return Entry(entry_id, rid, None if error else ids, requested_at, error, fields)


def fields_dict(fields: RawFields) -> Fields:
    """An entry's fields as a dict (a flat list of names and values paired up; a name given
    twice keeps its last value, as redis-py's reply callback did)."""
    if fields is None:
        return {}
    if isinstance(fields, dict):
        return fields
    it = iter(fields)
    return dict(zip(it, it, strict=False))


def parse_entries(raw: list[RawEntry]) -> list[Entry]:
    """Parse a list of ``(entry_id, fields)`` pairs; entries deleted from the stream (None
    fields, as XAUTOCLAIM/XREADGROUP report them) are returned as malformed. Fields come as a
    dict or as the flat list of names and values of a raw read (``worker.stream``); an entry
    laid out as the producer writes it (``request_id``, ``sample_ids``, ``requested_at``,
    nothing else) is read from the list in place, by the same rules."""
    out: list[Entry] = []
    append = out.append
    for eid, given in raw:
        try:
            if (
                type(given) is list
                and len(given) == 6
                and given[0] == _RID
                and given[2] == _IDS
                and given[4] == _AT
            ):  # the producer's layout: its values read in place, no dict built
                append(_parse_values(eid, given[1], given[3], given[5], None, given))
            else:
                append(_parse(eid, fields_dict(given)))
        except Exception as exc:  # noqa: BLE001 - one bad entry must never stop the model
            append(_malformed(eid, fields_dict(given), exc))
    return out
