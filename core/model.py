"""The removal-enabled model: weights, alive mask, budget state; train, remove, retrain.

Accounting (docs/theory.md "Accounting: exact and bound"): the budget used is an upper bound
on ``||U||_F``, where the current weights exactly minimise ``L_{b-U}`` on the remaining rows.
- ``"exact"`` (default): ``r0_a + ||grad L_0(W; D') - g_a||_F`` from an anchor ``a`` (the last
  training, or the state loaded at start-up); ``g_a`` is as secret as ``b`` and lives in memory.
- ``"bound"``: ``r0_a + sqrt(sum_k beta_k^2)``, ``beta_k`` the summed a-priori increments.
Both are tracked; ``accounting`` picks the one that decides and is reported.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.bounds import rounding_margin
from core.data import Dataset, fingerprint_arrays, stored_ids
from core.errors import InvalidInputError
from core.group_privacy import combined_guarantee, extractor_removals_remaining
from core.guard import ONE_CLASS, RemovalGuard
from core.labels import LabelCoding
from core.loss import gradient, margins
from core.newton import gradient_tolerance, newton_fit
from core.noise import draw_noise, generator
from core.removal import Problem, Step, newton_step
from core.trigger import MaxRemovals, auto_max_removals

ACCOUNTINGS = ("exact", "bound")
#: an "auto" max_removals is re-estimated by shadow runs at a retrain once the rows have fallen
#: below this fraction of those at the last estimate; until then it is scaled with the rows
AUTO_REESTIMATE_BELOW = 0.5
#: the state a noise epoch sets (restored when a prepared epoch cannot take over)
_EPOCH_FIELDS = (
    "_W", "_alive", "noise", "_Z", "_anchor_grad", "_r0_anchor", "_anchor_distance", "_margin",
    "_beta", "certified", "removed_in_epoch", "max_removals", "_auto_basis", "extractor_removed",
)  # fmt: skip
#: a string that names an integer sample id: ASCII digits, at most 18 of them (fits in int64)
_INT_ID = re.compile(r"-?[0-9]{1,18}")


@dataclass
class RemovalResult:
    """Outcome of :meth:`Model.remove` (a spent budget is an outcome, not an exception)."""

    applied: bool
    applied_groups: int
    removed: list[int] = field(default_factory=list)
    already_removed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    bound_increment: float = 0.0
    budget_used: float = 0.0
    needs_retrain: bool = False
    retrain_reason: str | None = None


@dataclass
class RetrainSnapshot:
    """The rows and weights a background retrain starts from (:meth:`Model.retrain_snapshot`)."""

    version: int
    alive: torch.Tensor
    W: torch.Tensor


@dataclass
class PreparedRetrain:
    """A fitted noise epoch not yet in use (:meth:`Model.prepare_retrain`). Holds the new noise
    ``b`` in memory only, like the model itself; never persisted or exported."""

    version: int
    alive: torch.Tensor
    W: torch.Tensor
    noise: torch.Tensor
    anchor_grad: torch.Tensor
    r0_anchor: float
    max_removals: int | None
    auto_basis: tuple[int, int] | None
    certified: bool


@dataclass
class Hyper:
    """Training options, persisted with the model."""

    lam: float
    sigma: float
    epsilon: float
    delta: float
    accounting: str
    calibration: str
    max_removals: MaxRemovals
    subsample_ratio: float | None
    #: (eps_dp, delta_dp) of a DP feature extractor the rows came from, or None
    extractor_dp: tuple[float, float] | None = None
    #: the extra (epsilon, delta) the operator accepts from the extractor's group privacy
    extractor_limit: tuple[float, float] | None = None


class Model:
    """State of a certified-removal model. Build it with :func:`train` or :func:`core.load_model`."""

    def __init__(
        self,
        *,
        problem: Problem,
        coding: LabelCoding,
        hyper: Hyper,
        ids: np.ndarray,
        alive: torch.Tensor,
        W: torch.Tensor,
        budget_total: float,
        certified: bool,
        data_fingerprint: str | None = None,
    ) -> None:
        self._problem = problem
        self._coding = coding
        self.hyper = hyper
        self.ids = ids
        #: :meth:`core.data.Dataset.fingerprint` of the training rows, labels and ids, taken once
        #: here (``data_fingerprint`` when the caller has it, e.g. a load): a save compares it,
        #: never hashes the model's data again
        self._data_fingerprint = (
            data_fingerprint
            if data_fingerprint is not None
            else fingerprint_arrays(*self.training_data())
        )
        self._alive = alive
        self._W = W
        self._Z: torch.Tensor | None = None  # margins at _W, cached between steps
        self.budget_total = budget_total
        self.certified = certified
        self.noise: torch.Tensor | None = None
        self.version = 1
        self.removed_in_epoch = 0
        self.safety_retrains = 0
        #: rows removed since the DP extractor was trained (head retrains do not reset it)
        self.extractor_removed = 0
        self.max_removals: int | None = None
        self._dataset: Dataset | None = None
        self._r0_anchor = 0.0
        self._anchor_grad = torch.zeros_like(W)
        self._anchor_distance = 0.0
        self._margin = 0.0
        self._beta = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
        self._id_index: dict[Any, int] | None = None
        self._excluded: frozenset[Any] | None = None
        self._class_codes: np.ndarray | None = None
        #: (rows, max_removals) of the last "auto" estimate, scaled at retrains (in memory only)
        self._auto_basis: tuple[int, int] | None = None
        self._save_seq = 0
        #: JSON-serialisable annotations persisted with the state (e.g. the worker's extractor use)
        self.extra: dict[str, Any] = {}

    # ----------------------------------------------------------------- read-only views
    @property
    def weights(self) -> torch.Tensor:
        """float64 (d,) for a binary model, (d, K) one-vs-rest."""
        return self._W[:, 0] if self._coding.binary else self._W

    @property
    def alive(self) -> torch.Tensor:
        return self._alive.clone()

    @property
    def n_alive(self) -> int:
        return int(self._alive.sum())

    @property
    def n_rows(self) -> int:
        return self._alive.numel()

    @property
    def classes(self) -> list[int]:
        return list(self._coding.classes)

    @property
    def device(self) -> torch.device:
        return self._W.device

    @property
    def exact_used(self) -> float:
        """``r0_a + ||grad L_0(W; D') - g_a||_F`` plus its rounding margin."""
        return self._r0_anchor + self._anchor_distance + self._margin

    @property
    def bound_used(self) -> float:
        """``r0_a + sqrt(sum_k beta_k^2)``: the a-priori accounting."""
        return self._r0_anchor + float(torch.linalg.vector_norm(self._beta))

    @property
    def budget_used(self) -> float:
        return self.exact_used if self.hyper.accounting == "exact" else self.bound_used

    @property
    def budget_remaining(self) -> float:
        return max(0.0, self.budget_total - self.budget_used)

    @property
    def extractor_removals_remaining(self) -> int | None:
        """Rows the DP extractor's group privacy still covers (None without an extractor)."""
        if self.hyper.extractor_dp is None or self.hyper.extractor_limit is None:
            return None
        eps_dp, delta_dp = self.hyper.extractor_dp
        eps_max, delta_max = self.hyper.extractor_limit
        return extractor_removals_remaining(
            eps_dp,
            delta_dp,
            self.extractor_removed,
            eps_extra_max=eps_max,
            delta_extra_max=delta_max,
        )

    def guarantee(self) -> tuple[float, float]:
        """The (epsilon, delta) of the released pipeline: the head's, plus the extractor's group
        privacy for the rows removed since it was trained (docs/theory.md, "The DP feature
        extractor")."""
        h = self.hyper
        if h.extractor_dp is None:
            return h.epsilon, h.delta
        return combined_guarantee(h.epsilon, h.delta, *h.extractor_dp, self.extractor_removed)

    # ----------------------------------------------------------------- training data
    @property
    def data_fingerprint(self) -> str:
        """The :meth:`core.data.Dataset.fingerprint` of a dataset holding this model's training
        rows (float32), labels (int64) and ids, in the model's row order."""
        return self._data_fingerprint

    def training_data(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The rows (float32, exactly as trained on), labels and ids the model was trained on, as a
        dataset file stores them: (n, d) float32 and (n,) int64 CPU tensors, and the ids."""
        p = self._problem
        X = p.X.to(torch.float32).cpu()  # exact: the rows were float32 before the float64 copy
        y = self._coding.decode(p.Y).cpu()  # the +-1 columns map back to the training labels
        return X, y, stored_ids(self.ids)

    def dataset_differences(self, dataset: Dataset) -> list[str]:
        """What of ``dataset``'s training part is not this model's training data, in the model's
        row order: a sublist of ``["rows", "labels", "ids"]``, empty when it is the same data
        (in whatever dtypes). Compares the arrays (O(nd)); :meth:`data_fingerprint` is the
        cheap test."""
        X, y, ids = self.training_data()
        out = []
        dX = dataset.X_train.detach().cpu()
        if tuple(dX.shape) != tuple(X.shape) or not torch.equal(dX.to(torch.float32), X):
            out.append("rows")
        dy = dataset.y_train.detach().cpu()
        same = tuple(dy.shape) == tuple(y.shape) and (
            torch.equal(dy.double(), y.double())
            if dy.is_floating_point()
            else torch.equal(dy.long(), y)
        )
        if not same:
            out.append("labels")
        other = stored_ids(dataset.ids_train)
        if not (
            other.shape == ids.shape
            and (other.dtype.kind in "iu") == (ids.dtype.kind in "iu")
            and bool(np.array_equal(other, ids))
        ):
            out.append("ids")
        return out

    # ----------------------------------------------------------------- ids
    def rows_for_ids(self, sample_ids: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """Map sample ids to training rows. Returns (rows, unknown ids), both in input order."""
        if self._id_index is None:
            self._id_index = {self.sample_id_key(v): i for i, v in enumerate(self.ids.tolist())}
        rows: list[int] = []
        unknown: list[Any] = []
        for raw in sample_ids:
            row = self._id_index.get(self.sample_id_key(raw))
            (unknown if row is None else rows).append(raw if row is None else row)
        return rows, unknown

    @property
    def dataset(self) -> Dataset | None:
        """The training and test data with their meta (set by save/load and the pipeline)."""
        return self._dataset

    @dataset.setter
    def dataset(self, value: Dataset | None) -> None:
        self._dataset, self._excluded = value, None

    @property
    def excluded_ids(self) -> frozenset[Any]:
        """Keys (:meth:`sample_id_key`) of sample ids earlier full-pipeline retrains dropped from
        the data (``dataset.meta["excluded_ids"]``): removed already, though no longer rows."""
        if self._excluded is None:
            meta = self.dataset.meta if self.dataset is not None else {}
            keys = (self.sample_id_key(v) for v in meta.get("excluded_ids") or [])
            self._excluded = frozenset(k for k in keys if k is not None)
        return self._excluded

    def removal_guard(self, at_most: int | None = None) -> RemovalGuard:
        """A :class:`core.guard.RemovalGuard` over the current alive rows: asks, removal after
        removal, whether :meth:`remove` would refuse it."""
        if self._class_codes is None:
            Y = self._problem.Y
            codes = (Y[:, 0] > 0) if self._coding.binary else Y.argmax(dim=1)
            self._class_codes = codes.long().cpu().numpy()
        return RemovalGuard(
            self._class_codes, self._alive.cpu().numpy(), self._coding.binary, at_most
        )

    def sample_id_key(self, value: Any) -> Any:
        """The normalised form of a sample id (int for integer ids, incl. digit strings of at
        most 18 ASCII digits; str otherwise), or None when it cannot name a row."""
        if self.ids.dtype.kind in "iu":
            if isinstance(value, bool):
                return None
            if isinstance(value, (int, np.integer)):
                return int(value)
            if isinstance(value, str) and _INT_ID.fullmatch(value.strip()):
                return int(value)
            return None
        return str(value)

    # ----------------------------------------------------------------- prediction
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Predicted labels (in the training label space) for rows X (m, d)."""
        scores = X.to(self._W.device, torch.float64) @ self._W
        return self._coding.decode(scores).cpu()

    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of rows of X whose predicted label equals y."""
        if len(y) == 0:
            return float("nan")
        return float((self.predict(X) == y.cpu().long()).double().mean())

    # ----------------------------------------------------------------- persistence
    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        dataset: Dataset | None = None,
        replace_dataset: bool = False,
        journal: dict[str, Any] | None = None,
        keep: int = 3,
    ) -> None:
        """Persist into a state directory atomically as a new checksummed snapshot (``b`` and
        ``g_a`` are never written); see :func:`core.persist.save_model`.

        ``dataset`` (default: :attr:`dataset`, else one built from the model's rows) must hold the
        model's own training rows, labels and ids in its row order; anything else is refused
        with ``InvalidInputError`` (the persisted budget is anchored on it at the next load).
        ``replace_dataset=True`` lets a model on new data (a full-pipeline retrain) take over a
        state directory; otherwise a different dataset is refused with ``StateError``.
        ``journal``: a JSON-serialisable dict stored with the snapshot
        (:func:`core.persist.read_journal`). ``keep``: the newest snapshots kept (>= 1).
        """
        from core.persist import save_model

        save_model(
            self,
            directory,
            dataset=dataset,
            replace_dataset=replace_dataset,
            journal=journal,
            keep=keep,
        )

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
        fit, reason = self._groups_within_trigger(group_rows)
        committed, bound_inc, step_reason = self._commit_prefix(group_rows[:fit])
        if step_reason == "budget":
            self.safety_retrains += 1  # the safety net fired: an incident, counted in the state
        return self._result(group_rows, committed, already, bound_inc, step_reason or reason)

    def _alive_groups(
        self, rows: Sequence[int], groups: Sequence[int] | None
    ) -> tuple[list[list[int]], list[int]]:
        """Validated rows split into request groups of alive rows, and the rows already removed;
        raises (model unchanged) when core.guard refuses removing them all."""
        row_list, sizes = self._validate_rows(rows, groups)
        flags = (
            self._alive[torch.as_tensor(row_list, dtype=torch.long, device=self.device)].tolist()
            if row_list
            else []
        )
        group_rows: list[list[int]] = []
        already: list[int] = []
        start = 0
        for size in sizes:
            pairs = list(
                zip(row_list[start : start + size], flags[start : start + size], strict=True)
            )
            group_rows.append([r for r, a in pairs if a])
            already.extend(r for r, a in pairs if not a)
            start += size
        self._check_not_emptied([r for g in group_rows for r in g])
        return group_rows, already

    def _result(
        self,
        group_rows: list[list[int]],
        committed: int,
        already: list[int],
        bound_inc: float,
        reason: str | None,
    ) -> RemovalResult:
        """The :class:`RemovalResult` of ``group_rows`` when the first ``committed`` went in."""
        left = committed < len(group_rows)
        return RemovalResult(
            applied=not left,
            applied_groups=committed,
            removed=[r for g in group_rows[:committed] for r in g],
            already_removed=already,
            pending=[r for g in group_rows[committed:] for r in g],
            bound_increment=bound_inc,
            budget_used=self.budget_used,
            needs_retrain=left,
            retrain_reason=reason if left else None,
        )

    def _groups_within_trigger(self, group_rows: list[list[int]]) -> tuple[int, str | None]:
        """Leading groups within the b-independent limits: ``max_removals`` per noise epoch and
        the rows the DP extractor still covers. Returns (count, the limit that stopped it)."""
        limits = []
        extractor_left = self.extractor_removals_remaining
        if extractor_left is not None:  # first: a head retrain cannot lift this one
            limits.append((extractor_left, "extractor"))
        if self.max_removals is not None:
            limits.append((self.max_removals - self.removed_in_epoch, "max_removals"))
        total = 0
        for i, g in enumerate(group_rows):
            total += len(g)
            for allowed, reason in limits:
                if g and total > allowed:
                    return i, reason
        return len(group_rows), None

    def _commit_prefix(self, group_rows: list[list[int]]) -> tuple[int, float, str | None]:
        """Try the whole prefix, then halves (in arrival order, on request boundaries)."""
        if not group_rows:
            return 0, 0.0, None
        m = sum(len(g) for g in group_rows)
        tries = max(1, math.ceil(math.log2(m))) if m > 1 else 1
        count = len(group_rows)
        fired: str | None = None
        for _ in range(tries):
            rows = [r for g in group_rows[:count] for r in g]
            if not rows:
                return count, 0.0, fired if count < len(group_rows) else None
            step = newton_step(
                self._problem,
                self._alive,
                self._W,
                torch.as_tensor(rows, dtype=torch.long, device=self.device),
                self._anchor_grad,
                self._Z,
            )
            if step is None:
                return 0, 0.0, "numerical"
            if self._used_after(step) <= self.budget_total:
                inc = self._commit(step, len(rows))
                return count, inc, fired if count < len(group_rows) else None
            fired = "budget"  # discarded try: no state, metric or log line changes
            if count == 1:
                break
            count //= 2
        return 0, 0.0, "budget"

    def _used_after(self, step: Step) -> float:
        if self.hyper.accounting == "exact":
            return self._r0_anchor + step.anchor_distance + step.margin
        return self._r0_anchor + float(torch.linalg.vector_norm(self._beta + step.increments))

    def _commit(self, step: Step, m: int) -> float:
        self._W, self._alive, self._Z = step.W, step.alive, step.Z
        self._anchor_distance, self._margin = step.anchor_distance, step.margin
        self._beta = self._beta + step.increments
        self.removed_in_epoch += m
        self.extractor_removed += m
        return float(torch.linalg.vector_norm(step.increments))

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
        rows, _ = self._validate_rows(exclude, None, allow_repeats=True)
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
        self._fit(alive, seed=seed, W0=self._W)
        self.extractor_removed += newly
        self.version += 1

    def _fit(self, alive: torch.Tensor, *, seed: int | None, W0: torch.Tensor | None) -> None:
        self._install(self._fit_epoch(alive, seed=seed, W0=W0))

    def _fit_epoch(
        self,
        alive: torch.Tensor,
        *,
        seed: int | None,
        W0: torch.Tensor | None,
        basis: tuple[int, int] | None = None,
        reestimate: bool = True,
    ) -> PreparedRetrain:
        """Fit a noise epoch on ``alive`` with fresh noise. Pure: reads only the fixed problem,
        hyper-parameters and budget, so it may run in another thread while :meth:`remove` goes on."""
        p, h = self._problem, self.hyper
        rng = generator(seed)
        B = draw_noise(tuple(self._W.shape), h.sigma, rng, self.device)
        C = p.weights(alive)
        n_reg = float(alive.sum())
        fit = newton_fit(
            p.X,
            p.Y,
            C,
            p.lam,
            n_reg,
            B,
            tol=gradient_tolerance(p.lam, n_reg, self.budget_total),
            W0=W0,
            hess_dtype=p.hess_dtype,
        )
        anchor_grad, r0_anchor = self._anchor_at(fit.W, alive, r0=fit.r0)
        max_removals, basis = self._resolve_trigger(
            alive, fit.W, rng, fit.factor, basis, reestimate
        )
        return PreparedRetrain(
            version=self.version,
            alive=alive,
            W=fit.W,
            noise=B,
            anchor_grad=anchor_grad,
            r0_anchor=r0_anchor,
            max_removals=max_removals,
            auto_basis=basis,
            certified=seed is None and h.sigma > 0,
        )

    def _install(self, epoch: PreparedRetrain) -> None:
        """Make a fitted epoch the current state (the accounting anchor; counter restarts)."""
        self._W, self._alive, self.noise, self._Z = epoch.W, epoch.alive, epoch.noise, None
        self._restart_accounting(epoch.anchor_grad, epoch.r0_anchor)
        self.certified = epoch.certified
        self.removed_in_epoch = 0
        self.max_removals = epoch.max_removals
        self._auto_basis = epoch.auto_basis

    # ----------------------------------------------------------------- retrain in the background
    def auto_reestimate_due(self, n_alive: int | None = None, *, margin: float = 1.0) -> bool:
        """True when a retrain on ``n_alive`` rows (default: now) estimates an ``"auto"``
        ``max_removals`` again by shadow runs, which costs several fits (a hint for schedulers);
        ``margin`` > 1 says so that much earlier (rows below ``margin`` times the threshold)."""
        if self.hyper.max_removals != "auto":
            return False
        n = self.n_alive if n_alive is None else n_alive
        basis = self._auto_basis
        return basis is None or n < AUTO_REESTIMATE_BELOW * margin * basis[0]

    def retrain_snapshot(self) -> RetrainSnapshot:
        """The current alive rows and weights, for :meth:`prepare_retrain` in another thread."""
        return RetrainSnapshot(version=self.version, alive=self._alive.clone(), W=self._W)

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
        epoch = self._fit_epoch(
            snap.alive, seed=seed, W0=snap.W, basis=auto_basis, reestimate=reestimate
        )
        epoch.version = snap.version
        return epoch

    def estimate_max_removals(
        self, snapshot: RetrainSnapshot | None = None, *, seed: int | None = None
    ) -> tuple[int, int] | None:
        """The shadow-run estimate of an ``"auto"`` ``max_removals`` on a snapshot's rows, as
        ``(rows, value)`` for :meth:`prepare_retrain` (None unless ``"auto"``): the costly part
        of a retrain that re-estimates, run ahead of it. Independent of ``b`` (the shadow runs
        draw their own noise); thread-safe like :meth:`prepare_retrain`."""
        if self.hyper.max_removals != "auto":
            return None
        snap = snapshot or self.retrain_snapshot()
        value = auto_max_removals(
            self._problem,
            snap.alive,
            snap.W,
            sigma=self.hyper.sigma,
            budget=self.budget_total,
            rng=generator(seed),
            binary=self._coding.binary,
            accounting=self.hyper.accounting,
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
        snapshot (the catch-up) and, in the same step, ``rows`` (requests in arrival order,
        ``groups`` their sizes, as in :meth:`remove`); then version + 1.

        Returns the :class:`RemovalResult` of ``rows`` on the new epoch (groups past its trigger
        or budget are ``pending``, as in :meth:`remove`), or None, with the model unchanged,
        when the prepared epoch cannot take over: it was prepared for another version, or the
        catch-up alone exceeds its ``max_removals`` or its budget (the budget check is a
        safety-net firing, counted in ``safety_retrains``); the caller then retrains instead.

        The catch-up set depends only on the removals served, never on the new noise; the
        prepared weights are never released before it (they still fit the removed rows).

        Raises:
            InvalidInputError: bad ``rows``/``groups``, as :meth:`remove`. The model is unchanged.
        """
        if prepared.version != self.version:
            return None
        if bool((self._alive & ~prepared.alive).any()):
            return None  # rows alive now but not at the snapshot: not this model's lineage
        group_rows, already = self._alive_groups(rows, groups)
        caught = torch.nonzero(prepared.alive & ~self._alive).flatten().tolist()

        saved = {name: getattr(self, name) for name in _EPOCH_FIELDS}
        try:
            self._install(prepared)
            # the caught-up rows were counted against the DP extractor when they were removed
            self.extractor_removed -= len(caught)
            groups_all = [caught, *group_rows]
            fit, reason = self._groups_within_trigger(groups_all)
            committed, bound_inc, step_reason = self._commit_prefix(groups_all[:fit])
        except BaseException:  # e.g. out of memory in the step: the model must stay as it was
            committed = 0
            raise
        finally:
            if committed == 0:
                for name, value in saved.items():
                    setattr(self, name, value)
        if step_reason == "budget":
            self.safety_retrains += 1  # not an epoch field: kept when the old epoch comes back
        if committed == 0:
            return None
        self.version += 1
        # committed - 1: the groups of ``rows`` that rode in the step (group 0 is the catch-up)
        return self._result(group_rows, committed - 1, already, bound_inc, step_reason or reason)

    def _anchor_at(
        self, W: torch.Tensor, alive: torch.Tensor, *, r0: float
    ) -> tuple[torch.Tensor, float]:
        """The anchor gradient ``g_a`` at ``W`` on ``alive`` and ``r0`` plus the rounding margin
        of the float64 ``g_a``."""
        p = self._problem
        n_reg = float(alive.sum())
        C = p.weights(alive)
        Z = margins(p.X, p.Y, W)
        anchor_grad = gradient(p.X, p.Y, C, W, p.lam, n_reg, Z=Z)
        abs_terms = float((C * torch.sigmoid(-Z) * p.row_norms[:, None]).sum())
        r0_anchor = r0 + rounding_margin(
            p.X.shape[0], p.X.shape[1], abs_terms, p.lam, n_reg,
            float(torch.linalg.vector_norm(W)), float(torch.linalg.vector_norm(anchor_grad)),
        )  # fmt: skip
        return anchor_grad, r0_anchor

    def _set_anchor(self, *, r0: float) -> None:
        """Make the current state the accounting anchor, ``r0`` its residual bound; the rounding
        margin of the float64 anchor gradient ``g_a`` is added to it."""
        self._restart_accounting(*self._anchor_at(self._W, self._alive, r0=r0))

    def _restart_accounting(self, anchor_grad: torch.Tensor, r0_anchor: float) -> None:
        """A new anchor ``(g_a, r0_a)``: nothing used beyond it yet."""
        self._anchor_grad, self._r0_anchor = anchor_grad, r0_anchor
        self._anchor_distance, self._margin = 0.0, 0.0
        self._beta = torch.zeros_like(self._beta)

    def _resolve_trigger(
        self,
        alive: torch.Tensor,
        W: torch.Tensor,
        rng: np.random.Generator,
        factor: torch.Tensor | None,
        basis: tuple[int, int] | None = None,
        reestimate: bool = True,
    ) -> tuple[int | None, tuple[int, int] | None]:
        """``max_removals`` for an epoch on ``alive`` and the "auto" basis it leaves (from
        ``basis`` when given, else the model's last one)."""
        spec = self.hyper.max_removals
        n = int(alive.sum())
        basis = basis or self._auto_basis
        if spec is None or isinstance(spec, int):
            return spec, basis
        if isinstance(spec, float):
            return int(spec * n), basis
        if basis is not None and (n >= AUTO_REESTIMATE_BELOW * basis[0] or not reestimate):
            # Scale the last estimate with the row count (b-independent: it came from shadow runs
            # with their own noise); re-estimate once the data has shrunk by half since then.
            return int(basis[1] * n / basis[0]), basis
        value = auto_max_removals(
            self._problem,
            alive,
            W,
            sigma=self.hyper.sigma,
            budget=self.budget_total,
            rng=rng,
            binary=self._coding.binary,
            accounting=self.hyper.accounting,
            factor=factor,
        )
        return value, (n, value)

    # ----------------------------------------------------------------- validation
    def _validate_rows(
        self, rows: Sequence[int], groups: Sequence[int] | None, *, allow_repeats: bool = False
    ) -> tuple[list[int], list[int]]:
        arr = np.asarray(list(rows) if not isinstance(rows, torch.Tensor) else rows.cpu().numpy())
        if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
            raise InvalidInputError(
                f"rows must be a flat sequence of integers, got dtype {arr.dtype}"
            )
        row_list = [int(r) for r in arr.tolist()]
        n_rows = self.n_rows
        bad = [r for r in row_list if not 0 <= r < n_rows]
        if bad:
            raise InvalidInputError(f"rows out of range [0, {self.n_rows}): {bad[:10]}")
        if not allow_repeats and len(set(row_list)) != len(row_list):
            seen: set[int] = set()
            dup = sorted({r for r in row_list if r in seen or seen.add(r)})  # type: ignore[func-returns-value]
            raise InvalidInputError(f"rows repeated within one call: {dup[:10]}")
        if groups is None:
            sizes = [len(row_list)] if row_list else []
        else:
            sizes = [int(g) for g in groups]
            if any(g < 0 for g in sizes) or sum(sizes) != len(row_list):
                raise InvalidInputError(
                    f"groups must be non-negative sizes summing to len(rows)={len(row_list)}, got {sizes[:10]}"
                )
        return row_list, sizes

    def _check_not_emptied(self, rows: list[int]) -> None:
        """Refuse removing ``rows`` (alive, distinct) when core.guard says so."""
        reason = self.removal_guard().refuse(rows)
        if reason is not None:
            raise InvalidInputError(
                reason + (f" (classes {self._coding.classes})" if reason == ONE_CLASS else "")
            )
