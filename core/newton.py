"""The Newton-Cholesky solver of the loss-perturbed objective (Guo et al. 2020, Algorithm 1).

Deviation: the paper (and its code) trains with 100 L-BFGS steps and ignores the final gradient;
we run Newton's method with a backtracking line search to a tolerance tied to the budget, and the
final gradient norm ``r0`` (measured at the weights as stored, float64) is charged to the budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.blocked import curvature32, hvp
from core.errors import ConvergenceError, NumericalError
from core.loss import (
    cholesky_factor,
    frobenius,
    gradient,
    hessians,
    loss_derivatives,
    margins,
    solve_factored,
)
from core.products import gram_cost, x_times, xt_times


@dataclass(frozen=True)
class FitResult:
    """Weights (d, K) float64, the final residual ``||grad L_b||_F``, the iteration count, and
    the Cholesky factors of the last Hessian factored (or the ``precond`` given, if none was;
    float64; reusable as a preconditioner near the optimum)."""

    W: torch.Tensor
    r0: float
    iterations: int
    factor: torch.Tensor | None = None
    #: CG iterations of the last Newton direction with ``factor`` (0: it was factored for it)
    cg_iterations: int = 0
    #: the margins ``Y * (X W)`` at ``W`` as returned (None if not computed): a removal step
    #: on the fit starts from them without a pass over X
    Z: torch.Tensor | None = None


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
    precond: torch.Tensor | None = None,
    cg_max_iter: int = 20,
    X32: torch.Tensor | None = None,
) -> FitResult:
    """Minimise ``L_b`` by damped Newton steps until ``||grad L_b||_F <= tol``.

    Each class is an independent problem; the line search backtracks per class on the Armijo
    condition (plain Newton can diverge on the logistic loss). ``hess_dtype=float32`` (the default)
    and ``X32`` (below) only change the direction; the gradient and the stopping test stay in X's
    dtype (float64).

    The Newton direction: with a Cholesky factor at hand (``precond``, e.g. the last removal
    step's when retraining, or the factor of an earlier iteration) it is solved by conjugate
    gradients with Hessian-vector products preconditioned by it, to a relative residual
    ``min(1e-2, sqrt(||g|| / ||g_0||))`` (inexact Newton, superlinear): O(n d) per CG iteration
    instead of the O(n d^2) Hessian. When CG does not converge within ``cg_max_iter`` (the factor
    is too far from the Hessian: a cold start) the Hessian is built and factored (float32 by
    default, float64 on failure), and its factor preconditions the next iterations; after a CG
    solve that needed more than ``min(4, (GRAM_COST d + 2) / 2)`` iterations the next iteration
    factors again (so the factor returned is a recent one). ``cg_max_iter=0``: a Hessian every
    iteration. Only the direction depends on the solve: the iterate, its gradient and ``r0`` are
    what they are.

    ``X32``: X rounded to float32 (the problem's copy), read by the float32 Hessians instead of
    converting X at every factorisation, and by CG's Hessian-vector products (float32 products,
    float64 vectors, as in the removal step's CG: :func:`core.blocked.hvp`). The direction is
    then about 1e-7 relative off the float64 one, far below CG's tolerance ``eta``; the
    gradient, the line search and the stopping test read the float64 X either way.

    Shapes: X (n, d) float64, Y and C (n, K), B (d, K), W0 (d, K), precond (K, d, d).

    Raises:
        ConvergenceError: the tolerance was not reached and the residual is too large to certify.
    """
    d, n_classes = X.shape[1], Y.shape[1]
    W = torch.zeros((d, n_classes), dtype=X.dtype, device=X.device) if W0 is None else W0.clone()
    best = float("inf")
    stalled = 0
    factor = None if precond is None else precond.to(X.dtype)
    fresh, cg_iterations = True, 0
    # CG iterations past which the factor is refreshed: at most 4, fewer where the Hessian is
    # cheap relative to a product (d small)
    refresh = max(1, min(4, int((gram_cost(X.device) * d + 2) / 2)))
    Z = margins(X, Y, W)
    f = _objective_at(Z, W, C, lam, n_reg, B)
    g0 = None
    for it in range(1, max_iter + 1):
        G = _gradient_at(X, Y, C, W, Z, lam, n_reg, B)
        gnorm = frobenius(G)
        if gnorm <= tol:
            return FitResult(
                W=W, r0=gnorm, iterations=it - 1, factor=factor, cg_iterations=cg_iterations, Z=Z
            )
        g0 = gnorm if g0 is None else g0
        stalled = stalled + 1 if gnorm >= best * 0.999 else 0
        best = min(best, gnorm)
        if stalled >= 5:
            break
        D = None
        if factor is not None and fresh:
            _, d2 = loss_derivatives(Z)
            curvature, ridge = C * d2, lam * n_reg
            eta = min(1e-2, math.sqrt(gnorm / g0))
            # float32 products on X's float32 copy where there is one (half the bytes): they
            # shape only the direction, about 1e-7 relative off, far below eta
            if X32 is None:
                matvec = functools.partial(hvp, X, curvature, ridge=ridge)
            else:
                matvec = functools.partial(hvp, X32, curvature32(curvature), ridge=ridge)
            D, its, ok = pcg(matvec, factor, -G, eta, cg_max_iter)
            cg_iterations = its
            D = D if ok else None
            # a factor that needs many iterations has drifted from the Hessian: refresh it at the
            # next iteration (the last factor also seeds the removal steps' preconditioner)
            fresh = fresh and its <= refresh
        if D is None:
            try:
                H = hessians(X, C, Z, lam, n_reg, dtype=hess_dtype, X32=X32)
                L = cholesky_factor(H, lam)
            except NumericalError:
                if hess_dtype in (None, torch.float64):
                    raise
                L = cholesky_factor(hessians(X, C, Z, lam, n_reg, dtype=torch.float64), lam)
            D = -solve_factored(L, G)
            factor, fresh, cg_iterations = L.to(X.dtype), True, 0
        W, Z, f = _line_search(X, Y, C, W, D, G, lam, n_reg, B, f)
    gnorm = frobenius(gradient(X, Y, C, W, lam, n_reg, B))
    if gnorm <= tol:
        return FitResult(
            W=W, r0=gnorm, iterations=max_iter, factor=factor, cg_iterations=cg_iterations, Z=Z
        )
    raise ConvergenceError(
        f"Newton training stopped at ||grad|| = {gnorm:.3e} > tolerance {tol:.3e} "
        f"(lam={lam:g}, n={int(n_reg)}, d={d}); increase lam or check the data for NaN/duplicates"
    )


def _objective_at(
    Z: torch.Tensor, W: torch.Tensor, C: torch.Tensor, lam: float, n_reg: float, B: torch.Tensor
) -> torch.Tensor:
    """Per-class ``L_b`` from the margins ``Z = Y * (X W)`` (no pass over X): the same sum as
    :func:`core.loss.objective`."""
    return (C * F.softplus(-Z)).sum(0) + 0.5 * lam * n_reg * (W * W).sum(0) + (B * W).sum(0)


def _gradient_at(
    X: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    W: torch.Tensor,
    Z: torch.Tensor,
    lam: float,
    n_reg: float,
    B: torch.Tensor,
) -> torch.Tensor:
    """``grad L_b(W)`` from its margins ``Z`` (one pass over X)."""
    d1, _ = loss_derivatives(Z)
    return xt_times(X, C * d1 * Y) + (lam * n_reg) * W + B


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
    f0: torch.Tensor,
    *,
    armijo: float = 1e-4,
    max_halvings: int = 40,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking on the per-class objective; near the optimum the full step is accepted when the
    objective no longer resolves the decrease (float64 rounding). ``f0`` is the objective at
    ``W``; returns the new weights, their margins (computed at the weights as returned) and
    objective, so that the next iteration makes no pass over X for them."""
    slope = (G * D).sum(0)  # < 0: D is a descent direction because H is SPD
    step = torch.ones_like(f0)
    slack = 1e-13 * f0.abs().clamp_min(1.0)
    for _ in range(max_halvings):
        W1 = W + D * step
        Z1 = Y * x_times(X, W1)
        f1 = _objective_at(Z1, W1, C, lam, n_reg, B)
        ok = f1 <= f0 + armijo * step * slope + slack
        if bool(ok.all()):
            return W1, Z1, f1
        step = torch.where(ok, step, step / 2)
    return W1, Z1, f1


def pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    factor: torch.Tensor,
    rhs: torch.Tensor,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor | None, int, bool]:
    """Preconditioned conjugate gradients on the K independent systems ``H_k s_k = rhs_k``
    (columns), preconditioner ``(L_k L_k^T)^-1``; the Polak-Ribiere ``beta`` (flexible CG)
    tolerates a preconditioner applied in rounding. Stops when every column's recurrence
    residual is ``<= tol ||rhs_k||``. Returns ``(s, iterations, converged)``; ``s`` None on a
    breakdown (a non-positive or non-finite curvature ``p.Hp``). One read of the device per
    iteration (its tests), and one before the first."""
    S = torch.zeros_like(rhs)
    R = rhs.clone()
    target = tol * torch.linalg.vector_norm(rhs, dim=0)
    active = torch.linalg.vector_norm(R, dim=0) > target
    if not bool(active.any()):
        return S, 0, True
    Zp = solve_factored(factor, R)
    P = torch.where(active, Zp, 0.0)
    rz = (R * Zp).sum(0)
    for it in range(1, max_iter + 1):
        HP = matvec(P)
        pHp = (P * HP).sum(0)
        broken = ~torch.isfinite(pHp).all() | (active & (pHp <= 0)).any()
        alpha = torch.where(active, rz / torch.where(active, pHp, 1.0), 0.0)
        S = S + alpha * P
        R_new = R - alpha * HP
        active = active & (torch.linalg.vector_norm(R_new, dim=0) > target)
        # the iteration's one read of the device: breakdown, and whether any column goes on
        broken_now, going = torch.stack((broken, active.any())).tolist()
        if broken_now:
            return None, it, False
        if not going:
            return S, it, True
        Z_new = solve_factored(factor, R_new)
        beta = torch.where(active, (Z_new * (R_new - R)).sum(0) / rz, 0.0)
        rz = (R_new * Z_new).sum(0)
        R = R_new
        P = torch.where(active, Z_new + beta * P, 0.0)
    return S, max_iter, False


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
