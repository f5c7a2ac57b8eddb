"""``Model.save`` persists only the model's own training data (rows, labels, ids).

The persisted budget is anchored on the dataset file at the next start-up: a dataset of the same
shapes with other rows, labels or ids would make a loaded model report a budget that has nothing
to do with the residual on the data it holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core
from core.data import Dataset


@pytest.fixture(scope="module")
def model(digits):
    return core.train(
        digits.X_train, digits.y_train, ids=digits.ids_train, lam=1e-2, sigma=1.0, seed=0,
        max_removals=None, device="cpu",
    )  # fmt: skip


def _variant(ds: Dataset, *, X=None, y=None, ids=None) -> Dataset:
    return Dataset(
        ds.X_train if X is None else X,
        ds.y_train if y is None else y,
        ds.ids_train if ids is None else ids,
        ds.X_test,
        ds.y_test,
        ds.ids_test,
        meta=dict(ds.meta),
    )


def _perm(n: int) -> np.ndarray:
    return np.random.default_rng(0).permutation(n)


def _other_labels(y: torch.Tensor) -> torch.Tensor:
    """The same classes and counts, on other rows."""
    return y[torch.from_numpy(_perm(len(y)))]


CASES = {
    "rows": lambda ds: _variant(ds, X=ds.X_train[torch.from_numpy(_perm(len(ds.y_train)))]),
    "labels": lambda ds: _variant(ds, y=_other_labels(ds.y_train)),
    "ids": lambda ds: _variant(ds, ids=ds.ids_train + 100_000),
}


@pytest.mark.parametrize("what", sorted(CASES))
def test_save_refuses_a_dataset_that_is_not_the_models(tmp_path, digits, model, what):
    other = CASES[what](digits)
    assert other.X_train.shape == digits.X_train.shape and len(other.ids_train) == model.n_rows
    with pytest.raises(core.InvalidInputError, match=what):
        model.save(tmp_path, dataset=other)
    assert not (tmp_path / "CURRENT").exists()  # nothing written
    assert model.dataset is not other


def test_save_refuses_a_permuted_copy_of_the_data(tmp_path, digits, model):
    """Rows, labels and ids permuted together: the same data, but row i is no longer row i (the
    alive mask and the weights' residual belong to the model's order)."""
    p = _perm(model.n_rows)
    other = _variant(
        digits, X=digits.X_train[torch.from_numpy(p)], y=digits.y_train[torch.from_numpy(p)],
        ids=digits.ids_train[p],
    )  # fmt: skip
    with pytest.raises(ValueError, match="rows.*labels.*ids"):
        model.save(tmp_path, dataset=other)


def test_save_refuses_a_mismatching_dataset_set_on_the_model(tmp_path, digits, model):
    m = core.train(
        digits.X_train, digits.y_train, ids=digits.ids_train, lam=1e-2, sigma=1.0, seed=0,
        max_removals=None, device="cpu",
    )  # fmt: skip
    m.dataset = CASES["labels"](digits)
    with pytest.raises(ValueError, match="labels"):
        m.save(tmp_path)


def test_save_accepts_the_models_own_dataset_and_loads_it(tmp_path, digits, model):
    model.save(tmp_path / "a", dataset=digits)
    loaded = core.load_model(tmp_path / "a", device="cpu")
    assert loaded.budget_used >= model.budget_used
    loaded.remove([0, 1, 2])
    loaded.save(tmp_path / "a")  # the loaded model's own dataset (from the state directory)
    model.save(tmp_path / "b")  # the dataset set by the first save
    m = core.train(
        digits.X_train, digits.y_train, ids=digits.ids_train, lam=1e-2, sigma=1.0, seed=0,
        max_removals=None, device="cpu",
    )  # fmt: skip
    m.save(tmp_path / "c")  # no dataset: built from the model's rows


def test_save_accepts_the_same_data_in_other_dtypes(tmp_path, digits):
    """Rows in float64, labels in int32: the same data the model holds; saved as the dataset
    files store it (float32, int64), so the state loads back."""
    m = core.train(
        digits.X_train, digits.y_train, ids=digits.ids_train, lam=1e-2, sigma=1.0, seed=0,
        max_removals=None, device="cpu",
    )  # fmt: skip
    same = _variant(digits, X=digits.X_train.double(), y=digits.y_train.int())
    m.save(tmp_path, dataset=same)
    loaded = core.load_model(tmp_path, device="cpu")
    assert torch.equal(loaded.weights, m.weights)
    loaded.save(tmp_path)


def test_a_loaded_model_refuses_other_data(tmp_path, digits, model):
    model.save(tmp_path / "a", dataset=digits)
    loaded = core.load_model(tmp_path / "a", device="cpu")
    with pytest.raises(ValueError, match="ids"):
        loaded.save(tmp_path / "b", dataset=CASES["ids"](digits))


def test_string_ids_compare_by_value(tmp_path):
    ds = core.load_dataset("synthetic:n=200,d=4,classes=2,seed=0")
    names = np.array([f"s{i}" for i in range(200)])
    ds = _variant(ds, ids=names)
    m = core.train(ds.X_train, ds.y_train, ids=list(names), seed=0, device="cpu")
    m.save(tmp_path / "a", dataset=_variant(ds, ids=names.astype("<U12")))  # wider, same ids
    assert core.load_model(tmp_path / "a", device="cpu").rows_for_ids(["s3"]) == ([3], [])
    renamed = names.copy()
    renamed[5] = "x5"
    with pytest.raises(ValueError, match="ids"):
        m.save(tmp_path / "b", dataset=_variant(ds, ids=renamed))
