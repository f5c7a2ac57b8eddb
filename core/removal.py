"""One batched Newton removal step and its float64 certificate (Guo et al. 2020, Alg. 2 / Cor. 2).

The step never uses ``b``: each release is a function of the previous release and the data only.
It is computed out of place; the caller commits or discards it. Per step the work is one weighted
Gram matrix per class (O(n d^2)), one Cholesky solve per class, and two passes over X for the
certificate (``X [W_new, s]`` and ``X^T [...]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.bounds import remainder_bound, rounding_margin
from core.errors import NumericalError
from core.loss import (
    cholesky_factor,
    frobenius,
    margins,
    solve_factored,
    weighted_gram,
    xt_dot,
)
from core.problem import Problem


@dataclass(frozen=True)
class Step:
    """A computed (not yet committed) removal step.

    ``anchor_distance`` is ``||grad L_0(W_new; D') - g_a||_F`` and ``margin`` its rounding margin;
    ``increments`` (K,) are the a-priori bound increments per class (margin included); ``Z`` the
    margins at ``W`` (reused by the next step).
    """

    W: torch.Tensor
    Z: torch.Tensor
    alive: torch.Tensor
    anchor_distance: float
    margin: float
    increments: torch.Tensor


def newton_step(
    problem: Problem,
    alive: torch.Tensor,
    W: torch.Tensor,
    rows: torch.Tensor,
    anchor_grad: torch.Tensor,
    Z: torch.Tensor | None = None,
) -> Step | None:
    """Remove ``rows`` (currently alive) with one Newton step; None if it is not finite.

    Delta = sum_R C_j l'(z_j) y_j x_j + lam m w;  H' = Hessian of the remaining rows at W;
    solve H' s = Delta (Cholesky in float32, then one float64 refinement step);
    certify in float64 at the weights as stored: s := W_new - W, H's recomputed from the data.
    ``Z`` are the margins ``Y * (X W)`` if the caller has them.
    """
    X, Y, lam = problem.X, problem.Y, problem.lam
    if Z is None:
        Z = margins(X, Y, W)
    alive_after = alive.clone()
    alive_after[rows] = False
    C = problem.weights(alive_after)
    m = rows.numel()
    n_after = float(alive.sum()) - m
    sig_neg = torch.sigmoid(-Z)
    curvature = C * (torch.sigmoid(Z) * sig_neg)  # C_i l''(z_i) on the remaining rows
    delta_grad = X[rows].T @ (problem.omega[rows] * -sig_neg[rows] * Y[rows]) + (lam * m) * W

    S = _solve(problem, curvature, n_after, delta_grad)
    if S is None:
        return None
    W_new = W + S
    if not bool(torch.isfinite(W_new).all()):
        return None
    S = W_new - W  # the step actually applied, after rounding

    # Certificate, float64, two passes over X: margins at W_new with X s, then X^T of both terms.
    k = W.shape[1]
    P = X @ torch.cat((W_new, S), dim=1)
    Z_new, XS = Y * P[:, :k], P[:, k:]
    d1_new = -torch.sigmoid(-Z_new)
    Q = xt_dot(X, torch.cat((C * d1_new * Y, curvature * XS), dim=1))
    grad_new = Q[:, :k] + (lam * n_after) * W_new  # grad L_0(W_new; D')
    solve_residual = Q[:, k:] + (lam * n_after) * S - delta_grad  # H's - Delta at W
    margin = rounding_margin(
        X.shape[0],
        X.shape[1],
        float((C * d1_new.abs() * problem.row_norms[:, None]).sum()),
        lam,
        n_after,
        frobenius(W_new),
        frobenius(anchor_grad),
    )
    # Rounding of H's - Delta itself (bound accounting): the same form of summation margin.
    hs_margin = rounding_margin(
        X.shape[0],
        X.shape[1],
        float((curvature * XS.abs() * problem.row_norms[:, None]).sum()),
        lam,
        n_after,
        frobenius(S),
        frobenius(delta_grad),
    )
    increments = (
        torch.linalg.vector_norm(solve_residual, dim=0)
        + remainder_bound(XS, C, problem.row_norms, problem.x_norm2)
        + margin
        + hs_margin
    )
    return Step(
        W=W_new,
        Z=Z_new,
        alive=alive_after,
        anchor_distance=frobenius(grad_new - anchor_grad),
        margin=margin,
        increments=increments,
    )


def _solve(
    problem: Problem, curvature: torch.Tensor, n_after: float, rhs: torch.Tensor
) -> torch.Tensor | None:
    """Cholesky solve in the fast dtype, one float64 refinement step, float64 retry on failure."""
    X, lam = problem.X, problem.lam
    ridge = lam * n_after
    for dtype in dict.fromkeys((problem.hess_dtype, torch.float64)):
        try:
            L = cholesky_factor(weighted_gram(X, curvature, ridge, dtype=dtype), lam)
            S = solve_factored(L, rhs)
            if dtype != torch.float64:
                # Iterative refinement: the float64 residual of the float32 solve, solved again
                # with the same factor.
                resid = rhs - (xt_dot(X, curvature * (X @ S)) + ridge * S)
                S = S + solve_factored(L, resid)
        except NumericalError:
            continue
        if bool(torch.isfinite(S).all()):
            return S
    return None
