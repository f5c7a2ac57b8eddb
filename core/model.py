"""The removal-enabled model, a facade: :class:`Model` holds the fixed :class:`core.problem.Problem`
and options, the current :class:`core.epoch.NoiseEpoch` (weights, alive mask, noise, accounting,
trigger: one immutable value) and the counters that outlive epochs (version, safety retrains).
The maths is in core.epoch / core.accountant / core.trigger; the model as data and its save are
core.stored's, files core.persist's and core.loading's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import torch

from core.epoch import (
    FactorJob,
    NoiseEpoch,
    RetrainSnapshot,
    commit_prefix,
    estimate,
    fit_epoch,
    refactor_job,
    warmed,
    with_factor,
)
from core.errors import InvalidInputError
from core.guard import ONE_CLASS
from core.loading import read_state
from core.noise import generator
from core.removal import DEFAULT_SOLVE, SolveOptions
from core.requests import RemovalResult, alive_groups, removal_result, validate_rows
from core.rowview import row_view, view_of
from core.stored import StoredModel
from core.trigger import groups_within_limits, reestimate_due

__all__ = [
    "Model",
    "PreparedRetrain",
    "RemovalResult",
    "RetrainSnapshot",
    "load_model",
]

#: a prepared retrain is a fitted noise epoch not yet in use
PreparedRetrain = NoiseEpoch


class Model(StoredModel):
    """State of a certified-removal model. Build it with :func:`core.train` or
    :func:`core.load_model` (or :meth:`from_state`)."""

    #: how removal steps solve ``H' s = Delta`` (:class:`core.removal.SolveOptions`: direct or
    #: preconditioned CG, chosen per step by cost by default); in memory only, never persisted
    solve_options: SolveOptions = DEFAULT_SOLVE

    # ----------------------------------------------------------------- removal
    def remove(self, rows: Sequence[int], *, groups: Sequence[int] | None = None) -> RemovalResult:
        """Remove training rows with one batched Newton step (docs/theory.md "Removal").

        ``groups`` gives the request sizes (request boundaries, in arrival order); a batch is only
        ever split on them. Rows past the per-epoch ``max_removals`` (the b-independent trigger),
        or a batch whose step would take the budget used past the budget (the safety net, split in
        halves at most ``ceil(log2 m)`` times) are left pending for a retrain.

        Raises:
            InvalidInputError: out-of-range, non-integer or repeated rows, bad ``groups``, or a
                removal that would leave no rows (or a binary model with a single class). The
                model is unchanged.
        """
        group_rows, already = self._alive_groups(rows, groups)
        fit, reason = self._within_trigger(group_rows, self._epoch)
        committed, self._epoch, inc, step_reason = commit_prefix(
            self._problem, self._epoch, group_rows[:fit], self.budget_total, self.solve_options
        )
        if step_reason == "budget":
            self.safety_retrains += 1  # the safety net fired: an incident, counted in the state
        return removal_result(
            group_rows, committed, already, inc, step_reason or reason, self.budget_used
        )

    def _alive_groups(
        self, rows: Sequence[int], groups: Sequence[int] | None
    ) -> tuple[list[list[int]], list[int]]:
        """Validated rows split into request groups of alive rows, and the rows already removed;
        raises (model unchanged) when core.guard refuses removing them all."""
        group_rows, already = alive_groups(rows, groups, self._alive)
        self._check_not_emptied([r for g in group_rows for r in g])
        return group_rows, already

    def _check_not_emptied(self, rows: list[int]) -> None:
        """Refuse removing ``rows`` (alive, distinct) when core.guard says so."""
        reason = self.removal_guard().refuse(rows)
        if reason is not None:
            raise InvalidInputError(
                reason + (f" (classes {self._coding.classes})" if reason == ONE_CLASS else "")
            )

    def _within_trigger(
        self, group_rows: list[list[int]], epoch: NoiseEpoch
    ) -> tuple[int, str | None]:
        """Leading groups within the b-independent limits on ``epoch``: the rows the DP extractor
        still covers (first: a head retrain cannot lift it), then ``max_removals``."""
        limits = []
        left = self._extractor_left(epoch.extractor_removed)
        if left is not None:
            limits.append((left, "extractor"))
        if epoch.max_removals is not None:
            limits.append((epoch.max_removals - epoch.removed_in_epoch, "max_removals"))
        return groups_within_limits(group_rows, limits)

    def warm_up(self) -> None:
        """Compute removal steps on the current epoch and throw them away (the model and its
        accounting are unchanged; :func:`core.epoch.warmed`): a worker pays the lazy set-up of
        a process's first steps before it serves."""
        self._epoch = warmed(self._problem, self._epoch, self.budget_total, self.solve_options)

    def refactor_job(self) -> FactorJob | None:
        """When the last removal step asked for a fresh preconditioner and
        :attr:`solve_options` defers it (``defer_refactor``): the job that factors one
        (``job.run()``, in another thread if need be) for :meth:`install_factor`; else None."""
        return refactor_job(self._problem, self._epoch, self.solve_options)

    def install_factor(self, job: FactorJob, factor: torch.Tensor | None) -> bool:
        """Make ``factor`` (``job.run()``'s) the removal steps' preconditioner; False, nothing
        changed, when it no longer applies (another epoch, a direct step since, no factor).
        Neither the weights nor the accounting change."""
        epoch = with_factor(self._epoch, job, factor)
        if epoch is None:
            return False
        self._epoch = epoch
        return True

    # ----------------------------------------------------------------- retrain
    def retrain(self, exclude: Sequence[int] = (), *, seed: int | None = None) -> None:
        """Retrain from scratch on the remaining rows minus ``exclude``, with fresh noise.

        Warm start from the current weights (the minimiser is unique); the new ``r0`` starts the
        budget; version + 1; the per-epoch counter restarts and ``max_removals`` is re-resolved.

        Raises:
            InvalidInputError: bad rows, no rows left, or more newly excluded rows than the DP
                extractor still covers (that needs a full-pipeline retrain: extractor, features,
                head). The model is unchanged.
        """
        rows, _ = validate_rows(exclude, None, self.n_rows, allow_repeats=True)
        alive = self._alive.clone()
        if rows:
            alive[torch.as_tensor(rows, dtype=torch.long, device=self.device)] = False
        self._check_not_emptied(torch.nonzero(self._alive & ~alive).flatten().tolist())
        newly = int(self._alive.sum()) - int(alive.sum())
        left = self.extractor_removals_remaining
        if left is not None and newly > left:
            raise InvalidInputError(
                f"excluding {newly} more rows exceeds the {left} the DP feature extractor still "
                "covers: a full-pipeline retrain (extractor, features, head) is needed"
            )
        epoch = self._fit(alive, seed=seed, W0=self._W, precond=self._precond(self._epoch))
        self._epoch = self._carried(epoch, self.extractor_removed + newly)
        self.version += 1

    def _fit(
        self,
        alive: torch.Tensor,
        *,
        seed: int | None,
        W0: torch.Tensor | None,
        version: int | None = None,
        basis: tuple[int, int] | None = None,
        reestimate: bool = True,
        precond: torch.Tensor | None = None,
    ) -> NoiseEpoch:
        return fit_epoch(
            self._problem,
            self.hyper,
            self.budget_total,
            alive,
            binary=self._coding.binary,
            version=self.version if version is None else version,
            seed=seed,
            W0=W0,
            basis=basis or self._auto_basis,
            reestimate=reestimate,
            precond=precond,
        )

    @staticmethod
    def _precond(epoch: NoiseEpoch) -> torch.Tensor | None:
        """The removal solver's cached factor of ``epoch`` (None without one)."""
        return None if epoch.solver is None else epoch.solver.factor

    @staticmethod
    def _carried(epoch: NoiseEpoch, extractor_removed: int) -> NoiseEpoch:
        """A fitted epoch as the current one: the extractor's count carries over epochs. Its
        margins ``Z`` (the fit's at its weights) and the removals of a :meth:`catch_up` carry
        too (a fresh fit has none)."""
        return dataclasses.replace(epoch, extractor_removed=extractor_removed)

    # ----------------------------------------------------------------- retrain in the background
    def auto_reestimate_due(self, n_alive: int | None = None, *, margin: float = 1.0) -> bool:
        """True when a retrain on ``n_alive`` rows (default: now) estimates an ``"auto"``
        ``max_removals`` again by shadow runs, which costs several fits (a hint for schedulers);
        ``margin`` > 1 says so that much earlier (rows below ``margin`` times the threshold)."""
        n = self.n_alive if n_alive is None else n_alive
        return reestimate_due(self.hyper.max_removals, n, self._auto_basis, margin)

    def retrain_snapshot(self) -> RetrainSnapshot:
        """The current alive rows and weights, for :meth:`prepare_retrain` in another thread."""
        epoch = self._epoch  # one read: a consistent pair even while remove() goes on
        return RetrainSnapshot(
            version=self.version,
            alive=epoch.alive.clone(),
            W=epoch.W,
            factor=self._precond(epoch),
            view=epoch.view,
        )

    def prepare_retrain(
        self,
        snapshot: RetrainSnapshot | None = None,
        *,
        seed: int | None = None,
        auto_basis: tuple[int, int] | None = None,
        reestimate: bool = True,
    ) -> PreparedRetrain:
        """Fit the next noise epoch (fresh noise) on a snapshot's rows without changing the model.

        Thread-safe against :meth:`remove` on this model (it reads only the fixed data and the
        snapshot). Hand the result to :meth:`adopt_retrain`, which removes the rows removed since
        the snapshot from it before it is ever released. ``auto_basis`` is an
        :meth:`estimate_max_removals` result made ahead of time (an ``"auto"`` trigger is then
        scaled from it instead of estimated by shadow runs here); ``reestimate=False`` scales
        the last estimate even when the rows have halved since (no shadow runs in this fit).
        """
        snap = snapshot or self.retrain_snapshot()
        return self._fit(
            snap.alive,
            seed=seed,
            W0=snap.W,
            version=snap.version,
            basis=auto_basis,
            reestimate=reestimate,
            precond=snap.factor,
        )

    def catch_up(self, prepared: PreparedRetrain) -> PreparedRetrain | None:
        """``prepared`` with the rows removed since its snapshot removed by one Newton step,
        computed aside: thread-safe against :meth:`remove` like :meth:`prepare_retrain` (one
        read of the current epoch), so that :meth:`adopt_retrain` only removes the rows removed
        after this. The step is charged to the prepared epoch's accounting and counts against
        its ``max_removals``; its weights are still never released before the adoption.

        Returns ``prepared`` itself when no row was removed since, when it is not this model's
        next epoch, or when the step would pass its trigger or fails numerically (the adoption
        then does the whole catch-up, or refuses it). Returns None when the step would take the
        prepared epoch past its budget: the safety net fired on it (a b-dependent outcome), so
        it must not take over; the caller counts the firing (:meth:`count_safety_firing`, on
        the thread that removes) and retrains instead."""
        begun = self._catch_up_start(prepared, self._epoch)  # one read of the current epoch
        if begun is None or not begun[0]:
            return prepared
        caught, start = begun
        if self._within_trigger([caught], start)[0] == 0:
            return prepared
        committed, epoch, _, reason = commit_prefix(
            self._problem, start, [caught], self.budget_total, self.solve_options
        )
        if committed:
            return epoch
        return None if reason == "budget" else prepared

    def _catch_up_start(
        self, prepared: PreparedRetrain, current: NoiseEpoch
    ) -> tuple[list[int], NoiseEpoch] | None:
        """The rows removed from ``current`` since ``prepared``'s snapshot and the prepared
        epoch to remove them from, or None when it is not this model's next epoch (another
        version, or rows alive now that were not at the snapshot)."""
        if prepared.version != self.version or bool((current.alive & ~prepared.alive).any()):
            return None
        caught = torch.nonzero(prepared.alive & ~current.alive).flatten().tolist()
        # the caught rows were counted against the DP extractor when they were removed
        return caught, self._carried(prepared, current.extractor_removed - len(caught))

    def count_safety_firing(self) -> None:
        """Count a budget safety-net firing found off the removing thread (:meth:`catch_up`)."""
        self.safety_retrains += 1

    def estimate_max_removals(
        self,
        snapshot: RetrainSnapshot | None = None,
        *,
        seed: int | None = None,
        pause: Callable[[float], None] | None = None,
    ) -> tuple[int, int] | None:
        """The shadow-run estimate of an ``"auto"`` ``max_removals`` on a snapshot's rows, as
        ``(rows, value)`` for :meth:`prepare_retrain` (None unless ``"auto"``): the costly part
        of a retrain that re-estimates, run ahead of it. Independent of ``b`` (the shadow runs
        draw their own noise); thread-safe like :meth:`prepare_retrain`. ``pause(seconds)`` is
        called after each shadow step with its duration (a background caller may sleep there)."""
        if self.hyper.max_removals != "auto":
            return None
        snap = snapshot or self.retrain_snapshot()
        # the snapshot's epoch's rows (a superset of its alive rows, which weigh 0 outside it),
        # or, for an epoch without a view, a copy of the snapshot's rows
        view = snap.view if snap.view is not None else row_view(self._problem, snap.alive)
        problem, alive = view_of(self._problem, view, snap.alive)
        value = estimate(
            problem,
            self.hyper,
            self.budget_total,
            alive,
            snap.W,
            generator(seed),
            self._coding.binary,
            pause=pause,
        )
        return int(snap.alive.sum()), value

    def adopt_retrain(
        self,
        prepared: PreparedRetrain,
        rows: Sequence[int] = (),
        *,
        groups: Sequence[int] | None = None,
    ) -> RemovalResult | None:
        """Switch to a prepared epoch: one Newton step on it removes the rows removed since its
        snapshot, or since its :meth:`catch_up` (the catch-up) and, in the same step, ``rows``
        (requests in arrival order, ``groups`` their sizes, as in :meth:`remove`); then
        version + 1.

        Returns the :class:`RemovalResult` of ``rows`` on the new epoch (groups past its trigger
        or budget are ``pending``, as in :meth:`remove`), or None, with the model unchanged,
        when the prepared epoch cannot take over: it was prepared for another version, or the
        catch-up alone exceeds its ``max_removals`` or its budget (the budget check is a
        safety-net firing, counted in ``safety_retrains``); the caller then retrains instead.

        The catch-up set depends only on the removals served, never on the new noise; the
        prepared weights are never released before it (they still fit the removed rows). The
        new epoch is computed aside and installed in one assignment: an exception (e.g. out of
        memory in the step) leaves the model exactly as it was.

        Raises:
            InvalidInputError: bad ``rows``/``groups``, as :meth:`remove`. The model is unchanged.
        """
        begun = self._catch_up_start(prepared, self._epoch)
        if begun is None:
            return None
        group_rows, already = self._alive_groups(rows, groups)
        caught, start = begun
        groups_all = [caught, *group_rows]
        fit, reason = self._within_trigger(groups_all, start)
        committed, epoch, inc, step_reason = commit_prefix(
            self._problem, start, groups_all[:fit], self.budget_total, self.solve_options
        )
        if step_reason == "budget":
            self.safety_retrains += 1  # not an epoch field: kept when the old epoch stays
        if committed == 0:
            return None
        self._epoch = epoch
        self.version += 1
        # committed - 1: the groups of ``rows`` that rode in the step (group 0 is the catch-up)
        return removal_result(
            group_rows, committed - 1, already, inc, step_reason or reason, self.budget_used
        )


def load_model(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    snapshot: str | None = None,
) -> Model:
    """Load the current model of a state directory written by ``save``, ``certremove train`` or
    the worker (or the snapshot named ``snapshot``, e.g. ``"000000000012"``; see
    :func:`core.list_snapshots`). Every checksum is verified before anything is parsed, then the
    state's invariants. The loaded state is the new accounting anchor (``b`` is not on disk).

    Raises:
        StateNotFoundError: no model in the directory (a new directory).
        StateDamagedError: a missing, damaged or inconsistent file (the message names it).
        InvalidInputError: a malformed ``snapshot`` name.
    """
    loaded = read_state(directory, snapshot)
    model = Model.from_state(loaded.state, loaded.dataset, device)
    if not math.isfinite(model.budget_used):
        raise loaded.damaged("gives a non-finite budget used")
    return model
