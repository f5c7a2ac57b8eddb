"""core.guard.RemovalGuard counts the rows per class by ``np.bincount`` for the model's class
codes (non-negative integers) and by ``np.unique`` otherwise: the same counts, keys and answers
as ``np.unique``'s and as a refusal computed by hand, whatever the codes."""

from __future__ import annotations

import numpy as np
import pytest

from core.guard import NO_ROWS, ONE_CLASS, RemovalGuard

RNG = np.random.default_rng(11)


@pytest.mark.parametrize(
    "labels",
    [
        RNG.integers(0, 10, 5000),  # one-vs-rest codes, int64
        RNG.integers(0, 2, 5000),  # binary codes
        RNG.integers(3, 7, 300).astype(np.uint8),  # codes from 3: empty bins in between
        np.array([3, 3, 5, -1, 2, -1]),  # a negative value: np.unique's path
        np.array([True, False, True, True]),  # booleans keep their keys
        np.array(["a", "b", "a", "c"]),
        np.array([], dtype=np.int64),
        np.array([0, 10**8, 10**8, 3]),  # huge codes: np.unique's path (no 800 MB table)
        np.array([2**63 + 5, 1, 2**63 + 5], dtype=np.uint64),  # past int64
        np.array([0.0, 1.0, 1.0]),
    ],
    ids=[
        "int10",
        "int2",
        "uint8-from-3",
        "negative",
        "bool",
        "str",
        "empty",
        "huge",
        "uint64",
        "float",
    ],
)
@pytest.mark.parametrize("binary", [True, False])
def test_counts_are_numpy_unique_s(labels, binary):
    alive = RNG.random(labels.size) > 0.3
    guard = RemovalGuard(labels, alive, binary)
    values, counts = np.unique(labels[alive], return_counts=True)
    expected = dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert guard.counts == expected
    assert [type(k) for k in guard.counts] == [type(k) for k in expected]
    assert guard.total == int(alive.sum())


def test_refusals_follow_the_counts_removal_after_removal():
    labels = np.array([0] * 3 + [1] * 4)
    alive = np.ones(labels.size, dtype=bool)
    alive[6] = False  # a row removed before: not counted
    guard = RemovalGuard(labels, alive, binary=True)
    assert guard.counts == {0: 3, 1: 3} and guard.total == 6
    assert guard.refuse([0, 1]) is None  # class 0 keeps one row
    assert guard.counts == {0: 1, 1: 3} and guard.total == 4
    assert guard.refuse([2]) == ONE_CLASS  # the last row of class 0: refused, nothing counted
    assert guard.counts == {0: 1, 1: 3}
    assert guard.refuse([3, 4]) is None
    assert guard.refuse([5]) == ONE_CLASS
    one_vs_rest = RemovalGuard(np.array([0, 0, 1, 2]), np.ones(4, dtype=bool), binary=False)
    assert one_vs_rest.refuse([0, 1, 2]) is None  # one class left is fine one-vs-rest
    assert one_vs_rest.refuse([3]) == NO_ROWS


def test_bincount_only_for_small_non_negative_integer_codes():
    from core.guard import _small_codes

    assert _small_codes(np.array([0, 1, 1, 0]))
    assert _small_codes(np.array([], dtype=np.int64))
    assert _small_codes(np.arange(10, dtype=np.uint8))
    assert not _small_codes(np.array([0, 10**8]))  # a table of 10**8 counts for two rows
    assert not _small_codes(np.array([-1, 0]))
    assert not _small_codes(np.array([2**63 + 5], dtype=np.uint64))
    assert not _small_codes(np.array([True, False]))
    assert not _small_codes(np.array([0.0, 1.0]))
