"""The secret noise ``b`` and other randomness (docs/theory.md "Training").

``b`` comes from numpy's PCG64 seeded with 128 bits of OS entropy; a ``seed`` exists for tests
only (a reproducible ``b`` is a public ``b``) and marks the model uncertified.
"""

from __future__ import annotations

import numpy as np
import torch


def generator(seed: int | None) -> np.random.Generator:
    """A generator from the OS random source (``seed=None``), or a reproducible one for tests."""
    return np.random.default_rng(seed)  # None -> SeedSequence with 128 bits from os.urandom


def draw_noise(
    shape: tuple[int, ...], sigma: float, rng: np.random.Generator, device: torch.device
) -> torch.Tensor:
    """``b ~ N(0, sigma^2 I)`` as a float64 (d, K) tensor on ``device``."""
    return torch.from_numpy(rng.normal(0.0, sigma, size=shape)).to(
        device=device, dtype=torch.float64
    )
