"""The removal service: the drain loop, the retrain schedule and failure handling.

The life cycle it implements is docs/design.md "Request life cycle". No Celery here:
``worker.tasks`` calls :meth:`RemovalService.drain` and :meth:`RemovalService.retrain` and injects
how tasks are sent. One instance owns the model, through collaborators that each own one thing:
``worker.stream.Intake`` (entries read and held), ``worker.served.ServedModel`` (the model,
planning, persisting), ``worker.steps.NewtonSteps`` (a Newton step, the handover to the next
epoch), ``worker.epochs.NextEpoch`` (the next epoch, fitted in the background),
``worker.retrain.Retrainer`` (blocking retrains), ``worker.outbox.Outbox`` (journal, ledger,
statuses + XACK, dead letters, failure counts), ``worker.metrics`` (hooks) and
``worker.release_gate.ReleaseGate`` (releases of the persisted model after each batch and retrain
whose answers and statuses are out, as the release policy says; never fails a drain).

Drain (one bounded time slice): hold the doorbell; recover this consumer's pending entries and
claim idle ones of dead consumers; then serve up to ``max_batch`` waiting entries per Newton step
(the next batch read ahead meanwhile, ``worker.stream.Intake.read_ahead``; Python's cyclic
collector held off for the slice, ``worker.collector``) until the stream is empty or the slice
ends (then re-queue). On exit release the bell and look once more. When no prepared epoch can
take over at an epoch's end, ``certremove.retrain`` goes to the retrain queue (consumed first)
and folds every pending request into a retrain from scratch.

A batch that fails for a reason that is not the infrastructure's is served by halves down to the
entry at fault, which is counted and dead-lettered at ``max_failures``. After a failure mid-batch
the persisted model is reloaded (unacknowledged entries replay against it); when that reload
fails too the service stops for good and ``on_fatal`` ends the process (default), so nothing is
ever answered from a model that is ahead of the disk (``worker.failures``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from producer import schema
from worker import faults
from worker.collector import collector_paused
from worker.doorbell import Doorbell, SendTask
from worker.entries import Entry
from worker.epochs import NextEpoch
from worker.failures import FailureHandling
from worker.fatal import exit_process
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.outbox import Outbox
from worker.release_gate import ReleaseGate, ReleaseOptions
from worker.retrain import PipelineRetrain, Retrainer
from worker.served import ServedModel
from worker.steps import DrainReport, NewtonSteps
from worker.stream import Intake, RequestStream

if TYPE_CHECKING:
    from core.model import Model
    from worker.lease import Lease

__all__ = ["DrainReport", "PipelineRetrain", "RemovalService", "exit_process"]

log = logging.getLogger("certremove.worker")

RETRAIN_FOLD_CAP = 50_000
RETRAIN_RESEND_S = 60.0
#: seconds between two trims of the request stream (retention)
TRIM_EVERY_S = 10.0


class RemovalService(FailureHandling):
    """Owns one model and serves its request stream.

    Args:
        model: a ``core`` model (from ``core.load_model``; ``model.dataset`` set).
        state_dir: where ``model.save`` persists it.
        stream, ledger, metrics, doorbell: the collaborators (see their modules).
        send_task: ``send_task(name, queue)`` for ``certremove.retrain``.
        max_batch: most entries folded into one Newton step.
        slice_seconds: length of one drain's time slice.
        max_failures: processing failures an entry causes on its own (see ``worker.faults``)
            before it is dead-lettered; infrastructure failures never count.
        reload: loads the persisted model again (after a failure mid-batch).
        pipeline, pipeline_off_reason: the full-pipeline retrain (see ``worker.retrain``).
        on_fatal: called with the error when ``reload`` fails (the service has stopped serving);
            the default ends the process.
        retrain_lead: fraction of an epoch's ``max_removals`` left when the next epoch starts
            fitting in the background (0 turns background retrains off).
        lease: the model's ownership lease (``worker.lease.Lease``), checked before every
            persist; None in tests that run one service alone.
        stream_retention: seconds acknowledged entries stay in the stream (0: trim at once).
        max_backoff: longest wait between retries after an infrastructure failure.
        keep_snapshots: snapshots kept in the state directory.
        sleep: how to wait between retries (tests).
        releases: release the model (``worker.releases``) after batches as the policy says;
            None: no releases.
    """

    def __init__(
        self,
        *,
        model: Model,
        state_dir: Path,
        stream: RequestStream,
        ledger: Ledger,
        metrics: ServiceMetrics,
        doorbell: Doorbell,
        send_task: SendTask,
        max_batch: int = 8192,
        slice_seconds: float = 0.75,
        max_failures: int = 3,
        clock: Callable[[], float] = time.time,
        reload: Callable[[], Model] | None = None,
        pipeline: PipelineRetrain | None = None,
        pipeline_off_reason: str = "full-pipeline retrains are not configured",
        on_fatal: Callable[[BaseException], None] = exit_process,
        retrain_lead: float = 0.2,
        lease: Lease | None = None,
        stream_retention: float | None = None,
        max_backoff: float = 30.0,
        keep_snapshots: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        releases: ReleaseOptions | None = None,
    ) -> None:
        self.epochs = NextEpoch(retrain_lead, metrics)
        self.stream, self.ledger, self.metrics, self.doorbell = stream, ledger, metrics, doorbell
        self.intake = Intake(stream, max_batch)
        self.outbox = Outbox(ledger, stream.redis, metrics)
        self.served = ServedModel(
            model,
            state_dir,
            ledger=ledger,
            outbox=self.outbox,
            metrics=metrics,
            lease=lease,
            keep_snapshots=keep_snapshots,
            clock=clock,
        )
        self.retrainer = Retrainer(self.served, pipeline, pipeline_off_reason)
        self.steps = NewtonSteps(
            self.served, self.outbox, self.epochs, metrics, self.retrainer.rejects_spent, clock
        )
        # what arrived during a step is read while the step's batch is persisted and answered
        self.steps.stepped = self.intake.read_ahead
        self.state_dir = Path(state_dir)
        self.send_task = send_task
        self.max_batch, self.slice_seconds = max_batch, slice_seconds
        self.max_failures = max_failures
        self.stream_retention = stream_retention
        self.max_backoff = max_backoff
        self.clock = clock
        self._reload, self._on_fatal, self._sleep = reload, on_fatal, sleep
        self._stopped: str | None = None  # why the service no longer serves
        self._backoff = 0.0
        self._trimmed_at = 0.0
        #: the persisted snapshot's journal still has to be checked against the ledger
        self._journal_due = False
        self.retrain_due: str | None = None  # the reason, while a retrain is due
        self._retrain_sent_at: float | None = None
        self.releases: ReleaseGate | None = None
        if releases is not None:  # before the journal's replay (worker.release_gate)
            self.releases = ReleaseGate.build(
                releases, lease=lease, served=self.served, outbox=self.outbox, intake=self.intake
            )
        self.releaser = None if self.releases is None else self.releases.releaser
        self.stream.ensure_group()
        self._replay_journal()
        self.served.refresh_metrics()
        self._release()  # the trained model, once, when no release exists for it

    # ------------------------------------------------------------------ state
    @property
    def model(self) -> Model:
        """The model served now."""
        return self.served.model

    @property
    def _pipeline(self) -> PipelineRetrain | None:
        return self.retrainer.pipeline

    def _adopt(self, model: Model) -> None:
        self.served.adopt(model)
        self.close()  # background work for another model object is of no use to this one

    def close(self) -> None:
        """Drop the background work (a fit in progress runs out in its daemon thread, unused)."""
        self.epochs.close()
        self.steps.refactors.close()

    def refresh_metrics(self) -> None:
        """Publish the model's budget, version, size, test accuracy and extractor allowance."""
        self.served.refresh_metrics()

    def extractor_removals_remaining(self) -> int | None:
        """Rows the DP feature extractor's group privacy still covers (None without one)."""
        return self.served.extractor_removals_remaining()

    def _replay_journal(self) -> None:
        import core  # noqa: PLC0415 - the worker process has core loaded already

        self.outbox.replay_journal(core.read_journal(self.state_dir))

    def _release(
        self,
        *,
        poll: bool = False,
        idle: bool = False,
        carry: list[Entry] | None = None,
        hand_over: bool = False,
    ) -> None:
        """Release the persisted model as the policy says, where that is safe
        (``worker.release_gate``; ``hand_over``: announced on the announcing thread). Never
        raises."""
        if self.releases is not None:
            self.releases.release(poll=poll, idle=idle, carry=carry, hand_over=hand_over)

    def release_tick(self) -> None:
        """The periodic check's part: a manual release request, an interval run out, a release
        to retry (``worker.tasks``). Never raises."""
        if self._stopped is None:
            self._release(poll=True)

    def _request_retrain(self) -> None:
        """Send ``certremove.retrain`` once per due retrain (again if it seems lost)."""
        now = time.monotonic()
        if self._retrain_sent_at is None or now - self._retrain_sent_at > RETRAIN_RESEND_S:
            self.send_task(schema.TASK_RETRAIN, schema.retrain_queue_name(self.ledger.model))
            self._retrain_sent_at = now

    # ------------------------------------------------------------------ entry points
    def drain(self) -> DrainReport:
        """Serve the stream for one time slice."""
        self._check_serving()
        try:
            with collector_paused():
                self._settle()
                report = self._drain()
        except Exception as exc:  # noqa: BLE001 - sorted out by _on_failure
            hold_ms = int(self.slice_seconds * 1000) + 5000
            return self._on_failure(exc, lambda: self.doorbell.requeue(hold_ms))
        self._healthy()
        # a drain that emptied the stream leaves the service idle: announce all that is pending
        self._release(poll=True, idle=not (report.requeued or report.retrain_requested))
        return report

    def retrain(self) -> DrainReport:
        """Retrain from scratch, folding every pending request in."""
        self._check_serving()
        try:
            self._settle()
            report = self._retrain()
        except Exception as exc:  # noqa: BLE001 - sorted out by _on_failure
            self.served.dirty = True  # whatever the retrain left in memory is not served
            return self._on_failure(exc, self._resend_retrain)
        self._healthy()
        return report

    # ------------------------------------------------------------------ drain
    def _drain(self) -> DrainReport:
        report = DrainReport()
        deadline = time.monotonic() + self.slice_seconds
        hold_ms = int(self.slice_seconds * 1000) + 5000
        self.doorbell.hold(hold_ms)
        if self.retrain_due:
            self._request_retrain()  # at most once per due retrain
            self.doorbell.release()
            report.retrain_requested = True
            return report
        carry = self.intake.recover()
        phases = self.metrics.phases
        # statuses are published on their own thread while the next batch is served
        # (worker.publisher); every way out of the loop waits for them
        with self.outbox.deferred():
            while True:
                carry = self.outbox.take_failed(carry)
                started = time.perf_counter()
                try:
                    batch = self.intake.fill(carry)
                except BaseException:
                    phases.observe("read", time.perf_counter() - started)  # a failed read too
                    raise
                if not batch:
                    carry = self.outbox.take_failed(carry, wait=True)
                    if carry:
                        continue  # a publication failed: its entries are served again
                    break  # the drain's end (or an idle wake-up): no batch, nothing observed
                phases.observe("read", time.perf_counter() - started)
                self.intake.read_ahead()  # the next batch's read overlaps this one's step
                carry = self._serve(batch, report)
                with phases.timed("release"):
                    self._release(carry=carry, hand_over=True)
                if self.retrain_due:
                    self.outbox.take_failed(carry, wait=True)  # (its entries: the pending list)
                    report.retrain_requested = True
                    self.intake.forget()  # the retrain reads the pending list
                    self.doorbell.release()
                    return report
                if time.monotonic() >= deadline:
                    carry = self.outbox.take_failed(carry, wait=True)
                    report.requeued = True
                    self.intake.hold(carry)  # the next slice goes on with them, not re-delivered
                    self.doorbell.requeue(hold_ms)
                    return report
        self.doorbell.release()
        self._maybe_trim()
        if self.stream.has_undelivered() or self.stream.has_own_pending():
            self.intake.forget()  # own pending entries not in memory (unread pages): read them
            self.doorbell.ring()
        return report

    def _maybe_trim(self) -> None:
        """Trim acknowledged entries past the retention window, every ``TRIM_EVERY_S``."""
        if self.stream_retention is None:
            return
        now = self.clock()
        if now - self._trimmed_at < TRIM_EVERY_S:
            return
        self._trimmed_at = now
        self.metrics.on_trim(self.stream.trim(self.stream_retention, now))

    def _serve(self, batch: list[Entry], report: DrainReport) -> list[Entry]:
        """One step over ``batch``; when it fails for a reason that is not the infrastructure's,
        serve its halves, and so on down to single entries (a few steps per bad entry, not one
        per entry of a large batch), so that only an entry that fails on its own is counted
        (``_entry_failed``) and the rest flow. Returns the deferred entries."""
        try:
            return self._step(batch, report)
        except Exception as exc:  # noqa: BLE001 - sorted below
            if faults.is_infrastructure(exc) or faults.is_fenced(exc):
                raise
            first = exc
        self._recover_from(first)
        if len(batch) == 1:
            self._entry_failed(batch[0], first)
            return []
        log.warning(
            "a batch of %d entries failed (%s: %s): serving its halves apart",
            len(batch),
            type(first).__name__,
            str(first)[:300],
        )
        half = len(batch) // 2
        deferred = self._serve(batch[:half], report)
        if deferred or self.retrain_due:
            return deferred + batch[half:]
        return self._serve(batch[half:], report)

    def _step(self, batch: list[Entry], report: DrainReport) -> list[Entry]:
        """One Newton step over a batch; returns the deferred entries."""
        deferred, due = self.steps.step(batch, report)
        if due:
            self.retrain_due = due
            self._request_retrain()
        return deferred

    # ------------------------------------------------------------------ retrain
    def _resend_retrain(self) -> None:
        self._retrain_sent_at = None
        if self.retrain_due:
            self._request_retrain()
        else:
            self.doorbell.ring()

    def _retrain(self) -> DrainReport:
        report = DrainReport()
        self._retrain_sent_at = None
        if not self.retrain_due:
            self.doorbell.ring()  # a stale or duplicate retrain message: nothing is due
            return report
        self.close()  # a retrain from scratch replaces any background work
        with self.metrics.fitting():
            entries = self.intake.everything(RETRAIN_FOLD_CAP)
            out = self.retrainer.run(entries, self.retrain_due)
            self.metrics.on_retrain(
                self.retrain_due if out.retrained else None, out.seconds, out.rows_removed
            )
            # Requests past the extractor's allowance wait (pending) for the pipeline retrain.
            self.retrain_due = "extractor" if out.waiting and self._pipeline is not None else None
            self.served.refresh_metrics()
            out.plan.certify(self.clock())
            self.outbox.finish(out.plan)
            self._release()
            report.retrained, report.rows_removed = out.retrained, out.rows_removed
            report.requests = out.plan.served
            log.info(
                "retrained: version %d, %d rows excluded, %.2f s",
                self.model.version,
                out.rows_removed,
                out.seconds,
            )
        if self.retrain_due:
            log.info("%d requests wait for the full-pipeline retrain", len(out.waiting))
            report.retrain_requested = True
            self._request_retrain()
            return report
        self.doorbell.ring()
        return report

    # ------------------------------------------------------------------ failures
    def _entry_failed(self, entry: Entry, exc: BaseException) -> None:
        """Count a failure ``entry`` caused on its own; dead-letter it at ``max_failures``."""
        if not self.outbox.entry_failed(entry, exc, self.max_failures, self.clock()):
            self.intake.reread_pending()  # it stays pending: read it again with the pending list
