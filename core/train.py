"""``core.train``: validate the data and options, and train a removal-enabled model
(Guo et al. 2020, Algorithm 1, loss perturbation; the solver is ``core.newton``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from core.budget import budget_total as compute_budget
from core.epoch import fit_epoch
from core.errors import InvalidInputError
from core.labels import LabelCoding
from core.model import Model
from core.noise import generator
from core.problem import (
    ACCOUNTINGS,
    Hyper,
    MaxRemovals,
    make_problem,
    resolve_device,
    validate_rows_data,
)
from core.trigger import validate_spec

__all__ = ["make_problem", "resolve_device", "train", "validate_rows_data"]


def train(
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float = 1e-3,
    sigma: float = 10.0,
    epsilon: float = 1.0,
    delta: float = 1e-4,
    seed: int | None = None,
    device: str | torch.device | None = None,
    accounting: str = "exact",
    max_removals: MaxRemovals = "auto",
    calibration: str = "classical",
    subsample_ratio: float | None = None,
    ids: Sequence[Any] | np.ndarray | None = None,
    extractor_dp: tuple[float, float] | None = None,
    extractor_limit: tuple[float, float] | None = None,
) -> Model:
    """Train a removal-enabled model (Guo et al. 2020, Algorithm 1, loss perturbation).

    Binary when y has two distinct labels (the larger maps to +1), one-vs-rest for integer labels
    0..K-1 with K > 2. ``seed`` is for tests only and marks the model ``certified=False``.

    Shapes: X (n, d) with rows of norm <= 1; y (n,).

    Raises:
        InvalidInputError: bad data or options (nothing is trained).
    """
    validate_rows_data(X, y)
    # The certificate is about the rows as stored (float32 in every dataset file): train on those.
    X = X.float()
    if not (math.isfinite(lam) and lam > 0):
        raise InvalidInputError(f"lam must be > 0 (strong convexity), got {lam}")
    if accounting not in ACCOUNTINGS:
        raise InvalidInputError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    spec = validate_spec(max_removals)
    if subsample_ratio is not None and not 0 < subsample_ratio <= 1:
        raise InvalidInputError(f"subsample_ratio must lie in (0, 1], got {subsample_ratio}")
    total = compute_budget(sigma, epsilon, delta, calibration)
    coding = LabelCoding.fit(y)
    dev = resolve_device(device)
    ids_arr = np.arange(X.shape[0], dtype=np.int64) if ids is None else np.asarray(ids)
    if ids_arr.shape != (X.shape[0],) or len(set(ids_arr.tolist())) != X.shape[0]:
        raise InvalidInputError("ids must hold one unique sample id per row")
    rng = generator(seed)
    Y = coding.encode(y).to(dev)
    omega = torch.ones_like(Y)
    if subsample_ratio is not None and subsample_ratio < 1:
        # Bernoulli subsample of each class's negatives, drawn before and independently of b.
        keep = torch.from_numpy(rng.random(tuple(Y.shape)) < subsample_ratio).to(dev)
        omega = torch.where((Y > 0) | keep, 1.0, 0.0).to(torch.float64)
    problem = make_problem(X, Y, omega, lam, dev)
    if extractor_dp is not None:
        extractor_dp = (float(extractor_dp[0]), float(extractor_dp[1]))
        if not (extractor_dp[0] > 0 and 0 <= extractor_dp[1] < 1):
            raise InvalidInputError(
                f"extractor_dp must be (eps_dp > 0, 0 <= delta_dp < 1), got {extractor_dp}"
            )
        extractor_limit = tuple(map(float, extractor_limit or (epsilon, delta)))  # type: ignore[assignment]
    hyper = Hyper(
        lam,
        sigma,
        epsilon,
        delta,
        accounting,
        calibration,
        spec,
        subsample_ratio,
        extractor_dp,
        extractor_limit if extractor_dp is not None else None,
    )
    epoch = fit_epoch(
        problem,
        hyper,
        total,
        torch.ones(X.shape[0], dtype=torch.bool, device=dev),
        binary=coding.binary,
        version=1,
        seed=None if seed is None else seed + 1,
        W0=None,
    )
    return Model(
        problem=problem, coding=coding, hyper=hyper, ids=ids_arr, epoch=epoch, budget_total=total
    )
