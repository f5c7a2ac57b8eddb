"""Raw MNIST / SVHN loaders on tiny files written by the tests (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import InvalidInputError
from core.images import (
    load_image_split,
    load_mnist_images,
    load_split_with_ids,
    load_svhn_images,
)
from tests.core.fixtures_images import digit_images, write_mnist_idx, write_svhn_mat


def test_mnist_round_trip(tmp_path):
    write_mnist_idx(tmp_path, n_train=40, n_test=20, seed=3)
    images, labels = load_mnist_images(tmp_path, train=True)
    assert images.dtype == torch.uint8 and images.shape == (40, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (40,)
    expected_images, expected_labels = digit_images(40, size=28, channels=1, seed=3)
    assert np.array_equal(images[:, 0].numpy(), expected_images[..., 0])
    assert np.array_equal(labels.numpy(), expected_labels)
    test_images, test_labels = load_mnist_images(tmp_path, train=False)
    assert test_images.shape == (20, 1, 28, 28) and test_labels.shape == (20,)


def test_mnist_missing_files_say_how_to_supply_them(tmp_path):
    with pytest.raises(InvalidInputError, match="--data-dir.*--download"):
        load_mnist_images(tmp_path, train=True)


def test_svhn_round_trip_maps_label_10_to_0(tmp_path):
    write_svhn_mat(tmp_path, splits=("train",), n=30, seed=5)
    images, labels = load_svhn_images(tmp_path, split="train")
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (30,)
    expected_images, expected_labels = digit_images(30, size=32, channels=3, seed=5)
    assert np.array_equal(labels.numpy(), expected_labels)  # 10 -> 0
    assert 0 in labels.tolist() and int(labels.max()) <= 9
    # (N, C, H, W) with the channel last in the source (N, H, W, C) array.
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), expected_images)


def test_svhn_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="split"):
        load_svhn_images(tmp_path, split="validation")
    with pytest.raises(InvalidInputError, match="--data-dir"):
        load_svhn_images(tmp_path, split="test")
    import scipy.io

    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((4, 4), np.uint8)})
    with pytest.raises(InvalidInputError, match="X and y"):
        load_svhn_images(tmp_path, split="test")


def test_load_image_split_dispatch(tmp_path):
    write_svhn_mat(tmp_path, splits=("train", "test"), n=12)
    images, _ = load_image_split("SVHN", tmp_path, train=False)
    assert images.shape == (12, 3, 32, 32)
    with pytest.raises(InvalidInputError, match="mnist"):
        load_image_split("cifar10", tmp_path, train=True)


def test_split_with_ids_extra_and_exclusions(tmp_path):
    write_svhn_mat(tmp_path, splits=("train", "test", "extra"), n=10)
    images, labels, ids = load_split_with_ids("svhn", tmp_path, train=True, include_extra=True)
    assert images.shape == (20, 3, 32, 32) and ids.tolist() == list(range(20))
    kept_images, kept_labels, kept = load_split_with_ids(
        "svhn", tmp_path, train=True, include_extra=True, exclude_ids=[0, 12, 99]
    )
    assert kept.tolist() == [i for i in range(20) if i not in (0, 12)]
    assert torch.equal(kept_images, images[kept]) and torch.equal(kept_labels, labels[kept])
    with pytest.raises(InvalidInputError, match="SVHN only"):
        write_mnist_idx(tmp_path, n_train=8, n_test=4)
        load_split_with_ids("mnist", tmp_path, train=True, include_extra=True)
