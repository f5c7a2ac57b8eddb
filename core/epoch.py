"""A noise epoch: everything that one draw of ``b`` and the removals served on it determine, as
ONE immutable value (:class:`NoiseEpoch`). A removal step makes a new epoch value; a rollback is a
single assignment of the old one. :func:`fit_epoch` fits a new epoch (pure: it reads only the
fixed problem and options); :func:`commit_prefix` serves a batch of removal groups on an epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core.accountant import Accountant, anchored
from core.newton import gradient_tolerance, newton_fit
from core.noise import draw_noise, generator
from core.problem import Hyper, Problem
from core.removal import DEFAULT_SOLVE, SolveOptions, SolverCache, Step, newton_step
from core.rowview import RowView, row_view, view_of
from core.solvers import fresh_factor
from core.trigger import auto_max_removals, resolve_max_removals


@dataclass(frozen=True)
class NoiseEpoch:
    """The state of one noise epoch (also a fitted epoch not yet in use: a prepared retrain).

    Holds the noise ``b`` and ``g_a`` in memory only, like the model itself; never persisted or
    exported."""

    #: the model version the epoch was fitted for (a prepared epoch is adopted only by it)
    version: int
    W: torch.Tensor
    alive: torch.Tensor
    #: ``b`` (None for a model loaded from disk: ``b`` is never written)
    noise: torch.Tensor | None
    acct: Accountant
    certified: bool
    #: the resolved b-independent trigger of this epoch (None: no trigger)
    max_removals: int | None
    #: (rows, max_removals) of the last "auto" estimate, scaled at retrains
    auto_basis: tuple[int, int] | None
    removed_in_epoch: int = 0
    #: rows removed since the DP extractor was trained (head retrains do not reset it)
    extractor_removed: int = 0
    #: margins at ``W`` on the epoch's rows (its ``view``'s, or all), cached between steps
    Z: torch.Tensor | None = None
    #: the removal solver's preconditioner (a Cholesky factor of a recent Hessian: of the fit,
    #: then of the last direct step); a function of released weights and the data, in memory
    #: only, never persisted (core.state writes named fields only)
    solver: SolverCache | None = None
    #: the rows alive when the epoch was fitted, gathered (:mod:`core.rowview`; None: all rows):
    #: its steps read only those; in memory only
    view: RowView | None = None

    @property
    def r0_anchor(self) -> float:
        return self.acct.r0

    def commit(self, step: Step, m: int) -> NoiseEpoch:
        """The epoch after a removal ``step`` of ``m`` rows."""
        return dataclasses.replace(
            self,
            W=step.W,
            alive=step.alive,
            Z=step.Z,
            solver=step.cache if step.cache is not None else self.solver,
            acct=self.acct.commit(step),
            removed_in_epoch=self.removed_in_epoch + m,
            extractor_removed=self.extractor_removed + m,
        )


def fit_epoch(
    problem: Problem,
    hyper: Hyper,
    budget_total: float,
    alive: torch.Tensor,
    *,
    binary: bool,
    version: int,
    seed: int | None,
    W0: torch.Tensor | None,
    basis: tuple[int, int] | None = None,
    reestimate: bool = True,
    precond: torch.Tensor | None = None,
) -> NoiseEpoch:
    """Fit a noise epoch on ``alive`` with fresh noise (``seed`` for tests only): the weights,
    the accounting anchor and the resolved trigger (``basis``: the last "auto" estimate).
    Pure: may run in another thread while removals go on. ``extractor_removed`` is 0 here; the
    model carries its own over when it installs the epoch. ``precond``: a Cholesky factor of a
    recent Hessian on (nearly) these rows (the current epoch's removal preconditioner), which
    makes the warm-started Newton iterations O(n d) (:func:`core.newton.newton_fit`).

    When enough rows are gone, the fit, its anchor, its shadow runs and the epoch's steps read
    a gathered copy of the rows of ``alive`` (:func:`core.rowview.row_view`), built here."""
    h = hyper
    view = row_view(problem, alive)
    p, alive_p = view_of(problem, view, alive)
    rng = generator(seed)
    B = draw_noise((p.X.shape[1], p.Y.shape[1]), h.sigma, rng, p.X.device)
    C = p.weights(alive_p)
    n_reg = float(alive_p.sum())
    fit = newton_fit(
        p.X,
        p.Y,
        C,
        p.lam,
        n_reg,
        B,
        tol=gradient_tolerance(p.lam, n_reg, budget_total),
        W0=W0,
        hess_dtype=p.hess_dtype,
        precond=precond,
        X32=p.X32,
    )
    acct = anchored(h.accounting, p, fit.W, alive_p, r0=fit.r0)
    max_removals, basis = resolve_max_removals(
        h.max_removals,
        int(alive.sum()),
        basis,
        lambda: estimate(p, h, budget_total, alive_p, fit.W, rng, binary, fit.factor),
        reestimate=reestimate,
    )
    return NoiseEpoch(
        version=version,
        W=fit.W,
        alive=alive,
        noise=B,
        acct=acct,
        certified=seed is None and h.sigma > 0,
        max_removals=max_removals,
        auto_basis=basis,
        solver=SolverCache.of(fit.factor, fit.cg_iterations),
        Z=fit.Z,
        view=view,
    )


def estimate(
    problem: Problem,
    hyper: Hyper,
    budget_total: float,
    alive: torch.Tensor,
    W: torch.Tensor,
    rng: np.random.Generator,
    binary: bool,
    factor: torch.Tensor | None = None,
    pause: Callable[[float], None] | None = None,
) -> int:
    """The shadow-run estimate of an ``"auto"`` ``max_removals`` (:mod:`core.trigger`;
    ``pause``: see :func:`core.trigger.auto_max_removals`)."""
    return auto_max_removals(
        problem,
        alive,
        W,
        sigma=hyper.sigma,
        budget=budget_total,
        rng=rng,
        binary=binary,
        accounting=hyper.accounting,
        factor=factor,
        pause=pause,
    )


@dataclass
class RetrainSnapshot:
    """The rows and weights a background retrain starts from (``Model.retrain_snapshot``)."""

    version: int
    alive: torch.Tensor
    W: torch.Tensor
    #: the removal preconditioner at the snapshot (a Cholesky factor of a recent Hessian, in
    #: memory only): it makes the warm-started fit O(n d) per Newton iteration
    factor: torch.Tensor | None = None
    #: the row view of the epoch at the snapshot (it holds every row of ``alive``): a shadow-run
    #: estimate on the snapshot reads it instead of gathering a copy of its own
    view: RowView | None = None


def warmed(
    problem: Problem, epoch: NoiseEpoch, budget_total: float, options: SolveOptions = DEFAULT_SOLVE
) -> NoiseEpoch:
    """``epoch`` after two removal steps computed and thrown away (weights, alive rows and
    accounting unchanged): a process pays the lazy set-up of its first steps here. An epoch
    without a solver factor (loaded from disk) keeps the steps' factor: a preconditioner, a
    function of the weights and the data only."""
    rows = torch.nonzero(epoch.alive).flatten()[:2].tolist()
    if int(epoch.alive.sum()) < 3 or len(rows) < 2:
        return epoch
    trial = epoch
    for row in rows:  # without a factor: direct, then iterative with the direct's factor
        _, stepped, _, _ = commit_prefix(problem, trial, [[row]], budget_total, options)
        trial = dataclasses.replace(trial, solver=stepped.solver)
    if epoch.solver is None and trial.solver is not None:
        return dataclasses.replace(epoch, solver=trial.solver)
    return epoch


@dataclass(frozen=True)
class FactorJob:
    """A fresh preconditioner for the removal steps of one epoch, factored away from them
    (:attr:`core.solvers.SolveOptions.defer_refactor`): :meth:`run` may go in another thread
    while the steps go on; it reads only what it holds (the weights, margins and alive rows of
    the step that asked, which later steps replace and never change in place). In memory only,
    like the epoch it belongs to."""

    problem: Problem
    alive: torch.Tensor
    W: torch.Tensor
    Z: torch.Tensor | None
    #: the epoch it is for: its anchor gradient (one tensor per fit, kept by every step), the
    #: removals it had made and the factor the new one replaces
    anchor: torch.Tensor
    removed: int
    replaces: torch.Tensor

    def run(self) -> torch.Tensor | None:
        """The Cholesky factors of the Hessian at the job's weights (None: not factorable)."""
        return fresh_factor(self.problem, self.alive, self.W, self.Z)


def refactor_job(
    problem: Problem, epoch: NoiseEpoch, options: SolveOptions = DEFAULT_SOLVE
) -> FactorJob | None:
    """The job that factors ``epoch``'s Hessian when its last step asked for a refactor that
    ``options`` defers (None otherwise)."""
    cache = epoch.solver
    if cache is None or not cache.refactor or cache.refactor_now(options):
        return None
    p, alive_p = view_of(problem, epoch.view, epoch.alive)
    return FactorJob(
        p,
        alive_p.clone(),
        epoch.W,
        epoch.Z,
        epoch.acct.anchor_grad,
        epoch.removed_in_epoch,
        cache.factor,
    )


def with_factor(
    epoch: NoiseEpoch, job: FactorJob, factor: torch.Tensor | None
) -> NoiseEpoch | None:
    """``epoch`` with ``factor`` (``job.run()``'s) as its steps' preconditioner, CG's counts
    starting over; None (keep ``epoch``) when there is no factor, when ``job`` was for another
    epoch, or when the factor it was to replace is no longer the epoch's or no longer asked to be
    replaced (a direct step factored meanwhile: its factor is the newer one).
    The factor may be a few steps old by then: a preconditioner, the certificate measures
    whatever residual CG leaves."""
    cache = epoch.solver
    if (
        factor is None
        or cache is None
        or not cache.refactor
        or cache.factor is not job.replaces
        or epoch.acct.anchor_grad is not job.anchor
        or epoch.removed_in_epoch < job.removed
        or factor.shape != cache.factor.shape
    ):
        return None
    return dataclasses.replace(epoch, solver=SolverCache.of(factor))


def commit_prefix(
    problem: Problem,
    epoch: NoiseEpoch,
    group_rows: list[list[int]],
    budget_total: float,
    options: SolveOptions = DEFAULT_SOLVE,
) -> tuple[int, NoiseEpoch, float, str | None]:
    """Serve the removal groups ``group_rows`` (arrival order) on ``epoch`` in one Newton step:
    the whole prefix, then halves (on request boundaries) while the step would take the budget
    used past ``budget_total`` (the safety net, at most ``ceil(log2 m)`` tries).

    Returns (groups committed, the epoch after them, the step's bound increment, the reason the
    rest was left: ``"budget"``, ``"numerical"`` or None). ``options``: how the step solves
    (:class:`core.removal.SolveOptions`; the epoch's cached factor preconditions the iterative
    solver)."""
    if not group_rows:
        return 0, epoch, 0.0, None
    m = sum(map(len, group_rows))
    tries = max(1, math.ceil(math.log2(m))) if m > 1 else 1
    count = len(group_rows)
    fired: str | None = None
    view = epoch.view
    p, alive_p = view_of(problem, view, epoch.alive)
    for _ in range(tries):
        rows = list(itertools.chain.from_iterable(group_rows[:count]))
        if not rows:
            return count, epoch, 0.0, fired if count < len(group_rows) else None
        rows_cpu = torch.as_tensor(rows, dtype=torch.long)
        rows_t = rows_cpu.to(epoch.W.device)
        step = newton_step(
            p,
            alive_p,
            epoch.W,
            rows_t if view is None else view.rows(rows_cpu).to(epoch.W.device),
            epoch.acct.anchor_grad,
            epoch.Z,
            cache=epoch.solver,
            options=options,
        )
        if step is None:
            return 0, epoch, 0.0, "numerical"
        if view is not None:  # the epoch's alive mask stays global
            alive_after = epoch.alive.clone()
            alive_after[rows_t] = False
            step = dataclasses.replace(step, alive=alive_after)
        if epoch.acct.fits(step, budget_total):
            inc = float(torch.linalg.vector_norm(step.increments))
            return (
                count,
                epoch.commit(step, len(rows)),
                inc,
                (fired if count < len(group_rows) else None),
            )
        fired = "budget"  # discarded try: no state, metric or log line changes
        if count == 1:
            break
        count //= 2
    return 0, epoch, 0.0, "budget"
