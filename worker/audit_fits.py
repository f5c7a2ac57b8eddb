"""The audit's retrains and figures (see :mod:`worker.audit`): fits from scratch, gradients,
distances between weights and the spread the noise predicts, accuracies, per-row losses and the
implied-noise check of the residual."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.audit_base import Target

if TYPE_CHECKING:
    import torch

    from core.problem import Problem


def grad0(problem: Problem, W: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``grad L_0(W; alive rows)`` in float64 (d, K)."""
    from core.loss import gradient  # noqa: PLC0415

    return gradient(
        problem.X, problem.Y, problem.weights(alive), W, problem.lam, float(alive.sum())
    )


def fit(
    problem: Problem, alive: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, budget: float
) -> tuple[torch.Tensor, float]:
    """Minimise ``L_B`` on ``alive`` from scratch (the minimiser is unique: the warm start only
    saves iterations); (weights, final residual)."""
    from core.newton import gradient_tolerance, newton_fit  # noqa: PLC0415

    n_reg = float(alive.sum())
    fit = newton_fit(
        problem.X,
        problem.Y,
        problem.weights(alive),
        problem.lam,
        n_reg,
        B,
        tol=gradient_tolerance(problem.lam, n_reg, budget),
        W0=W0,
        hess_dtype=problem.hess_dtype,
    )
    return fit.W, fit.r0


def row_figures(problem: Problem, W: torch.Tensor, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: the one-vs-rest loss ``sum_k log(1 + exp(-Y_k w_k.x))`` and the predicted
    probability of the true label (``sigmoid`` of the true class's margin)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    idx = torch.as_tensor(rows, dtype=torch.long, device=problem.X.device)
    X, Y = problem.X[idx], problem.Y[idx]
    Z = Y * (X @ W)
    loss = F.softplus(-Z).sum(1)
    true_col = Y.argmax(1) if Y.shape[1] > 1 else torch.zeros(len(idx), dtype=torch.long)
    z_true = Z.gather(1, true_col.to(Z.device)[:, None])[:, 0]
    return {"loss": loss.cpu().numpy(), "p_true": torch.sigmoid(z_true).cpu().numpy()}


def accuracy(target: Target, W: torch.Tensor) -> float | None:
    import torch  # noqa: PLC0415

    if target.test is None:
        return None
    X, y = target.test
    scores = X.to(W.device, torch.float64) @ W
    if target.binary:
        pred = torch.where(scores[:, 0] > 0, target.classes[1], target.classes[0])
    else:
        pred = scores.argmax(1)
    return float((pred.cpu() == y.cpu().long()).double().mean())


def spread_prediction(
    problem: Problem, alive: torch.Tensor, W0: torch.Tensor, sigma: float
) -> dict[str, Any]:
    """The spread of two draws the linearised noise predicts: ``v = H^-1 (b_1 - b_2)``,
    ``E||v||^2 = 2 sigma^2 sum_k tr H_k^-2``, and the relative sd of ``||v||``."""
    import torch  # noqa: PLC0415

    from core.loss import hessians, margins  # noqa: PLC0415

    n_reg = float(alive.sum())
    H = hessians(
        problem.X,
        problem.weights(alive),
        margins(problem.X, problem.Y, W0),
        problem.lam,
        n_reg,
        dtype=torch.float64,
    )
    eig = torch.linalg.eigvalsh(H)  # (K, d), positive
    tr2 = (eig**-2).sum(1)
    tr4 = (eig**-4).sum(1)
    mean_sq = 2 * sigma**2 * tr2
    var_sq = 2 * (2 * sigma**2) ** 2 * tr4
    total_mean, total_var = float(mean_sq.sum()), float(var_sq.sum())
    return {
        "per_class": [math.sqrt(float(v)) for v in mean_sq],
        "total": math.sqrt(total_mean),
        "rel_sd": math.sqrt(total_var) / (2 * total_mean) if total_mean > 0 else 0.0,
    }


def norms(A: torch.Tensor, B: torch.Tensor) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    D = (A - B).double()
    return {
        "per_class": [float(x) for x in torch.linalg.vector_norm(D, dim=0)],
        "total": float(torch.linalg.vector_norm(D)),
    }


def noise_check(target: Target, g0: torch.Tensor) -> dict[str, Any]:
    """``-grad L_0(W; D') = b - U`` against ``N(0, sigma^2 I)``."""
    from scipy.stats import kstest  # noqa: PLC0415

    sigma = float(target.hyper.sigma)
    v = (-g0).double().cpu().numpy().ravel()
    expected = sigma * math.sqrt(v.size)
    norm = float(np.linalg.norm(v))
    out: dict[str, Any] = {"norm": norm, "expected_norm": expected, "sigma": sigma}
    if sigma <= 0:
        out.update(ratio=None, ks_p=None, consistent=norm <= (target.budget_used or 0.0) + 1e-9)
        return out
    # a chi distribution with dK degrees of freedom: sd about sigma / sqrt(2); U adds its norm
    slack = 5 * sigma / math.sqrt(2) + (target.budget_used or target.budget_total)
    ks = kstest(v / sigma, "norm")
    out.update(
        ratio=norm / expected,
        coordinate_sd_over_sigma=float(v.std() / sigma),
        ks_p=float(ks.pvalue),
        consistent=bool(abs(norm - expected) <= slack),
    )
    return out
