"""One batched Newton removal step and its float64 certificate (Guo et al. 2020, Alg. 2 / Cor. 2).

The step never uses ``b``: each release is a function of the previous release and the data only.
It is computed out of place; the caller commits or discards it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.bounds import remainder_bound, rounding_margin
from core.errors import NumericalError
from core.loss import (
    cholesky_solve,
    frobenius,
    gradient,
    hessian_vector_product,
    hessians,
    loss_derivatives,
    margins,
)


@dataclass(frozen=True)
class Problem:
    """The fixed data of a model: float64 rows, labels, subsampling mask and derived constants.

    Shapes: X (n, d) float64; Y (n, K) in {-1, +1}; omega (n, K) in {0, 1}; row_norms (n,).
    ``x_norm2`` is an upper bound on the full training matrix's spectral norm.
    """

    X: torch.Tensor
    Y: torch.Tensor
    omega: torch.Tensor
    row_norms: torch.Tensor
    x_norm2: float
    lam: float
    hess_dtype: torch.dtype

    def weights(self, alive: torch.Tensor) -> torch.Tensor:
        """Row weights ``C = alive * omega`` (n, K) in X's dtype."""
        return self.omega * alive.to(self.X.dtype)[:, None]


@dataclass(frozen=True)
class Step:
    """A computed (not yet committed) removal step.

    ``anchor_distance`` is ``||grad L_0(W_new; D') - g_a||_F`` and ``margin`` its rounding margin;
    ``increments`` (K,) are the a-priori bound increments per class (margin included).
    """

    W: torch.Tensor
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
) -> Step | None:
    """Remove ``rows`` (currently alive) with one Newton step; None if it is not finite.

    Delta = sum_R C_j l'(z_j) y_j x_j + lam m w;  H' = Hessian of the remaining rows at W;
    solve H' s = Delta (Cholesky; float32 on CUDA then one float64 refinement step);
    certify in float64 at the weights as stored: s := W_new - W.
    """
    X, Y, lam = problem.X, problem.Y, problem.lam
    C_before = problem.weights(alive)
    alive_after = alive.clone()
    alive_after[rows] = False
    C = problem.weights(alive_after)
    n_before = float(alive.sum())
    m = rows.numel()
    n_after = n_before - m
    Z = margins(X, Y, W)
    d1, _ = loss_derivatives(Z[rows])
    delta_grad = X[rows].T @ (C_before[rows] * d1 * Y[rows]) + (lam * m) * W

    S = _solve(problem, C, Z, n_after, delta_grad)
    if S is None:
        return None
    W_new = W + S
    S = W_new - W  # the step actually applied, after rounding
    if not bool(torch.isfinite(W_new).all()):
        return None

    Z_new = margins(X, Y, W_new)
    G_new = gradient(X, Y, C, W_new, lam, n_after, Z=Z_new)
    d1_new, _ = loss_derivatives(Z_new)
    margin = rounding_margin(
        X.shape[0],
        X.shape[1],
        float((C * d1_new.abs() * problem.row_norms[:, None]).sum()),
        lam,
        n_after,
        frobenius(W_new),
        frobenius(anchor_grad),
    )
    solve_residual = hessian_vector_product(X, C, Z, S, lam, n_after) - delta_grad
    increments = (
        torch.linalg.vector_norm(solve_residual, dim=0)
        + remainder_bound(X @ S, C, problem.row_norms, problem.x_norm2)
        + margin
    )
    return Step(
        W=W_new,
        alive=alive_after,
        anchor_distance=frobenius(G_new - anchor_grad),
        margin=margin,
        increments=increments,
    )


def _solve(
    problem: Problem, C: torch.Tensor, Z: torch.Tensor, n_after: float, rhs: torch.Tensor
) -> torch.Tensor | None:
    """Cholesky solve in the fast dtype, one float64 refinement step, float64 retry on failure."""
    X, lam = problem.X, problem.lam
    for dtype in dict.fromkeys((problem.hess_dtype, torch.float64)):
        try:
            H = hessians(X, C, Z, lam, n_after, dtype=dtype)
            S = cholesky_solve(H, rhs, lam)
            if dtype != torch.float64:
                # Iterative refinement: the float64 residual of the float32 solve, solved again.
                S = S + cholesky_solve(
                    H, rhs - hessian_vector_product(X, C, Z, S, lam, n_after), lam
                )
        except NumericalError:
            continue
        if bool(torch.isfinite(S).all()):
            return S
    return None
