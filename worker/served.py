"""The model one worker serves, in memory and on disk.

Plans batches against it (:func:`worker.batch.plan_batch` with its rows, ids, guard and the ids
earlier full-pipeline retrains excluded), persists it with the journal of every answer not yet in
the ledger file (after checking the lease: a worker that lost it writes nothing), and tracks
whether the model in memory is ahead of the persisted state (``dirty``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.batch import Plan, plan_batch
from worker.entries import Entry
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.outbox import Outbox
from worker.status import Answer

if TYPE_CHECKING:
    from core.data import Dataset
    from core.model import Model
    from worker.lease import Lease


class ServedModel:
    """Owns the model object and its state directory.

    Args:
        model: a ``core`` model (from ``core.load_model``; ``model.dataset`` set).
        state_dir: where ``model.save`` persists it.
        ledger, outbox, metrics: the collaborators (see their modules).
        lease: the model's ownership lease, checked before every persist (None: unfenced).
        keep_snapshots: snapshots kept in the state directory.
        clock: wall-clock time of answers.
    """

    def __init__(
        self,
        model: Model,
        state_dir: Path,
        *,
        ledger: Ledger,
        outbox: Outbox,
        metrics: ServiceMetrics,
        lease: Lease | None = None,
        keep_snapshots: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.ledger, self.outbox, self.metrics = ledger, outbox, metrics
        self.lease = lease
        self.keep_snapshots = keep_snapshots
        self.clock = clock
        #: the model in memory is ahead of the persisted state (a step ran, not yet persisted)
        self.dirty = False
        self.adopt(model)

    def adopt(self, model: Model) -> None:
        """Serve ``model`` (its ids; the ids earlier full-pipeline retrains excluded from its data
        count as removed already, see ``core.Model.excluded_ids``)."""
        self.model = model
        self.ids = np.asarray(model.ids)
        self._safety_seen = int(model.safety_retrains)

    def refresh_metrics(self) -> None:
        """Publish the model's budget, version, size, test accuracy and extractor allowance."""
        self.metrics.observe_model(self.model)

    def count_safety(self) -> None:
        """Count the budget safety net's firings since the last look."""
        fired = int(self.model.safety_retrains) - self._safety_seen
        if fired > 0:
            self.metrics.on_safety_retrains(fired)
            self._safety_seen += fired

    def extractor_removals_remaining(self) -> int | None:
        """Rows the DP feature extractor's group privacy still covers (None without one)."""
        value = self.model.extractor_removals_remaining
        return None if value is None else int(value)

    def persist(
        self,
        answers: list[Answer] | None = None,
        model: Model | None = None,
        *,
        dataset: Dataset | None = None,
        replace_dataset: bool = False,
    ) -> None:
        """Persist the model (or ``model``, which takes over the state directory) with the
        journal of every answer not yet in the ledger file. Checks the lease first."""
        if self.lease is not None:
            self.lease.check()
        pending = self.outbox.journal(list(answers or []))
        journal = {
            "answers": [a.to_json() for a in pending],
            "lease_token": None if self.lease is None else self.lease.token,
            "state_id": None if self.lease is None else self.lease.state_id,
        }
        save: dict[str, Any] = {}
        if dataset is not None:
            save = {"dataset": dataset, "replace_dataset": replace_dataset}
        saved = model or self.model
        saved.save(self.state_dir, journal=journal, keep=self.keep_snapshots, **save)
        self.outbox.unrecorded = pending
        self.dirty = False
        if self.lease is not None:
            self.lease.mark_state(saved.save_seq)

    def plan(self, entries: list[Entry], *, fold: bool) -> Plan:
        """Plan ``entries`` against the model (``fold``: a retrain, overlaps folded)."""
        model = self.model
        at_most = sum(len(e.sample_ids) for e in entries if e.sample_ids)
        return plan_batch(
            entries,
            rows_for_ids=model.rows_for_ids,
            alive=model.alive.cpu().numpy(),
            sample_ids=self.ids,
            ledger=self.ledger,
            guard=model.removal_guard(at_most),
            now=self.clock(),
            fold_overlaps=fold,
            is_excluded=self._is_excluded,
        )

    def _is_excluded(self, sample_id: Any) -> bool:
        excluded = self.model.excluded_ids
        return bool(excluded) and self.model.sample_id_key(sample_id) in excluded
