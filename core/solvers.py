"""How a removal step solves ``H' s = Delta`` (docs/theory.md "Removal"): the options
(:class:`SolveOptions`), the in-memory preconditioner (:class:`SolverCache`), the choice between
the direct and the iterative solver by their estimated cost (:func:`choose_solver`) and the
direct solve itself (:func:`direct_solve`). The step and its certificate are
:mod:`core.removal`, which trusts none of this.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from core.blocked import hvp
from core.errors import NumericalError
from core.loss import cholesky_factor, hessians, margins, solve_factored, weighted_gram
from core.newton import pcg
from core.problem import Problem
from core.products import f32_product_cost, gram_cost

SOLVERS = ("auto", "direct", "iterative")
#: the direct solver's Hessian dtypes (:attr:`SolveOptions.hessian`)
HESSIANS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SolveOptions:
    """How :func:`core.removal.newton_step` solves ``H' s = Delta``.

    ``solver``: ``"auto"`` (the cheaper by :func:`choose_solver`), ``"direct"`` or
    ``"iterative"`` (CG whenever a factor is cached). ``cg_tol``: CG stops when
    ``||H' s - Delta_k|| <= cg_tol ||Delta_k||`` for every class k on its recurrence residual,
    whose operator is applied in float32 (it is about 1e-7 relative off the float64 Hessian, so
    the true residual stalls near 1e-8 to 1e-7 of ``||Delta||``; the certificate measures the
    true one). The default 1e-6 is reached reliably: a single removal on the MNIST shape took 2
    iterations and left ``||H's - Delta|| = 3e-9``, 0.1 % of its bound increment (2.7e-6), and
    moved the exact figure by 0.04 %; on digits 8e-8 against 1.6e-3. Tolerances of 1e-9 and below
    are not reached with float32 products: such steps fall back to the direct solve.
    ``cg_max_iter``: CG's iteration limit. A step that needed more than ``refactor_iterations``
    makes the next step refactor. ``fallback``: redo with the direct solver a step whose CG did
    not converge or whose certified residual exceeds ``max(100 cg_tol, 1e-9) ||Delta_k||``
    (False keeps the unconverged iterate; its solve residual is charged like any other, for
    tests). ``hessian``: the direct solver's Hessian, ``"float32"`` (one float64 refinement
    step) or ``"bfloat16"`` (products of bfloat16 copies summed in float32, for large batches
    on a GPU; its factor preconditions CG with float64 Hessian-vector products down to
    ``cg_tol``, which makes it float64 iterative refinement; a solve that does not get there
    is done again in float32, then float64). The certificate charges whatever residual any of
    them leaves. ``defer_refactor``: a refactor that a converged CG step asks for (its
    iterations grew, :meth:`SolverCache.after_cg`) is left to the caller, who factors the
    Hessian away from the steps (:func:`core.epoch.refactor_job`, e.g. in another thread) and
    installs it (:func:`core.epoch.with_factor`): the steps meanwhile stay iterative on the old
    factor, an iteration or two more each instead of one direct step (a worker's drain, whose
    tail latency a direct step sets); a step whose CG fails still refactors itself.
    """

    solver: str = "auto"
    cg_tol: float = 1e-6
    cg_max_iter: int = 25
    refactor_iterations: int = 5
    fallback: bool = True
    hessian: str = "float32"
    defer_refactor: bool = False

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {tuple(HESSIANS)}, got {self.hessian!r}")
        if not (self.cg_tol > 0 and self.cg_max_iter >= 1 and self.refactor_iterations >= 1):
            raise ValueError("cg_tol must be > 0, cg_max_iter and refactor_iterations >= 1")


DEFAULT_SOLVE = SolveOptions()


@dataclass(frozen=True)
class SolverCache:
    """The preconditioner of the iterative solver: lower Cholesky factors (K, d, d) float64 of a
    recent Hessian (of a training fit or a direct step). A function of released weights and the
    data only (never of ``b``); kept in memory, never persisted.

    ``iterations``: CG iterations of the last iterative step (0: none since the factor);
    ``refactor``: the next step refactors (CG needed more than the threshold, or failed, or a
    refactor pays for itself, :func:`refactor_pays`); ``base``: CG iterations of the first
    iterative step on this factor (0: none yet); ``lasted``: the iterative steps on this factor
    that needed no more than ``base`` (how long a fresh factor keeps CG at its fewest);
    ``stalled``: the last CG on it did not converge (a refactor no option defers)."""

    factor: torch.Tensor
    iterations: int = 0
    refactor: bool = False
    base: int = 0
    lasted: int = 0
    stalled: bool = False

    @classmethod
    def of(cls, factor: torch.Tensor | None, iterations: int = 0) -> SolverCache | None:
        """A cache seeded by ``factor`` (any dtype; None gives None) that needed ``iterations``
        CG iterations last."""
        return None if factor is None else cls(factor.to(torch.float64), iterations)

    def after_cg(
        self, problem: Problem, its: int, converged: bool, options: SolveOptions
    ) -> SolverCache:
        """This cache after an iterative step of ``its`` CG iterations on its factor: the next
        step refactors when CG did not converge, needed more than ``refactor_iterations``, or
        (under ``"auto"``) when :func:`refactor_pays`; the first iterative step on the factor
        sets ``base``, and a step within it counts in ``lasted``."""
        refactor = (
            not converged
            or its > options.refactor_iterations
            or (options.solver == "auto" and refactor_pays(problem, its, self))
        )
        base = self.base or its
        return dataclasses.replace(
            self,
            iterations=its,
            refactor=refactor,
            base=base,
            lasted=self.lasted + (0 < base and its <= base),
            stalled=not converged,
        )

    def refactor_now(self, options: SolveOptions) -> bool:
        """Whether the next step must factor the Hessian itself: a refactor is asked for and
        ``options`` does not defer it (or CG stalled on this factor)."""
        return self.refactor and (self.stalled or not options.defer_refactor)


def choose_solver(
    problem: Problem, m: int, cache: SolverCache | None, options: SolveOptions = DEFAULT_SOLVE
) -> str:
    """``"direct"`` or ``"iterative"`` for a step removing ``m`` rows.

    Direct without a cached factor, when the cache asks for a refactor that ``options`` does
    not defer (:meth:`SolverCache.refactor_now`), or when asked. Under
    ``"auto"`` the estimated costs beyond the certificate (which both pay), in float64 passes
    over X (``n d K`` multiply-adds): the direct path ``GRAM_COST d + 2`` (the float32 Gram
    matrix, :data:`core.products.GRAM_COST`, and the float64 refinement's two passes); the
    iterative one ``2 F32_PRODUCT_COST (its + log10(m) / 2)``, two float32 passes
    (:data:`core.products.F32_PRODUCT_COST`) per CG iteration, with ``its`` the last step's CG
    iterations (at least 2): a larger batch moves the Hessian further from the factor (measured
    on the 2-vCPU VM with ``cg_tol`` 1e-6: 2 iterations at a batch of 1 and 100, 3 at 1,000 on
    the MNIST shape, where CG took 10-14 ms a step against 63 direct; 2 at 300 and 3 at 8,192 on
    n = 100,000, d = 64, where it took 9.6 and 12.7 ms against 15.6 and 14.9 ms direct).
    """
    if options.solver == "direct" or cache is None or cache.refactor_now(options):
        return "direct"
    if options.solver == "iterative":
        return "iterative"
    expected = max(cache.iterations, 2) + 0.5 * math.log10(max(m, 1))
    iterative = _cg_iteration_cost(problem) * expected
    return "iterative" if iterative < _direct_cost(problem) else "direct"


def _cg_iteration_cost(problem: Problem) -> float:
    """One CG iteration in :func:`choose_solver`'s units: two float32 passes over X."""
    return 2.0 * f32_product_cost(problem.X.device)


def _direct_cost(problem: Problem) -> float:
    """The direct path in :func:`choose_solver`'s units: the float32 Gram matrix and the float64
    refinement's two passes."""
    return gram_cost(problem.X.device) * problem.X.shape[1] + 2.0


def refactor_pays(problem: Problem, its: int, cache: SolverCache) -> bool:
    """Whether refactoring after an iterative step that took ``its`` CG iterations on
    ``cache``'s factor costs less than going on with it: the next step then solves directly
    (:func:`choose_solver`'s cost of the direct path, instead of ``its`` iterations), and the
    steps after it are back at the factor's fewest iterations (``cache.base``) for about as
    many steps as this factor stayed there (``cache.lasted``), one or more iterations cheaper
    each. Costs in :func:`choose_solver`'s units.

    As an epoch's removals accumulate, the Hessian moves away from the factor and CG needs one
    iteration more, for the rest of the epoch: at n = 100,000, d = 64, steps of 200 rows went
    from 2 to 3 iterations after about 4,000 removals of a 25,000-removal epoch and stayed there
    (4-8 ms more per step on a 2-vCPU Xeon VM, medians within one process, where a direct step
    cost 12-16 ms more than one at 2 iterations). Only the solver's path changes: the
    certificate is the same, and charges whatever residual either path leaves."""
    if cache.base <= 0 or its <= cache.base or cache.lasted <= 0:
        return False
    per_iteration = _cg_iteration_cost(problem)
    extra = _direct_cost(problem) - per_iteration * its
    return (its - cache.base) * per_iteration * cache.lasted > extra


def direct_solve(
    problem: Problem,
    curvature: torch.Tensor,
    ridge: torch.Tensor,
    rhs: torch.Tensor,
    dtype: torch.dtype,
    options: SolveOptions = DEFAULT_SOLVE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """Cholesky solve with the Hessian in ``dtype`` and, below float64, float64 refinement:
    one step after a float32 Hessian; after a bfloat16 one, CG on the float64 Hessian-vector
    products preconditioned by the factor, to ``options.cg_tol`` (a bfloat16 Hessian is about
    4e-3 relative off; a fixed number of plain refinement steps need not converge when the
    Hessian is ill-conditioned, CG does).

    Returns the step, the Cholesky factors used, whether the factorisation succeeded (a 0-d
    bool left on the device: the certificate reads it with everything else) and the CG
    iterations (0 without CG); None when the bfloat16 path failed, which CG's own reads of the
    device already tell (a failed factorisation, a breakdown, no convergence)."""
    X = problem.X
    H = weighted_gram(X, curvature, ridge, dtype=dtype, X32=problem.X32)
    L, info = torch.linalg.cholesky_ex(H)
    factored = (info == 0).all()
    if dtype == torch.bfloat16:
        if not bool(factored):  # CG reads the device anyway: one read more
            return None
        S, its, converged = pcg(
            lambda V: hvp(X, curvature, V, ridge), L, rhs, options.cg_tol, options.cg_max_iter
        )
        return None if S is None or not converged else (S, L, factored, its)
    S = solve_factored(L, rhs)
    if dtype != torch.float64:
        # Iterative refinement: the float64 residual of the float32 solve, solved again with
        # the same factor.
        resid = rhs - hvp(X, curvature, S, ridge)
        S = S + solve_factored(L, resid)
    return S, L, factored, 0


def fresh_factor(
    problem: Problem, alive: torch.Tensor, W: torch.Tensor, Z: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Lower Cholesky factors (K, d, d) float64 of the Hessian of the rows ``alive`` at ``W``
    (``Z``: the margins ``Y * (X W)`` where known), the Hessian in the problem's dtype from its
    float32 copy of X (float64 where that does not factor, as a direct step does): the factor a
    direct step there would keep, for a deferred refactor (:attr:`SolveOptions.defer_refactor`).
    None when neither factors. A function of the weights and the data only (never of ``b``); a
    preconditioner, which no certificate trusts."""
    X, lam = problem.X, problem.lam
    if Z is None:
        Z = margins(X, problem.Y, W)
    C, n_reg = problem.weights(alive), float(alive.sum())
    for dtype in dict.fromkeys((problem.hess_dtype, torch.float64)):
        try:
            H = hessians(X, C, Z, lam, n_reg, dtype=dtype, X32=problem.X32)
            return cholesky_factor(H, lam).to(torch.float64)
        except NumericalError:
            continue
    return None
