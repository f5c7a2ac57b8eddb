"""One batched Newton removal step and its float64 certificate (Guo et al. 2020, Alg. 2 / Cor. 2).

The step never uses ``b``: each release is a function of the previous release and the data only.
It is computed out of place; the caller commits or discards it.

Two solvers for ``H' s = Delta`` (docs/theory.md "Removal"), chosen per step by their estimated
cost (:func:`core.solvers.choose_solver`; options, cache and the direct solve live in
:mod:`core.solvers`):

- **direct**: one weighted Gram matrix per class (O(n d^2), float32, from the problem's float32
  copy of X), one Cholesky factorisation and solve, one float64 refinement step. Its factor is
  kept (:class:`SolverCache`, in memory only) as the preconditioner of the next steps.
- **iterative**: preconditioned conjugate gradients with Hessian-vector products
  ``X^T (C l''(Z) (X v)) + lam n' v`` in float32 on the problem's float32 copy of X (two passes,
  half the bytes of float64, O(n d) per class; CG's vectors and recurrences are float64), the
  cached factor of an earlier Hessian as the preconditioner. A few iterations per step while the
  factor stays close to the current Hessian; the next step refactors (direct) when they grow
  past ``refactor_iterations``, or past the fresh factor's count where the direct step costs
  less than the iterations it saves (:func:`core.solvers.refactor_pays`), and a step whose CG
  does not reach its tolerance, or whose
  certified residual is far above it, is redone with the direct solver.

Either way the certificate is the same and trusts neither solver: two passes over the float64 X
(``X [W_new, s]`` and ``X^T [...]``, each one product of ``2K`` columns in the layout measured
fastest, :func:`core.products.thin_product`, or both per block of rows where that was measured
faster, :func:`core.blocked.certificate_products`) at the weights as stored give
``grad L_0(W_new; D')`` (the exact accounting) and ``H' s - Delta`` for the step actually
applied, which the bound accounting charges. The float32 copy of X never enters it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from core.blocked import (
    CURVATURE_FLOOR,
    LogisticTerms,
    certificate_products,
    curvature32,
    hvp,
)
from core.bounds import (
    margins_rounding_tensor,
    product_error,
    remainder_from_sums,
    rounding_margin,
)
from core.loss import margins
from core.newton import pcg
from core.problem import Problem
from core.solvers import (
    DEFAULT_SOLVE,
    HESSIANS,
    SOLVERS,
    SolveOptions,
    SolverCache,
    choose_solver,
    direct_solve,
)

__all__ = [
    "CURVATURE_FLOOR",
    "DEFAULT_SOLVE",
    "SOLVERS",
    "SolveOptions",
    "SolverCache",
    "Step",
    "choose_solver",
    "newton_step",
]


@dataclass(frozen=True)
class Step:
    """A computed (not yet committed) removal step.

    ``anchor_distance`` is ``||grad L_0(W_new; D') - g_a||_F`` and ``margin`` its rounding margin;
    ``increments`` (K,) are the a-priori bound increments per class (margin included), of which
    ``solve_residual`` (K,) is ``||H' s - Delta||`` per class (both float64 on the CPU, read
    back with the rest of the certificate); ``Z`` the margins at ``W`` (reused
    by the next step); ``method`` the solver used (``"direct"`` or ``"iterative"``),
    ``iterations`` its CG iterations and ``cache`` the solver cache after the step.
    """

    W: torch.Tensor
    Z: torch.Tensor
    alive: torch.Tensor
    anchor_distance: float
    margin: float
    increments: torch.Tensor
    solve_residual: torch.Tensor | None = None
    #: ``max_k ||H' s_k - Delta_k|| / ||Delta_k||``: how well the step solved its system
    residual_ratio: float = 0.0
    #: the direct solve's Hessian dtype (``"float32"``, ``"bfloat16"`` or ``"float64"`` after a
    #: fallback); None for an iterative step
    hessian: str | None = None
    method: str = "direct"
    iterations: int = 0
    cache: SolverCache | None = None


def newton_step(
    problem: Problem,
    alive: torch.Tensor,
    W: torch.Tensor,
    rows: torch.Tensor,
    anchor_grad: torch.Tensor,
    Z: torch.Tensor | None = None,
    *,
    cache: SolverCache | None = None,
    options: SolveOptions = DEFAULT_SOLVE,
) -> Step | None:
    """Remove ``rows`` (currently alive) with one Newton step; None if it is not finite.

    Delta = sum_R C_j l'(z_j) y_j x_j + lam m w;  H' = Hessian of the remaining rows at W;
    solve H' s = Delta (direct: Cholesky in float32, then one float64 refinement step; or
    iterative: CG with float32 products preconditioned by ``cache``'s factor,
    :func:`choose_solver`);
    certify in float64 at the weights as stored: s := W_new - W, H's recomputed from the data.
    ``Z`` are the margins ``Y * (X W)`` if the caller has them.

    Host reads: the direct path reads the device once, at the end of its certificate (every
    scalar of the step, and whether the Cholesky factorisation succeeded, in one transfer); CG
    once per iteration (its stopping test), then once for the certificate. Nothing else waits
    for the device (on a GPU the step is queued kernels).
    """
    X, Y, lam = problem.X, problem.Y, problem.lam
    if Z is None:
        Z = margins(X, Y, W)
    alive_after = alive.clone()
    alive_after[rows] = False
    C = problem.weights(alive_after)
    m = rows.numel()
    n_after = alive_after.sum(dtype=X.dtype)  # on the device: no read
    sig_neg = torch.sigmoid(-Z)
    curvature = C * (torch.sigmoid(Z) * sig_neg)  # C_i l''(z_i) on the remaining rows
    delta_grad = X[rows].T @ (problem.omega[rows] * -sig_neg[rows] * Y[rows]) + (lam * m) * W
    ridge = lam * n_after
    # over the removed rows: sum C ||x||^2 (the rounding of their margins behind Delta) and
    # sum C |l'| ||x|| (the summation margin of Delta's own sum)
    removed_norms = problem.row_norms[rows]
    removed_sq = problem.row_norms_sq[rows] @ problem.omega[rows]
    removed_abs = (removed_norms @ (problem.omega[rows] * sig_neg[rows])).sum()

    def certify(
        S: torch.Tensor, method: str, its: int, new_cache: SolverCache, ok: torch.Tensor | None
    ) -> Step | None:
        return _certify(
            problem, W, S, C, curvature, delta_grad, n_after, anchor_grad, alive_after,
            method=method, iterations=its, cache=new_cache, removed_sq=removed_sq,
            removed_abs=removed_abs, ok=ok,
        )  # fmt: skip

    if choose_solver(problem, m, cache, options) == "iterative":
        assert cache is not None
        # float32 products on the problem's float32 copy of X, float64 vectors (core.blocked.hvp)
        curvature_32 = curvature32(curvature)
        S, its, converged = pcg(
            lambda V: hvp(problem.X32, curvature_32, V, ridge),
            cache.factor,
            delta_grad,
            options.cg_tol,
            options.cg_max_iter,
        )
        if S is not None and (converged or not options.fallback):
            new_cache = cache.after_cg(problem, its, converged, options)
            step = certify(S, "iterative", its, new_cache, None)
            if step is not None and (not options.fallback or _solved(step, options)):
                return step
        # CG failed (no convergence, breakdown, or a true residual far above its recurrence):
        # this step falls back to the direct solver, which refactors.

    # The fast dtype first; a failed factorisation or a non-finite step (known at the
    # certificate's one read) is solved again in float32 (after bfloat16), then float64.
    first = problem.hess_dtype if options.hessian == "float32" else HESSIANS[options.hessian]
    for dtype in dict.fromkeys((first, problem.hess_dtype, torch.float64)):
        solved = direct_solve(problem, curvature, ridge, delta_grad, dtype, options)
        if solved is None:  # known to have failed without a certificate (bfloat16's CG)
            continue
        S, factor, ok, its = solved
        # a factor that needed CG iterations (bfloat16's) is as good a preconditioner as that
        # says: the next steps' solver choice weighs them, and refactors past the threshold
        new_cache = SolverCache(
            factor.to(torch.float64), its, refactor=its > options.refactor_iterations
        )
        step = certify(S, "direct", 0, new_cache, ok)
        if step is not None:
            return dataclasses.replace(step, hessian=str(dtype).removeprefix("torch."))
    return None


def _certify(
    problem: Problem,
    W: torch.Tensor,
    S: torch.Tensor,
    C: torch.Tensor,
    curvature: torch.Tensor,
    delta_grad: torch.Tensor,
    n_after: torch.Tensor,
    anchor_grad: torch.Tensor,
    alive_after: torch.Tensor,
    *,
    method: str,
    iterations: int,
    cache: SolverCache | None,
    removed_sq: torch.Tensor,
    removed_abs: torch.Tensor,
    ok: torch.Tensor | None = None,
) -> Step | None:
    """The float64 certificate of the step ``S`` (any solver): None if ``W + S`` is not finite
    or ``ok`` (a 0-d bool on the device: the solve succeeded) is false.

    Every scalar stays on the device until one transfer at the end (a GPU queues the whole
    certificate without waiting); the step's increments and solve residuals come back as
    float64 CPU tensors, which the accounting sums on the CPU."""
    X, Y, lam = problem.X, problem.Y, problem.lam
    W_new = W + S
    S = W_new - W  # the step actually applied, after rounding

    # Certificate, float64, two passes over X (or one, by blocks: core.blocked): margins at
    # W_new with X s, then X^T of both terms.
    k = W.shape[1]

    neg_cy = -(C * Y)  # exact: C in {0, 1}, |y| = 1
    norm = torch.linalg.vector_norm
    n, d = X.shape
    # |x.s| computed: the remainder bound takes an upper bound of the exact one,
    # |x.s| + gamma_d ||x|| ||s|| (s_err = gamma_d ||s|| per class)
    s_err = product_error(d) * norm(S, dim=0)
    # the 2K columns of X^T's argument, C l'(z_new) y and C l''(z) X s, and the sums over the
    # rows that the bounds below take (core.certificate_terms.LogisticTerms.bound_sums; the fused
    # kernel computes them with the products)
    terms_of = LogisticTerms(
        Y, neg_cy, curvature, (C, problem.row_norms, problem.row_norms_sq, s_err)
    )
    P, terms, Q = certificate_products(
        X, torch.cat((W_new, S), dim=1), terms_of, X32=problem.exact_float32()
    )
    abs_gradient, abs_curvature, alive_sq, curvature_sq, remainder_sq, remainder_rows = (
        terms_of.bound_sums(P, terms)
    )
    Z_new = Y * P[:, :k]
    grad_new = Q[:, :k] + (lam * n_after) * W_new  # grad L_0(W_new; D')
    solve_residual = Q[:, k:] + (lam * n_after) * S - delta_grad  # H's - Delta at W
    # sum_i |term_ik| ||x_i|| per column, for the summation margins (C, l'' >= 0 and |y| = 1, so
    # |C l' y| = C |l'| and |C l'' x.s| = C l'' |x.s|)
    margin = rounding_margin(n, d, abs_gradient.sum(), lam, n_after, norm(W_new), norm(anchor_grad))
    # Rounding of H's - Delta itself (bound accounting): the same form of summation margin.
    hs_margin = rounding_margin(
        n, d, abs_curvature.sum() + removed_abs, lam, n_after, norm(S), norm(delta_grad)
    )
    # Rounding of the products x.w and x.s that feed those sums (docs/theory.md "Float32
    # Hessians, float64 certificates"): the margins at W_new (the gradient), X s (H's), the old
    # margins Z behind l'' (H) and l' of the removed rows (Delta, over the rows alive before).
    # alive_sq: (K,) sum_i C_ik ||x_i||^2 over the remaining rows
    before_sq = alive_sq + removed_sq
    margin = margin + margins_rounding_tensor(d, alive_sq, W_new)
    hs_margin = (
        hs_margin
        + margins_rounding_tensor(d, alive_sq, S)
        + margins_rounding_tensor(d, before_sq, W)
        + margins_rounding_tensor(d, curvature_sq, W)
    )
    residual_norms = norm(solve_residual, dim=0)
    increments = (
        residual_norms
        + remainder_from_sums(remainder_sq, remainder_rows, problem.x_norm2)
        + margin
        + hs_margin
    )
    # (anchor distance, margin, increments: K) must be finite; then the residuals and ||Delta||
    packed = torch.cat(
        (
            torch.stack((norm(grad_new - anchor_grad), margin)),
            increments,
            residual_norms,
            norm(delta_grad, dim=0),
        )
    )
    good = torch.isfinite(W_new).all() & torch.isfinite(packed[: 2 + k]).all()
    if ok is not None:
        good = good & ok
    # the step's one read of the device
    values = torch.cat((good.to(X.dtype)[None], packed)).tolist()
    if values[0] != 1.0:
        return None
    return Step(
        W=W_new,
        Z=Z_new,
        alive=alive_after,
        anchor_distance=values[1],
        margin=values[2],
        increments=torch.tensor(values[3 : 3 + k], dtype=torch.float64),
        solve_residual=torch.tensor(values[3 + k : 3 + 2 * k], dtype=torch.float64),
        residual_ratio=max(map(_ratio, values[3 + k : 3 + 2 * k], values[3 + 2 * k :])),
        method=method,
        iterations=iterations,
        cache=cache,
    )


def _solved(step: Step, options: SolveOptions) -> bool:
    """Whether the certified (true, float64) solve residual of an iterative step is within 100x
    CG's tolerance (at least 1e-9 relative: the recurrence residual can drift from the true one);
    else the step is redone with the direct solver."""
    return step.residual_ratio <= max(100 * options.cg_tol, 1e-9)


def _ratio(residual: float, rhs: float) -> float:
    """``residual / rhs``; 0 for an exact solve of a zero right-hand side, inf for an inexact
    one or a NaN (which ``max`` would otherwise pass over, depending on its place)."""
    if math.isnan(residual) or math.isnan(rhs):
        return math.inf
    if rhs > 0:
        return residual / rhs
    return 0.0 if residual == 0 else math.inf
