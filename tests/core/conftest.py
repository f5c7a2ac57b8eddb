from __future__ import annotations

import numpy as np
import pytest
import torch

import core


def make_data(n: int, d: int, classes: int, seed: int, separation: float = 1.0):
    """Clustered rows with norm <= 1 (float32, as the loaders store them) and int labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    y[:classes] = np.arange(classes)  # every class present
    centres = rng.normal(size=(classes, d)) * separation / np.sqrt(d)
    X = centres[y] + rng.normal(size=(n, d)) / np.sqrt(d)
    return core.data.normalise_rows(X), torch.from_numpy(y.astype(np.int64))


@pytest.fixture(scope="session")
def digits():
    return core.load_dataset("digits")
