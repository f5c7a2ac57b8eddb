"""The model one worker serves, in memory and on disk.

Plans batches against it (:func:`worker.batch.plan_batch` with its rows, ids, guard and the ids
earlier full-pipeline retrains excluded), persists it with the journal of every answer not yet in
the ledger file (after checking the lease: a worker that lost it writes nothing), and tracks
whether the model in memory is ahead of the persisted state (``dirty``).

It also tells operators what it serves: a line in the state directory's history file per start,
persisted step and retrain (:mod:`worker.history`), and the overview hash
``certremove:{model}:info`` at every refresh (:mod:`worker.info`). Both are operator-only (the
budget figures depend on the secret noise) and neither ever fails a step: their write errors are
logged and ignored. The test accuracy they show is measured when the version changes and then at
most every ``worker.history.ACCURACY_EVERY_S`` seconds (one prediction over the test split).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.batch import Plan, plan_batch
from worker.entries import Entry
from worker.history import ACCURACY_EVERY_S, History, history_path, history_record
from worker.info import InfoPublisher, model_info
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.outbox import JOURNAL_FORMAT, Outbox
from worker.status import Answer, answer_records, group_answers

if TYPE_CHECKING:
    from core.data import Dataset
    from core.model import Model
    from worker.lease import Lease

log = logging.getLogger("certremove.worker")


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
        self.history = History(history_path(self.state_dir))
        self.info = InfoPublisher(ledger.redis, ledger.model)
        last = self.history.last_retrain or {}
        #: wall time and reason of the last retrain (from the history across restarts)
        self.last_retrain_at: float | None = last.get("t")
        self.last_retrain_reason: str | None = last.get("reason")
        #: (version, rows alive, monotonic time measured, test accuracy) of the last measurement
        self._accuracy: tuple[int, int, float, float | None] | None = None
        #: the newest snapshot persisted with its state record left to the status script (the
        #: drain's steps: :meth:`persist` with ``mark=False``); None: none
        self.mark_due: int | None = None
        if lease is not None:
            ledger.status.marker = self._marker
        self.adopt(model)
        self._recorded = (int(model.version), int(model.n_alive))
        self._record(model, "start")

    def adopt(self, model: Model) -> None:
        """Serve ``model`` (its ids; the ids earlier full-pipeline retrains excluded from its data
        count as removed already, see ``core.Model.excluded_ids``)."""
        self.model = model
        self.ids = np.asarray(model.ids)
        self._safety_seen = int(model.safety_retrains)

    def _marker(self) -> list[str] | None:
        """The state record's fields the status script writes (``StatusPublisher.marker``):
        those of :attr:`mark_due`, on the publishing thread; every script carries them, and
        Redis keeps the newest."""
        due = self.mark_due
        return None if due is None or self.lease is None else self.lease.marker_fields(due)

    def refresh_metrics(self) -> None:
        """Publish the model's budget, version, size, test accuracy and extractor allowance (the
        metrics, and the overview hash in Redis)."""
        accuracy = self.accuracy()  # cached per version (a measurement costs about half a step)
        self.metrics.observe_model(self.model, accuracy=accuracy)
        try:
            fields = model_info(
                self.model,
                accuracy=accuracy,
                last_retrain_at=self.last_retrain_at,
                last_retrain_reason=self.last_retrain_reason,
                consumer=None if self.lease is None else self.lease.consumer,
                now=self.clock(),
            )
        except Exception as exc:  # noqa: BLE001 - the overview never fails a drain
            log.warning("cannot describe the model for its overview hash: %s", exc)
            return
        self.info.publish(fields)

    def accuracy(self, model: Model | None = None) -> float | None:
        """Test accuracy of ``model`` (default: the served one) on its dataset's test split
        (None without one): measured again when the version changes, else at most every
        ``ACCURACY_EVERY_S`` seconds (the last measurement in between)."""
        model = self.model if model is None else model
        ds = model.dataset
        if ds is None or len(ds.y_test) == 0:
            return None
        now = time.monotonic()
        version, alive = int(model.version), int(model.n_alive)
        last = self._accuracy
        if last is not None and last[0] == version:
            if last[1] == alive or now - last[2] < ACCURACY_EVERY_S:
                return last[3]
        value = float(model.accuracy(ds.X_test, ds.y_test))
        self._accuracy = (version, alive, now, value)
        return value

    def _record(self, model: Model, event: str, reason: str | None = None) -> None:
        """Append the history line of ``event`` (never raises: the history is for operators)."""
        try:
            version, alive = int(model.version), int(model.n_alive)
            if event != "start" and (reason is not None or version != self._recorded[0]):
                event = "retrain"
            rows = 0 if event == "start" else max(0, self._recorded[1] - alive)
            self._recorded = (version, alive)
            now = self.clock()
            if event == "retrain":
                self.last_retrain_at, self.last_retrain_reason = now, reason
            record = history_record(
                model,
                event=event,
                model_name=self.ledger.model,
                rows=rows,
                now=now,
                accuracy=self.accuracy(model),
                reason=reason,
            )
        except Exception as exc:  # noqa: BLE001 - the history never fails a step
            log.warning("cannot describe the model for its history: %s", exc)
            return
        self.history.append(record)

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
        retrain_reason: str | None = None,
        mark: bool = True,
    ) -> None:
        """Persist the model (or ``model``, which takes over the state directory) with the
        journal of every answer not yet in the ledger file. Checks the lease first. Then the
        state record in Redis (``worker.state_marker``) names the new snapshot, here, or with
        ``mark=False`` in the status script that acknowledges the requests it holds (a drain's
        step: the record need only be as new as what is acknowledged, and the round trip stays
        off the drain's thread). Then a history line: ``retrain`` (with ``retrain_reason``)
        when the version changed or a reason is given, else ``step``."""
        if self.lease is not None:
            self.lease.check()
        pending = self.outbox.journal(list(answers or []))
        journal = {
            "format": JOURNAL_FORMAT,  # a later version's journal is refused, not misread
            # grouped like ledger lines (with each request's enqueue time): one record per
            # batch instead of an object per answer (``Outbox.replay_journal`` reads both)
            "records": answer_records(group_answers(pending), requested_at=True),
            "lease_token": None if self.lease is None else self.lease.token,
            "state_id": None if self.lease is None else self.lease.state_id,
        }
        save: dict[str, Any] = {}
        if dataset is not None:
            save = {"dataset": dataset, "replace_dataset": replace_dataset}
        saved = model or self.model
        # a drain's step appends to the step log of the snapshot this process last wrote
        # (core.steplog: one write and one fdatasync); anything else, or a step the log cannot
        # take (the first after a start, a retrain, a full log, a failed append), is a snapshot
        logged = (
            not mark
            and model is None
            and dataset is None
            and saved.log_step(self.state_dir, journal=journal)
        )
        if not logged:
            saved.save(self.state_dir, journal=journal, keep=self.keep_snapshots, **save)
        self.outbox.unrecorded = pending
        self.dirty = False
        if self.lease is not None and (mark or self.ledger.fence is None):
            # (a status script without the lease's token cannot carry the record: here, then)
            self.lease.mark_state(saved.save_seq)
        elif self.lease is not None:
            self.mark_due = saved.save_seq  # (durable now: a failed save never gets here)
        self._record(saved, "step", retrain_reason)

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
