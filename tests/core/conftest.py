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


class ForcedLayout(dict):
    """A layout table (``core.products``) that gives every shape the layout ``value``."""

    value = ""

    def get(self, key, default=None):
        return self.value


def _forced(monkeypatch, table: str, value: str) -> ForcedLayout:
    from core import blocked as by_blocks  # noqa: PLC0415

    forced = ForcedLayout()
    forced.value = value
    monkeypatch.setattr(by_blocks, table, forced)
    monkeypatch.setattr(by_blocks, "CERT_BLOCK_BYTES", 0)  # the smallest blocks: 512 rows
    return forced


@pytest.fixture
def cert_layout(monkeypatch) -> ForcedLayout:
    """Every shape gets the certificate layout set on it (``.value``), in blocks of 512 rows."""
    return _forced(monkeypatch, "_CERT_LAYOUT", "direct")


@pytest.fixture
def hvp_layout(monkeypatch) -> ForcedLayout:
    """Every shape gets the Hessian-vector layout set on it (``.value``), blocks of 512 rows."""
    return _forced(monkeypatch, "_HVP_LAYOUT", "two_passes")


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def slow_but(monkeypatch):
    """``slow_but(fast)``: a clock for the calibrations (``core.products._clock``) on which
    every layout's measurement but ``fast``'s takes 10 s and ``fast``'s 1 s; call ``.tick(layout)``
    inside the measured function. Deterministic whatever else the machine runs."""
    from core import products  # noqa: PLC0415

    class Clock:
        now = 0.0
        fast = ""

        def __call__(self) -> float:
            return self.now

        def tick(self, layout: str) -> None:
            self.now += 1.0 if layout == self.fast else 10.0

    clock = Clock()
    monkeypatch.setattr(products, "_clock", clock)

    def make(fast: str) -> Clock:
        clock.fast = fast
        return clock

    return make


def numpy_measured(threads, one_thread: bool, fast: str) -> bool:
    """Set torch's thread count (one or two) for a calibration test of the certificate's or
    CG's layouts whose ``fast`` layout is to be kept; skip it when ``fast`` is one of NumPy's and
    would not be measured (NumPy's BLAS not found; with any torch thread count it runs one
    thread of its own). Returns whether NumPy's are measured."""
    from core import products  # noqa: PLC0415

    threads(1 if one_thread else 2)
    measured = products.match_blas_threads()
    if "numpy" in fast and not measured:
        pytest.skip("NumPy's layout is measured only where NumPy's BLAS is found")
    return measured
