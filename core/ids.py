"""Sample ids: their normalised form, the id -> row index, and the ids earlier full-pipeline
retrains excluded from the data."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: a string that names an integer sample id: ASCII digits, at most 18 of them (fits in int64)
_INT_ID = re.compile(r"-?[0-9]{1,18}")


def sample_id_key(integer_ids: bool, value: Any) -> Any:
    """The normalised form of a sample id among integer ids (int, incl. digit strings of at most
    18 ASCII digits) or other ids (str), or None when it cannot name a row."""
    if integer_ids:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, str) and _INT_ID.fullmatch(value.strip()):
            return int(value)
        return None
    return str(value)


class IdIndex:
    """The training rows' ids: normalises ids and maps them to rows (the index is built on first
    use)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.integer = ids.dtype.kind in "iu"
        self._index: dict[Any, int] | None = None

    def key(self, value: Any) -> Any:
        return sample_id_key(self.integer, value)

    def rows_for_ids(self, sample_ids: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """(rows, unknown ids), both in input order."""
        if self._index is None:
            values = self.ids.tolist()
            # an integer id is its own key (tolist gives Python ints), any other id its str
            keys = values if self.integer else map(str, values)
            self._index = dict(zip(keys, range(len(values)), strict=False))
        index = self._index
        # an id that is its own key (an int among integer ids, a str among others) skips
        # normalising: the common case, and a visible share of a large batch's planning
        plain = int if self.integer else str
        integer = self.integer
        rows: list[int] = []
        unknown: list[Any] = []
        for raw in sample_ids:
            row = index.get(raw if type(raw) is plain else sample_id_key(integer, raw))
            if row is None:
                unknown.append(raw)
            else:
                rows.append(row)
        return rows, unknown

    def keys(self, values: Iterable[Any]) -> frozenset[Any]:
        """The keys of ``values`` that can name a row (e.g. ``meta["excluded_ids"]``)."""
        return frozenset(k for k in (self.key(v) for v in values) if k is not None)
