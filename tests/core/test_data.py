"""Dataset loaders: digits, synthetic, .npz files, and MNIST/SVHN on tiny files in real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core
from tests.core.fixtures_images import write_mnist_idx, write_svhn_mat


def assert_rows_certifiable(ds):
    assert ds.X_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.X_train.double().norm(dim=1).max()) <= 1.0 + 1e-7
    assert len(np.unique(ds.ids_train)) == len(ds.ids_train) == len(ds.y_train)


def test_digits_fixed_split(digits):
    assert_rows_certifiable(digits)
    assert len(digits.y_train) == 1438 and len(digits.y_test) == 359
    again = core.load_dataset("digits")
    assert np.array_equal(again.ids_train, digits.ids_train)
    assert not set(digits.ids_train) & set(digits.ids_test)


def test_synthetic_is_seeded():
    a = core.load_dataset("synthetic:n=500,d=16,classes=3,seed=4")
    b = core.load_dataset("synthetic:n=500,d=16,classes=3,seed=4")
    assert_rows_certifiable(a)
    assert torch.equal(a.X_train, b.X_train) and a.X_train.shape == (500, 16)
    assert set(a.y_train.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="synthetic"):
        core.load_dataset("synthetic:n=abc")


def test_npz_round_trip_with_string_ids_and_meta(tmp_path, digits):
    ds = core.Dataset(
        digits.X_train,
        digits.y_train,
        np.array([f"user-{i}" for i in range(len(digits.y_train))]),
        digits.X_test,
        digits.y_test,
        None,
        {"name": "x", "dp_epsilon": 0.1, "dp_delta": 1e-5},
    )
    path = tmp_path / "d.npz"
    core.save_dataset(path, ds)
    back = core.load_dataset(str(path))
    assert back.meta["dp_epsilon"] == 0.1 and back.ids_train[0] == "user-0"
    m = core.train(
        back.X_train,
        back.y_train,
        lam=1e-2,
        sigma=1.0,
        seed=0,
        max_removals=None,
        ids=back.ids_train,
    )
    rows, unknown = m.rows_for_ids(["user-0", "user-17", "nobody", 3])
    assert rows == [0, 17] and unknown == ["nobody", 3]


def test_malformed_npz_files_are_rejected(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, X_train=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="lacks"):
        core.load_dataset(str(path))
    np.savez(
        path,
        X_train=np.zeros((3, 2), np.float32),
        y_train=np.zeros(3, np.int64),
        ids_train=np.array([1, 1, 2]),
        X_test=np.zeros((1, 2), np.float32),
        y_test=np.zeros(1, np.int64),
    )
    with pytest.raises(ValueError, match="unique"):
        core.load_dataset(str(path))
    np.savez(
        path,
        X_train=np.zeros((3, 2), np.float32),
        y_train=np.zeros(3, np.int64),
        ids_train=np.arange(3),
        X_test=np.zeros((1, 2), np.float32),
        y_test=np.zeros(1, np.int64),
        meta=np.array("{not json"),
    )
    with pytest.raises(ValueError, match="JSON"):
        core.load_dataset(str(path))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="readable"):
        core.load_dataset(str(tmp_path / "junk.npz"))
    obj = tmp_path / "obj.npz"
    np.savez(obj, X_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        core.load_dataset(str(obj))


def test_mnist_from_tiny_idx_files(tmp_path):
    root = write_mnist_idx(tmp_path, n_train=120, n_test=40)
    ds = core.load_dataset("mnist", data_dir=root)
    assert_rows_certifiable(ds)
    assert ds.X_train.shape == (120, 784) and len(ds.y_test) == 40
    pair = core.load_dataset("mnist", data_dir=root, binary_classes=(3, 8))
    assert set(pair.y_train.tolist()) == {3, 8}
    m = core.train(
        pair.X_train,
        pair.y_train,
        lam=1e-3,
        sigma=1.0,
        seed=0,
        max_removals=None,
        ids=pair.ids_train,
    )
    assert m.weights.shape == (784,)
    with pytest.raises(ValueError, match="data-dir"):
        core.load_dataset("mnist")


def test_svhn_from_tiny_mat_files(tmp_path):
    root = write_svhn_mat(tmp_path, n=60)
    ds = core.load_dataset("svhn", data_dir=root)
    assert_rows_certifiable(ds)
    assert ds.X_train.shape == (60, 3072)
    assert set(ds.y_train.tolist()) <= set(range(10)) and 0 in set(ds.y_train.tolist())
