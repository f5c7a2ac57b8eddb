"""The retrain trigger that does not depend on ``b`` (docs/theory.md "The retrain trigger").

A commit/retrain decision that depends on ``b`` selects which noise draws survive (up to about
``e^-eps/4`` in delta). The primary trigger is therefore a count of removed rows per noise epoch,
fixed at training time without looking at ``b``: an int, a fraction of the rows, or ``"auto"``,
estimated from shadow runs that draw their own independent noise and remove rows of the (public)
training data in a random order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import InvalidInputError
from core.loss import gradient
from core.newton import FitResult, gradient_tolerance, newton_fit, refit_with_factor
from core.noise import draw_noise
from core.removal import Problem, newton_step

MaxRemovals = int | float | str | None


def validate_spec(spec: MaxRemovals) -> MaxRemovals:
    """Check a ``max_removals`` option: int >= 0, a fraction in (0, 1), ``"auto"`` or None."""
    if spec is None or spec == "auto":
        return spec
    if isinstance(spec, bool):
        raise InvalidInputError("max_removals must be an int, a fraction, 'auto' or None")
    if isinstance(spec, int):
        if spec < 0:
            raise InvalidInputError(f"max_removals must be >= 0, got {spec}")
        return spec
    if isinstance(spec, float):
        if not 0 < spec < 1:
            raise InvalidInputError(f"a fractional max_removals must lie in (0, 1), got {spec}")
        return spec
    raise InvalidInputError(
        f"max_removals must be an int, a fraction, 'auto' or None, got {spec!r}"
    )


@dataclass(frozen=True)
class AutoSettings:
    """Shadow-run settings: ``shadow_runs`` noise draws, each removing up to ``search_fraction``
    of the rows in ``chunks`` batched steps until the budget used (in the model's accounting)
    crosses the budget; the trigger is ``target_fraction`` of the smallest crossing point, at
    most ``cap_fraction`` of the rows (beyond that the residual's dependence on ``b`` grows,
    docs/theory.md "What is certified")."""

    shadow_runs: int = 2
    chunks: int = 16
    search_fraction: float = 0.5
    cap_fraction: float = 0.25
    target_fraction: float = 0.5


def auto_max_removals(
    problem: Problem,
    alive: torch.Tensor,
    W: torch.Tensor,
    *,
    sigma: float,
    budget: float,
    rng: np.random.Generator,
    binary: bool,
    accounting: str = "exact",
    factor: torch.Tensor | None = None,
    settings: AutoSettings = AutoSettings(),
) -> int:
    """Estimate ``max_removals`` from shadow runs with fresh, independent noise.

    Each run refits with its own noise (from ``W`` with the training's Hessian ``factor``, a chord
    iteration of O(nd) per step, or Newton if that does not converge), then removes a random order
    of rows with the real Newton step, charged as the model charges it (``accounting``: the exact
    anchored residual, or the a-priori bound ``r0 + ||sum of increments||``, which grows much
    faster): first the whole cap in one batch (if that stays below the limit, the cap is the
    answer), else in batches of ``ceil(cap/chunks)`` rows. Batched steps leave a larger residual
    and a larger bound than smaller ones, so the estimate errs early.
    """
    if accounting not in ("exact", "bound"):
        raise InvalidInputError(f"accounting must be 'exact' or 'bound', got {accounting!r}")
    n_alive = int(alive.sum())
    cap = int(settings.cap_fraction * n_alive)
    search = int(settings.search_fraction * n_alive)
    if cap < 1 or budget <= 0:
        return 0
    crossing = search
    n_reg = float(n_alive)
    for _ in range(settings.shadow_runs):
        B = draw_noise(tuple(W.shape), sigma, rng, W.device)
        C = problem.weights(alive)
        tol = gradient_tolerance(problem.lam, n_reg, budget)
        fit: FitResult | None = None
        if factor is not None:
            fit = refit_with_factor(
                problem.X, problem.Y, C, problem.lam, n_reg, B, tol=tol, W0=W, factor=factor
            )
        if fit is None:
            fit = newton_fit(
                problem.X, problem.Y, C, problem.lam, n_reg, B, tol=tol, W0=W,
                hess_dtype=problem.hess_dtype,
            )  # fmt: skip
        anchor = gradient(problem.X, problem.Y, C, fit.W, problem.lam, n_reg)
        order = torch.from_numpy(rng.permutation(np.flatnonzero(alive.cpu().numpy())))
        crossing = min(
            crossing,
            _shadow_crossing(
                problem, alive, fit, anchor, order, search, budget, settings, binary, accounting
            ),
        )
        if crossing == 0:
            break
    return min(cap, int(settings.target_fraction * crossing))


def _shadow_crossing(  # type: ignore[no-untyped-def]
    problem, alive, fit, anchor, order, cap, limit, settings, binary, accounting="exact"
) -> int:
    """Rows removable (in this run's batches) while the budget used stays <= limit: the exact
    ``r0 + ||grad L_0 - g_a||`` (plus its margin), or under ``"bound"`` the model's a-priori
    ``r0 + ||beta||`` with ``beta`` the summed per-class increments (``Model._used_after``)."""
    chunk = cap  # first the whole cap in one batch: the largest residual of any split
    coarse = True
    while True:
        state, W, Z, done = alive.clone(), fit.W, None, 0
        beta = torch.zeros(fit.W.shape[1], dtype=torch.float64, device=fit.W.device)
        while done < cap:
            rows = order[done : min(cap, done + chunk)].to(problem.X.device)
            step = newton_step(problem, state, W, rows, anchor, Z)
            if step is None or _class_emptied(problem, step.alive, binary):
                return done
            if accounting == "bound":
                used = fit.r0 + float(torch.linalg.vector_norm(beta + step.increments))
            else:
                used = fit.r0 + step.anchor_distance + step.margin
            if used > limit:
                break
            state, W, Z, done = step.alive, step.W, step.Z, done + rows.numel()
            beta = beta + step.increments
        else:
            return done
        if coarse:  # the cap in one batch crossed: measure in finer batches
            coarse, chunk = False, max(1, math.ceil(cap / settings.chunks))
            continue
        if done > 0 or chunk == 1:
            return done
        chunk = max(1, chunk // 8)  # the first batch already crossed: retry with smaller steps


def _class_emptied(problem: Problem, alive: torch.Tensor, binary: bool) -> bool:
    if not binary:
        return not bool(alive.any())
    y = problem.Y[alive, 0]
    return not (bool((y > 0).any()) and bool((y < 0).any()))
