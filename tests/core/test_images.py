"""Raw MNIST / SVHN loaders on tiny files written by the tests (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import InvalidInputError
from core.images import load_image_split, load_mnist_images, load_svhn_images
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
