"""The read side of a model (:class:`ModelView`): its data layout and every view of it that
changes nothing. The operations (remove, retrain, save, ...) are :class:`core.model.Model`'s (save
and the state conversion those of its base, :class:`core.stored.StoredModel`); each is one
assignment of a new :class:`core.epoch.NoiseEpoch` (or of a counter) on this layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Generic, TypeVar, overload

import numpy as np
import torch

from core.data import Dataset, dataset_differences, fingerprint_arrays, stored_ids
from core.epoch import NoiseEpoch
from core.group_privacy import combined_guarantee, extractor_removals_remaining
from core.guard import RemovalGuard
from core.ids import IdIndex
from core.labels import LabelCoding
from core.problem import Hyper, Problem

T = TypeVar("T")


class _EpochField(Generic[T]):
    """A public attribute stored in the current epoch: reading it reads the epoch; assigning it
    makes a new epoch value (the old one is never changed)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.__doc__ = name, doc

    @overload
    def __get__(self, obj: None, owner: type) -> _EpochField[T]: ...
    @overload
    def __get__(self, obj: ModelView, owner: type) -> T: ...
    def __get__(self, obj: ModelView | None, owner: type) -> T | _EpochField[T]:
        return self if obj is None else getattr(obj._epoch, self.name)

    def __set__(self, obj: ModelView, value: T) -> None:
        changes: dict[str, Any] = {self.name: value}
        obj._epoch = dataclasses.replace(obj._epoch, **changes)


class ModelView:
    """What can be read off a model without changing it: its data layout (the fixed problem,
    label coding, options and ids; the current noise epoch; the counters that outlive epochs),
    the budget, the training data and ids, the removal guard and predictions.
    :class:`core.model.Model` adds the operations."""

    certified = _EpochField[bool]("certified", "whether the noise certifies (no seed, sigma > 0)")
    removed_in_epoch = _EpochField[int]("removed_in_epoch", "rows removed in this noise epoch")
    max_removals = _EpochField[int | None]("max_removals", "the resolved per-epoch trigger")
    extractor_removed = _EpochField[int]("extractor_removed", "rows removed since the extractor")
    noise = _EpochField[torch.Tensor | None]("noise", "``b`` (in memory only; None after a load)")
    _auto_basis = _EpochField[tuple[int, int] | None]("auto_basis", "the last 'auto' estimate")

    def __init__(
        self,
        *,
        problem: Problem,
        coding: LabelCoding,
        hyper: Hyper,
        ids: np.ndarray,
        epoch: NoiseEpoch,
        budget_total: float,
        data_fingerprint: str | None = None,
    ) -> None:
        self._problem = problem
        self._coding = coding
        self.hyper = hyper
        self.ids = ids
        self._ids = IdIndex(ids)
        self._epoch = epoch
        self.budget_total = budget_total
        #: :meth:`core.data.Dataset.fingerprint` of the training rows, labels and ids, taken once
        #: (``data_fingerprint`` when the caller has it): a save compares it, never hashes again
        self._data_fingerprint = (
            data_fingerprint
            if data_fingerprint is not None
            else fingerprint_arrays(*self.training_data())
        )
        self.version = 1
        self.safety_retrains = 0
        self._dataset: Dataset | None = None
        self._excluded: frozenset[Any] | None = None
        self._class_codes: np.ndarray | None = None
        #: the number of the last snapshot this model saved or was loaded from
        self.save_seq = 0
        #: JSON-serialisable annotations persisted with the state (e.g. the worker's extractor use)
        self.extra: dict[str, Any] = {}

    # ----------------------------------------------------------------- read-only views
    @property
    def _W(self) -> torch.Tensor:
        return self._epoch.W

    @property
    def _alive(self) -> torch.Tensor:
        return self._epoch.alive

    @property
    def weights(self) -> torch.Tensor:
        """float64 (d,) for a binary model, (d, K) one-vs-rest."""
        return self._W[:, 0] if self._coding.binary else self._W

    @property
    def alive(self) -> torch.Tensor:
        return self._alive.clone()

    @property
    def n_alive(self) -> int:
        alive = self._alive
        if alive.device.type == "cpu":
            # numpy's count is single-threaded: torch's reduction wakes its thread pool, which
            # on a busy host costs milliseconds, and the worker reads this several times a batch
            return int(np.count_nonzero(alive.numpy()))
        return int(alive.sum())

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
        return self._epoch.acct.exact_used

    @property
    def bound_used(self) -> float:
        """``r0_a + sqrt(sum_k beta_k^2)``: the a-priori accounting."""
        return self._epoch.acct.bound_used

    @property
    def budget_used(self) -> float:
        return self.exact_used if self.hyper.accounting == "exact" else self.bound_used

    @property
    def budget_remaining(self) -> float:
        return max(0.0, self.budget_total - self.budget_used)

    @property
    def extractor_removals_remaining(self) -> int | None:
        """Rows the DP extractor's group privacy still covers (None without an extractor)."""
        return self._extractor_left(self.extractor_removed)

    def _extractor_left(self, removed: int) -> int | None:
        h = self.hyper
        if h.extractor_dp is None or h.extractor_limit is None:
            return None
        eps_max, delta_max = h.extractor_limit
        return extractor_removals_remaining(
            *h.extractor_dp, removed, eps_extra_max=eps_max, delta_extra_max=delta_max
        )

    def guarantee(self) -> tuple[float, float]:
        """The (epsilon, delta) of the released pipeline: the head's, plus the extractor's group
        privacy for the rows removed since it was trained (docs/theory.md, "The DP feature
        extractor")."""
        h = self.hyper
        if h.extractor_dp is None:
            return h.epsilon, h.delta
        return combined_guarantee(h.epsilon, h.delta, *h.extractor_dp, self.extractor_removed)

    # ----------------------------------------------------------------- training data and ids
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
        return dataset_differences(*self.training_data(), dataset)

    def rows_for_ids(self, sample_ids: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """Map sample ids to training rows. Returns (rows, unknown ids), both in input order."""
        return self._ids.rows_for_ids(sample_ids)

    def sample_id_key(self, value: Any) -> Any:
        """The normalised form of a sample id (int for integer ids, incl. digit strings of at
        most 18 ASCII digits; str otherwise), or None when it cannot name a row."""
        return self._ids.key(value)

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
            self._excluded = self._ids.keys(meta.get("excluded_ids") or [])
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
