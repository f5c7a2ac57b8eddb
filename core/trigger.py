"""The retrain trigger that does not depend on ``b`` (docs/theory.md "The retrain trigger").

A commit/retrain decision that depends on ``b`` selects which noise draws survive (up to about
``e^-eps/4`` in delta). The primary trigger is therefore a count of removed rows per noise epoch,
fixed at training time without looking at ``b``: an int, a fraction of the rows, or ``"auto"``,
estimated from shadow runs that draw their own independent noise and remove rows of the (public)
training data in a random order. This module owns the ``max_removals`` option: its parsing and
validation, its resolution per noise epoch (scale the last ``"auto"`` estimate, or estimate it
again), and the per-epoch limits a batch of removals is cut at.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import InvalidInputError
from core.guard import refusal
from core.loss import gradient
from core.newton import FitResult, gradient_tolerance, newton_fit, refit_with_factor
from core.noise import draw_noise
from core.problem import MaxRemovals, Problem
from core.removal import newton_step

__all__ = [
    "AUTO_REESTIMATE_BELOW",
    "AutoSettings",
    "MaxRemovals",
    "auto_max_removals",
    "groups_within_limits",
    "parse_max_removals",
    "reestimate_due",
    "resolve_max_removals",
    "validate_spec",
]

#: an "auto" max_removals is re-estimated by shadow runs at a retrain once the rows have fallen
#: below this fraction of those at the last estimate; until then it is scaled with the rows
AUTO_REESTIMATE_BELOW = 0.5


def parse_max_removals(text: str) -> MaxRemovals:
    """Parse a ``--max-removals`` text: ``auto``, ``none``, an integer count >= 1 or a fraction
    in (0, 1) (case and surrounding blanks ignored). Raises ``ValueError`` (an
    :class:`InvalidInputError`) on anything else, 0 and negative counts included."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    value: int | float
    try:
        value = int(low)
    except ValueError:
        try:
            value = float(low)
        except ValueError:
            raise InvalidInputError(
                f"max_removals: use auto, none, an integer >= 1 or a fraction in (0, 1), "
                f"got {text!r}"
            ) from None
    return validate_spec(value)


def validate_spec(spec: MaxRemovals) -> MaxRemovals:
    """Check a ``max_removals`` option: int >= 1, a fraction in (0, 1), ``"auto"`` or None (0
    would retrain before every removal: use None for no count trigger instead)."""
    if spec is None or spec == "auto":
        return spec
    if isinstance(spec, bool):
        raise InvalidInputError("max_removals must be an int, a fraction, 'auto' or None")
    if isinstance(spec, int):
        if spec < 1:
            raise InvalidInputError(
                f"max_removals must be a count >= 1 (or a fraction in (0, 1), auto, or none for "
                f"no count trigger), got {spec}"
            )
        return spec
    if isinstance(spec, float):
        if not 0 < spec < 1:
            raise InvalidInputError(f"a fractional max_removals must lie in (0, 1), got {spec}")
        return spec
    raise InvalidInputError(
        f"max_removals must be an int, a fraction, 'auto' or None, got {spec!r}"
    )


def reestimate_due(
    spec: MaxRemovals, n_alive: int, basis: tuple[int, int] | None, margin: float = 1.0
) -> bool:
    """True when an ``"auto"`` ``max_removals`` on ``n_alive`` rows is estimated again by shadow
    runs (no estimate yet, or the rows fell below ``AUTO_REESTIMATE_BELOW * margin`` of the
    estimate's)."""
    if spec != "auto":
        return False
    return basis is None or n_alive < AUTO_REESTIMATE_BELOW * margin * basis[0]


def resolve_max_removals(
    spec: MaxRemovals,
    n_alive: int,
    basis: tuple[int, int] | None,
    estimate: Callable[[], int],
    *,
    reestimate: bool = True,
) -> tuple[int | None, tuple[int, int] | None]:
    """``max_removals`` for a noise epoch on ``n_alive`` rows and the ``"auto"`` basis
    ``(rows, value)`` it leaves. An ``"auto"`` basis is scaled with the row count (it is
    b-independent: shadow runs with their own noise) until the rows have halved since it, then
    ``estimate()`` runs the shadow runs again (never when ``reestimate`` is False)."""
    if spec is None or isinstance(spec, int):
        return spec, basis
    if isinstance(spec, float):
        return int(spec * n_alive), basis
    if basis is not None and (not reestimate or not reestimate_due(spec, n_alive, basis)):
        return int(basis[1] * n_alive / basis[0]), basis
    value = estimate()
    return value, (n_alive, value)


def groups_within_limits(
    group_rows: list[list[int]], limits: list[tuple[int, str]]
) -> tuple[int, str | None]:
    """Leading groups whose running row count stays within every ``(allowed, name)`` limit
    (checked in order). Returns (count, the name of the limit that stopped it, or None)."""
    rows = sum(map(len, group_rows))
    if all(rows <= allowed for allowed, _ in limits):  # the common batch: every group fits
        return len(group_rows), None
    total = 0
    for i, g in enumerate(group_rows):
        total += len(g)
        for allowed, reason in limits:
            if g and total > allowed:
                return i, reason
    return len(group_rows), None


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
    pause: Callable[[float], None] | None = None,
) -> int:
    """Estimate ``max_removals`` from shadow runs with fresh, independent noise.

    ``pause(seconds)``, if given, is called after each shadow removal step with the seconds it
    took (a caller in a background thread may sleep there, to leave the memory bandwidth to the
    steps that serve requests). It cannot change the estimate.

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
                hess_dtype=problem.hess_dtype, X32=problem.X32,
            )  # fmt: skip
        anchor = gradient(problem.X, problem.Y, C, fit.W, problem.lam, n_reg)
        order = torch.from_numpy(rng.permutation(np.flatnonzero(alive.cpu().numpy())))
        crossing = min(
            crossing,
            _shadow_crossing(
                problem,
                alive,
                fit,
                anchor,
                order,
                search,
                budget,
                settings,
                binary,
                accounting,
                pause,
            ),
        )
        if crossing == 0:
            break
    return min(cap, int(settings.target_fraction * crossing))


def _shadow_crossing(  # type: ignore[no-untyped-def]
    problem, alive, fit, anchor, order, cap, limit, settings, binary, accounting="exact", pause=None
) -> int:
    """Rows removable (in this run's batches) while the budget used stays <= limit: the exact
    ``r0 + ||grad L_0 - g_a||`` (plus its margin), or under ``"bound"`` the model's a-priori
    ``r0 + ||beta||`` with ``beta`` the summed per-class increments (``core.accountant.Accountant.used_after``)."""
    chunk = cap  # first the whole cap in one batch: the largest residual of any split
    coarse = True
    while True:
        state, W, Z, done = alive.clone(), fit.W, None, 0
        beta = torch.zeros(fit.W.shape[1], dtype=torch.float64)  # CPU, like step.increments
        while done < cap:
            rows = order[done : min(cap, done + chunk)].to(problem.X.device)
            started = time.perf_counter()
            step = newton_step(problem, state, W, rows, anchor, Z)
            if pause is not None:
                pause(time.perf_counter() - started)
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
    """Whether core.guard's rule refuses a state with ``alive`` rows."""
    n = int(alive.sum())
    if not binary:
        return refusal(n, 1, binary) is not None
    y = problem.Y[alive, 0]
    return refusal(n, int(bool((y > 0).any())) + int(bool((y < 0).any())), binary) is not None
