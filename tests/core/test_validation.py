"""Bad input: a clear ValueError each time, and the model unchanged."""

from __future__ import annotations

import pytest
import torch

import core


@pytest.fixture
def model(digits):
    return core.train(
        digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, seed=0, max_removals=None
    )


def snapshot(m):
    return m.weights.clone(), m.alive.clone(), m.budget_used, m.removed_in_epoch


@pytest.mark.parametrize(
    ("rows", "groups", "match"),
    [
        ([-1], None, "out of range"),
        ([10**6], None, "out of range"),
        ([3, 3], None, "repeated"),
        ([1.5], None, "integers"),
        ([1, 2], [3], "groups"),
    ],
)
def test_bad_rows_are_rejected_and_model_unchanged(model, rows, groups, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.remove(rows, groups=groups)
    after = snapshot(model)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_removing_every_row_is_refused(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="no training rows"):
        model.remove(list(range(model.n_rows)))
    assert torch.equal(before[1], model.alive)


def test_binary_class_vanishing_is_refused(digits):
    keep = (digits.y_train == 3) | (digits.y_train == 8)
    X, y = digits.X_train[keep], digits.y_train[keep]
    m = core.train(X, y, lam=1e-2, sigma=1.0, seed=0, max_removals=None)
    threes = torch.nonzero(y == 3).flatten().tolist()
    with pytest.raises(ValueError, match="single class"):
        m.remove(threes)
    assert m.n_alive == len(y)


def test_bad_training_data(digits):
    X, y = digits.X_train, digits.y_train
    with pytest.raises(ValueError, match="norm above"):
        core.train(X * 2, y)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        core.train(bad, y)
    with pytest.raises(ValueError, match="1-D"):
        core.train(X, y[:, None])
    with pytest.raises(ValueError, match="labels"):
        core.train(X, y[:-1])
    with pytest.raises(ValueError, match="two classes"):
        core.train(X, torch.zeros_like(y))
    with pytest.raises(ValueError, match="epsilon"):
        core.train(X, y, epsilon=2.0)
    with pytest.raises(ValueError, match="lam"):
        core.train(X, y, lam=0.0)
    with pytest.raises(ValueError, match="accounting"):
        core.train(X, y, accounting="approx")
    with pytest.raises(ValueError, match="max_removals"):
        core.train(X, y, max_removals=-3)


def test_float32_rounding_of_unit_rows_is_accepted(digits):
    X = digits.X_train.double()
    X = (X / X.norm(dim=1, keepdim=True)).float()  # norms up to 1 + 6e-8 after the cast
    assert float(X.double().norm(dim=1).max()) > 1.0
    core.train(X, digits.y_train, lam=1e-2, sigma=1.0, seed=0, max_removals=None)


def test_strange_string_ids_are_unknown_never_an_error(digits):
    m = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, seed=0, max_removals=None,
                   ids=digits.ids_train)  # fmt: skip
    weird = ["²", "--5", "1" * 5000, "", "  ", "1e3", "0x10", None, 1.5, True, [1]]
    rows, unknown = m.rows_for_ids([*weird, str(digits.ids_train[3]), int(digits.ids_train[4])])
    assert rows == [3, 4] and unknown == weird


def test_float64_training_rows_are_certified_as_stored_float32(tmp_path, digits):
    X64 = digits.X_train.double()
    m = core.train(X64, digits.y_train, lam=1e-2, sigma=1.0, seed=0, max_removals=None)
    m.save(tmp_path)
    loaded = core.load_model(tmp_path)
    assert torch.equal(loaded._problem.X, m._problem.X)  # the same (float32-exact) rows
