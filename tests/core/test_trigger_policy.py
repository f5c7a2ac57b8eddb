"""core.trigger's policy (parsing, resolving and scaling ``max_removals``, the per-epoch limits)
and the one refusal rule of core.guard that the shadow runs share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.guard import NO_ROWS, ONE_CLASS, RemovalGuard, refusal
from core.trigger import (
    AUTO_REESTIMATE_BELOW,
    groups_within_limits,
    parse_max_removals,
    reestimate_due,
    resolve_max_removals,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("auto", "auto"), (" AUTO ", "auto"), ("none", None), ("None", None), ("1", 1),
     ("250", 250), (" 12 ", 12), ("0.25", 0.25), ("5e-1", 0.5)],
)  # fmt: skip
def test_parse_max_removals(text, value):
    assert parse_max_removals(text) == value
    assert type(parse_max_removals(text)) is type(value)


@pytest.mark.parametrize(
    "text", ["", "0", " 0 ", "-0", "-1", "1.0", "0.0", "2.5", "nan", "inf", "all", "1e99"]
)
def test_parse_max_removals_refuses(text):
    with pytest.raises(ValueError):
        parse_max_removals(text)


def _never() -> int:
    raise AssertionError("no shadow runs expected")


@pytest.mark.parametrize(
    ("spec", "n", "basis", "reestimate", "want"),
    [
        (None, 100, None, True, (None, None)),
        (40, 100, (200, 9), True, (40, (200, 9))),
        (0.1, 1000, None, True, (100, None)),
        ("auto", 150, (200, 40), True, (30, (200, 40))),  # scaled with the rows
        ("auto", 100, (200, 40), True, (20, (200, 40))),  # exactly half: still scaled
        ("auto", 99, (200, 40), False, (19, (200, 40))),  # below half, but no re-estimate asked
    ],
)
def test_resolve_max_removals_scales(spec, n, basis, reestimate, want):
    assert resolve_max_removals(spec, n, basis, _never, reestimate=reestimate) == want


@pytest.mark.parametrize(("n", "basis"), [(99, (200, 40)), (500, None)])
def test_resolve_max_removals_estimates(n, basis):
    assert resolve_max_removals("auto", n, basis, lambda: 7) == (7, (n, 7))
    assert reestimate_due("auto", n, basis)
    assert not reestimate_due(30, n, basis) and not reestimate_due(None, n, basis)


def test_reestimate_due_margin():
    basis = (1000, 50)
    n = int(AUTO_REESTIMATE_BELOW * 1000) + 10
    assert not reestimate_due("auto", n, basis)
    assert reestimate_due("auto", n, basis, margin=1.1)


@pytest.mark.parametrize(
    ("groups", "limits", "want"),
    [
        ([[1, 2], [3]], [], (2, None)),
        ([[1, 2], [3]], [(3, "max_removals")], (2, None)),
        ([[1, 2], [3]], [(2, "max_removals")], (1, "max_removals")),
        ([[1, 2], [3]], [(1, "extractor"), (0, "max_removals")], (0, "extractor")),
        ([[], [1]], [(0, "max_removals")], (1, "max_removals")),  # an empty group always fits
    ],
)
def test_groups_within_limits(groups, limits, want):
    assert groups_within_limits(groups, limits) == want


def _within_oracle(groups, limits):
    total = 0
    for i, g in enumerate(groups):
        total += len(g)
        for allowed, reason in limits:
            if g and total > allowed:
                return i, reason
    return len(groups), None


def test_groups_within_limits_matches_the_running_count():
    rng = np.random.default_rng(7)
    for _ in range(500):
        groups = [list(range(int(k))) for k in rng.integers(0, 4, size=int(rng.integers(0, 8)))]
        limits = [
            (int(a), f"l{j}") for j, a in enumerate(rng.integers(0, 14, size=rng.integers(0, 3)))
        ]
        assert groups_within_limits(groups, limits) == _within_oracle(groups, limits)


@pytest.mark.parametrize(
    ("rows_left", "classes_left", "binary", "want"),
    [(0, 0, False, NO_ROWS), (0, 0, True, NO_ROWS), (5, 1, True, ONE_CLASS), (5, 1, False, None),
     (5, 2, True, None), (1, 1, False, None)],
)  # fmt: skip
def test_the_refusal_rule(rows_left, classes_left, binary, want):
    assert refusal(rows_left, classes_left, binary) == want


@pytest.mark.parametrize("binary", [True, False])
def test_the_shadow_runs_stop_where_the_guard_refuses(binary):
    from core.problem import Problem
    from core.trigger import _class_emptied

    labels = np.array([0, 0, 1, 1, 1] if binary else [0, 1, 2, 2, 2])
    Y = torch.full((5, 1 if binary else 3), -1.0, dtype=torch.float64)
    if binary:
        Y[:, 0] = torch.from_numpy(np.where(labels == 1, 1.0, -1.0))
    else:
        Y[torch.arange(5), torch.from_numpy(labels)] = 1.0
    problem = Problem(Y, Y, Y, torch.ones(5), 1.0, 1.0, torch.float32)  # only Y is read
    for mask in range(32):
        alive = torch.tensor([bool(mask >> i & 1) for i in range(5)])
        gone = [i for i in range(5) if not alive[i]]
        guard = RemovalGuard(labels, np.ones(5, dtype=bool), binary)
        assert _class_emptied(problem, alive, binary) == (guard.refuse(gone) is not None)
