"""A model's persistence (:class:`StoredModel`, the base of :class:`core.model.Model`): the model
as data both ways (:meth:`~StoredModel.to_state`, :meth:`~StoredModel.from_state`, on
:mod:`core.state`) and :meth:`~StoredModel.save` into a state directory (the files are
:mod:`core.persist`'s). ``core.model.load_model`` reads one back."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Self

import torch

from core import persist, steplog
from core.data import Dataset, check_training_data
from core.errors import InvalidInputError, StateError
from core.state import ModelParts, ModelState, decode, encode
from core.view import ModelView


@dataclasses.dataclass(frozen=True)
class _LogBase:
    """The snapshot this model last saved (its step log's base): the directory, its name, the
    model's version then, the alive rows as last persisted, and the records logged since."""

    root: Path
    name: str
    version: int
    alive: torch.Tensor
    records: int = 0


class StoredModel(ModelView):
    """A :class:`core.view.ModelView` that converts to and from a :class:`core.state.ModelState`
    and saves itself; :class:`core.model.Model` adds the operations."""

    #: the snapshot this model last saved, which :meth:`log_step` appends to (None: none)
    _log_base: _LogBase | None = None

    # ----------------------------------------------------------------- state and persistence
    def to_state(self) -> ModelState:
        """Everything a snapshot stores (:class:`core.state.ModelState`): CPU tensors, the
        JSON-able state, the data fingerprint; never ``b`` or ``g_a``."""
        return encode(self._parts(), self.data_fingerprint)

    def _parts(self) -> ModelParts:
        return ModelParts(
            problem=self._problem,
            coding=self._coding,
            hyper=self.hyper,
            epoch=self._epoch,
            budget_total=self.budget_total,
            version=self.version,
            safety_retrains=self.safety_retrains,
            save_seq=self.save_seq,
            extra=self.extra,
        )

    @classmethod
    def from_state(
        cls, state: ModelState, dataset: Dataset, device: str | torch.device | None = None
    ) -> Self:
        """The model a verified :class:`core.state.ModelState` on ``dataset`` describes, on
        ``device``; the state is the new accounting anchor (``b`` is not on disk)."""
        parts = decode(state, dataset, device)
        model = cls(
            problem=parts.problem,
            coding=parts.coding,
            hyper=parts.hyper,
            ids=dataset.ids_train,
            epoch=parts.epoch,
            budget_total=parts.budget_total,
            data_fingerprint=dataset.fingerprint(),  # verified against state.json: no second hash
        )
        model.version, model.safety_retrains = parts.version, parts.safety_retrains
        model.save_seq, model.extra = parts.save_seq, parts.extra
        model.dataset = dataset
        return model

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        dataset: Dataset | None = None,
        replace_dataset: bool = False,
        journal: dict[str, Any] | None = None,
        keep: int = persist.DEFAULT_KEEP,
    ) -> None:
        """Persist into a state directory atomically as a new checksummed snapshot (``b`` and
        ``g_a`` are never written; the files are :mod:`core.persist`'s).

        ``dataset`` (default: :attr:`dataset`, else one built from the model's rows) must hold the
        model's own training rows, labels and ids in its row order; anything else is refused
        with ``InvalidInputError`` (the persisted budget is anchored on it at the next load).
        ``replace_dataset=True`` lets a model on new data (a full-pipeline retrain) take over a
        state directory; otherwise a different dataset is refused with ``StateError``.
        ``journal``: a JSON-serialisable dict stored with the snapshot
        (:func:`core.loading.read_journal`). ``keep``: the newest snapshots kept (>= 1).

        Raises:
            InvalidInputError: bad ``keep`` or ``journal``, or a dataset that is not the model's
                training data (the message names what differs); nothing is written.
            StateError: a different dataset without ``replace_dataset``, or non-finite weights
                or budget (they would be refused at load); nothing is written.
        """
        journal_bytes = persist.check_save_options(journal, keep)
        self._check_finite()
        ds = dataset or self.dataset
        if ds is None:
            X, y, _ = self.training_data()
            ds = Dataset(X, y, self.ids, X[:0], y[:0], None, meta={"name": "in-memory"})
        # the dtypes the file stores, so that the fingerprint recorded is the one the load finds
        ds = ds.stored_form()
        check_training_data(ds, self.data_fingerprint, self.training_data)
        root = Path(directory)
        data = persist.store_dataset(root, ds, replace_dataset=replace_dataset)
        if ds is not self.dataset:
            self.dataset = ds  # (the setter drops what is cached on the dataset's meta)
        self.save_seq = persist.next_seq(root, self.save_seq)
        state = dataclasses.replace(self.to_state(), fingerprint=ds.fingerprint())
        self._log_base = None  # (a failed write leaves no snapshot to log on)
        written = persist.write_snapshot(root, state, data, journal=journal_bytes, keep=keep)
        self._log_base = _LogBase(root, written.name, self.version, state.tensors["alive"].bool())

    def _check_finite(self) -> None:
        """Raise :class:`StateError` for non-finite weights or budget: a load would refuse them."""
        if not bool(torch.isfinite(self._W).all()):
            raise StateError("refusing to save a model with non-finite weights")
        if not (math.isfinite(self.budget_used) and math.isfinite(self.budget_total)):
            raise StateError("refusing to save a model with a non-finite budget")

    def log_step(
        self,
        directory: str | os.PathLike[str],
        *,
        journal: dict[str, Any] | None = None,
        max_records: int = 256,
    ) -> bool:
        """Persist the steps since the last save or log as one record of the step log of the
        snapshot this model last saved in ``directory`` (:mod:`core.steplog`): the rows removed
        since, the weights, the state a snapshot would hold and ``journal``, appended and made
        durable. Returns False, writing nothing, when the caller must :meth:`save` instead: no
        snapshot saved by this model in ``directory`` (a loaded model's first persist is a
        snapshot, so a torn record is never appended to), the version changed since (a retrain),
        ``max_records`` records logged already, or the last append failed.

        Raises:
            InvalidInputError: a bad ``journal``; nothing is written.
            StateError: non-finite weights or budget; nothing is written.
            OSError: the append failed (the next call returns False: save a snapshot).
        """
        base, root = self._log_base, Path(directory)
        if base is None or base.root != root or base.version != self.version:
            return False
        if base.records >= max_records:
            return False
        if journal is not None and not isinstance(journal, dict):
            raise InvalidInputError(f"journal must be a dict, got {type(journal).__name__}")
        self._check_finite()
        state = self.to_state()  # (a fresh state dict)
        state.state["seq"] = self.save_seq + 1
        alive = state.tensors["alive"].bool()
        rows = torch.nonzero(base.alive & ~alive).flatten().numpy()
        try:  # (the journal is serialised once, in the record)
            record = steplog.encode_record(
                base=base.name,
                state=state.state,
                rows=rows,
                weights=state.tensors["weights"].numpy(),
                journal=journal,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"journal is not JSON-serialisable: {exc}") from exc
        self.save_seq += 1
        self._log_base = None  # until the append is durable (a failed one: save instead)
        steplog.append_record(steplog.log_path(root, base.name), record)
        self._log_base = dataclasses.replace(base, alive=alive, records=base.records + 1)
        return True
