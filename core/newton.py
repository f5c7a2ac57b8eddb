"""The Newton-Cholesky solver of the loss-perturbed objective (Guo et al. 2020, Algorithm 1).

Deviation: the paper (and its code) trains with 100 L-BFGS steps and ignores the final gradient;
we run Newton's method with a backtracking line search to a tolerance tied to the budget, and the
final gradient norm ``r0`` (measured at the weights as stored, float64) is charged to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import ConvergenceError, NumericalError
from core.loss import (
    cholesky_factor,
    frobenius,
    gradient,
    hessians,
    margins,
    objective,
    solve_factored,
)


@dataclass(frozen=True)
class FitResult:
    """Weights (d, K) float64, the final residual ``||grad L_b||_F``, the iteration count, and
    the Cholesky factors of the last Hessian (reusable as a preconditioner near the optimum)."""

    W: torch.Tensor
    r0: float
    iterations: int
    factor: torch.Tensor | None = None


def gradient_tolerance(lam: float, n_reg: float, budget: float) -> float:
    """``min(1e-9 lam n, 1e-6 budget)`` (docs/theory.md "Training"); a zero budget (sigma = 0)
    uses the first."""
    tol = 1e-9 * lam * n_reg
    return min(tol, 1e-6 * budget) if budget > 0 else tol


def newton_fit(
    X: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    lam: float,
    n_reg: float,
    B: torch.Tensor,
    *,
    tol: float,
    W0: torch.Tensor | None = None,
    max_iter: int = 100,
    hess_dtype: torch.dtype | None = None,
) -> FitResult:
    """Minimise ``L_b`` by damped Newton steps until ``||grad L_b||_F <= tol``.

    Each class is an independent problem; the line search backtracks per class on the Armijo
    condition (plain Newton can diverge on the logistic loss). ``hess_dtype=float32`` (the default) only
    changes the direction; the gradient and the stopping test stay in X's dtype (float64).

    Shapes: X (n, d) float64, Y and C (n, K), B (d, K), W0 (d, K).

    Raises:
        ConvergenceError: the tolerance was not reached and the residual is too large to certify.
    """
    d, n_classes = X.shape[1], Y.shape[1]
    W = torch.zeros((d, n_classes), dtype=X.dtype, device=X.device) if W0 is None else W0.clone()
    best = float("inf")
    stalled = 0
    factor: torch.Tensor | None = None
    for it in range(1, max_iter + 1):
        Z = margins(X, Y, W)
        G = gradient(X, Y, C, W, lam, n_reg, B, Z=Z)
        gnorm = frobenius(G)
        if gnorm <= tol:
            return FitResult(W=W, r0=gnorm, iterations=it - 1, factor=factor)
        stalled = stalled + 1 if gnorm >= best * 0.999 else 0
        best = min(best, gnorm)
        if stalled >= 5:
            break
        try:
            factor = cholesky_factor(hessians(X, C, Z, lam, n_reg, dtype=hess_dtype), lam)
        except NumericalError:
            if hess_dtype in (None, torch.float64):
                raise
            factor = cholesky_factor(hessians(X, C, Z, lam, n_reg, dtype=torch.float64), lam)
        D = -solve_factored(factor, G)
        W = _line_search(X, Y, C, W, D, G, lam, n_reg, B)
    Z = margins(X, Y, W)
    gnorm = frobenius(gradient(X, Y, C, W, lam, n_reg, B, Z=Z))
    if gnorm <= tol:
        return FitResult(W=W, r0=gnorm, iterations=max_iter, factor=factor)
    raise ConvergenceError(
        f"Newton training stopped at ||grad|| = {gnorm:.3e} > tolerance {tol:.3e} "
        f"(lam={lam:g}, n={int(n_reg)}, d={d}); increase lam or check the data for NaN/duplicates"
    )


def _line_search(
    X: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    W: torch.Tensor,
    D: torch.Tensor,
    G: torch.Tensor,
    lam: float,
    n_reg: float,
    B: torch.Tensor,
    *,
    armijo: float = 1e-4,
    max_halvings: int = 40,
) -> torch.Tensor:
    """Backtracking on the per-class objective; near the optimum the full step is accepted when the
    objective no longer resolves the decrease (float64 rounding)."""
    f0 = objective(X, Y, C, W, lam, n_reg, B)
    slope = (G * D).sum(0)  # < 0: D is a descent direction because H is SPD
    step = torch.ones_like(f0)
    slack = 1e-13 * f0.abs().clamp_min(1.0)
    for _ in range(max_halvings):
        f1 = objective(X, Y, C, W + D * step, lam, n_reg, B)
        ok = f1 <= f0 + armijo * step * slope + slack
        if bool(ok.all()):
            break
        step = torch.where(ok, step, step / 2)
    return W + D * step


def refit_with_factor(
    X: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    lam: float,
    n_reg: float,
    B: torch.Tensor,
    *,
    tol: float,
    W0: torch.Tensor,
    factor: torch.Tensor,
    max_iter: int = 60,
) -> FitResult | None:
    """Minimise ``L_b`` from ``W0`` with a fixed Hessian factor (chord method): O(nd + Kd^2) per
    iteration instead of O(nd^2). Converges linearly when ``W0`` is near the new optimum (a new
    noise draw on the same data); returns None when it does not, so the caller can fall back."""
    W = W0.clone()
    previous = float("inf")
    for it in range(max_iter):
        G = gradient(X, Y, C, W, lam, n_reg, B)
        gnorm = frobenius(G)
        if gnorm <= tol:
            return FitResult(W=W, r0=gnorm, iterations=it, factor=factor)
        if gnorm > 0.7 * previous:
            return None
        previous = gnorm
        W = W - solve_factored(factor, G)
    return None
