"""The answers a batch's plan gives (``worker.batch``): ``rejected`` for an entry or a group
core refuses, ``applied`` for the groups a step or retrain removed, with the sample ids each
removed (for the ledger file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from producer import schema
from worker.entries import Entry
from worker.status import Answer


class Group(Protocol):
    """What an answer reads of a group (``worker.batch.Group``)."""

    entry: Entry
    rows: list[int]
    already_removed_ids: list[Any]
    unknown_ids: list[Any]


def rejected_entry(e: Entry, reason: str, now: float, unknown: list[Any] | None = None) -> Answer:
    """The ``rejected`` answer of an entry, with ``reason`` (and its ``unknown`` ids)."""
    return Answer(
        str(e.request_id),
        schema.STATUS_REJECTED,
        unknown_ids=unknown or [],
        reason=reason,
        requested_at=e.requested_at,
        applied_at=now,
    )


def rejected_group(group: Group, reason: str, now: float) -> Answer:
    """The ``rejected`` answer of a group core (or the extractor's allowance) refuses."""
    return rejected_entry(group.entry, reason, now, group.unknown_ids)


def py_value(value: Any) -> Any:
    """A numpy scalar's Python value (anything else as it is)."""
    return value.item() if hasattr(value, "item") else value


def applied_answers(
    groups: Sequence[Group],
    method: str,
    version: int,
    now: float,
    sample_ids: np.ndarray | None = None,
) -> list[Answer]:
    """The ``applied`` answers of committed groups (with the sample ids each removed, for the
    ledger file, when ``sample_ids`` maps rows to ids)."""
    removed = _ids_of_rows(groups, sample_ids)
    return [
        Answer(
            str(g.entry.request_id),
            schema.STATUS_APPLIED,
            method,
            version,
            g.unknown_ids,
            g.already_removed_ids,
            requested_at=g.entry.requested_at,
            applied_at=now,
            removed_ids=ids,
        )
        for g, ids in zip(groups, removed, strict=True)
    ]


def _ids_of_rows(groups: Sequence[Group], sample_ids: np.ndarray | None) -> list[list[Any]]:
    """The sample ids (Python values) of each group's rows; empty lists without ``sample_ids``.
    One numpy gather for the batch instead of one lookup per row."""
    if sample_ids is None:
        return [[] for _ in groups]
    flat = [r for g in groups for r in g.rows]
    picked = sample_ids[np.asarray(flat, dtype=np.intp)] if flat else sample_ids[:0]
    values = [py_value(v) for v in picked] if picked.dtype == object else picked.tolist()
    out: list[list[Any]] = []
    start = 0
    for g in groups:
        end = start + len(g.rows)
        out.append(values[start:end])
        start = end
    return out
