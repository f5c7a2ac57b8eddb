"""Removal requests: validated row indices split into request groups (``groups``: their sizes, in
arrival order), and the :class:`RemovalResult` of serving them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from core.errors import InvalidInputError


@dataclass
class RemovalResult:
    """Outcome of :meth:`core.Model.remove` (a spent budget is an outcome, not an exception)."""

    applied: bool
    applied_groups: int
    removed: list[int] = field(default_factory=list)
    already_removed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    bound_increment: float = 0.0
    budget_used: float = 0.0
    needs_retrain: bool = False
    retrain_reason: str | None = None


def validate_rows(
    rows: Sequence[int] | torch.Tensor,
    groups: Sequence[int] | None,
    n_rows: int,
    *,
    allow_repeats: bool = False,
) -> tuple[list[int], list[int]]:
    """Row indices in ``[0, n_rows)`` as a list, and the request sizes ``groups`` (one group of
    all rows when None). Raises :class:`InvalidInputError` on anything else."""
    arr = np.asarray(list(rows) if not isinstance(rows, torch.Tensor) else rows.cpu().numpy())
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise InvalidInputError(f"rows must be a flat sequence of integers, got dtype {arr.dtype}")
    row_list: list[int] = arr.tolist() if arr.size else []  # Python ints (an integer array)
    if row_list and (int(arr.min()) < 0 or int(arr.max()) >= n_rows):  # one pass, in numpy
        bad = [r for r in row_list if not 0 <= r < n_rows]
        raise InvalidInputError(f"rows out of range [0, {n_rows}): {bad[:10]}")
    if not allow_repeats and len(set(row_list)) != len(row_list):
        seen: set[int] = set()
        dup = sorted({r for r in row_list if r in seen or seen.add(r)})  # type: ignore[func-returns-value]
        raise InvalidInputError(f"rows repeated within one call: {dup[:10]}")
    if groups is None:
        sizes = [len(row_list)] if row_list else []
    else:
        sizes = list(map(int, groups))
        if (sizes and min(sizes) < 0) or sum(sizes) != len(row_list):
            raise InvalidInputError(
                f"groups must be non-negative sizes summing to len(rows)={len(row_list)}, "
                f"got {sizes[:10]}"
            )
    return row_list, sizes


def alive_groups(
    rows: Sequence[int] | torch.Tensor,
    groups: Sequence[int] | None,
    alive: torch.Tensor,
) -> tuple[list[list[int]], list[int]]:
    """Validated ``rows`` split into request groups of alive rows, and the rows already removed
    (both in input order)."""
    row_list, sizes = validate_rows(rows, groups, alive.numel())
    index = torch.as_tensor(row_list, dtype=torch.long, device=alive.device)
    flags = alive[index].tolist() if row_list else []
    group_rows: list[list[int]] = []
    already: list[int] = []
    start = 0
    if all(flags):  # the common batch: every row alive, so each group is its slice
        if sizes.count(1) == len(sizes) == len(row_list):  # one row per group
            return [[r] for r in row_list], already
        for size in sizes:
            group_rows.append(row_list[start : start + size])
            start += size
        return group_rows, already
    for size in sizes:
        pairs = list(zip(row_list[start : start + size], flags[start : start + size], strict=True))
        group_rows.append([r for r, a in pairs if a])
        already.extend(r for r, a in pairs if not a)
        start += size
    return group_rows, already


def removal_result(
    group_rows: list[list[int]],
    committed: int,
    already: list[int],
    bound_inc: float,
    reason: str | None,
    budget_used: float,
) -> RemovalResult:
    """The :class:`RemovalResult` of ``group_rows`` when the first ``committed`` went in."""
    left = committed < len(group_rows)
    return RemovalResult(
        applied=not left,
        applied_groups=committed,
        removed=[r for g in group_rows[:committed] for r in g],
        already_removed=already,
        pending=[r for g in group_rows[committed:] for r in g],
        bound_increment=bound_inc,
        budget_used=budget_used,
        needs_retrain=left,
        retrain_reason=reason if left else None,
    )
