"""The removal service: batching, the drain protocol, retrain scheduling.

The life cycle it implements is docs/design.md "Request life cycle".

No Celery here: ``worker.tasks`` calls :meth:`RemovalService.drain` and
:meth:`RemovalService.retrain` and injects how tasks are sent. One instance owns the model.

Drain (one bounded time slice): hold the doorbell; recover this consumer's pending entries and
claim idle ones of dead consumers; then read up to ``max_batch`` waiting entries, fold them into
**one** Newton step (one ``model.remove`` call, ``groups`` = request sizes), persist the state,
record the ledger, write the statuses and ``XACK`` in one script; repeat until the stream is empty
or the slice ends (then re-queue). On exit release the bell and look once more.

Retrains in the background (``retrain_lead``): once a noise epoch has used ``1 - retrain_lead``
of its ``max_removals`` (a count, independent of ``b``; earlier when the last fit took longer
than that lead, see ``_lead_rows``), the next epoch is fitted in a background
thread from a snapshot of the alive rows, with fresh noise, while Newton steps go on against the
current epoch. When core says the current epoch is done (``needs_retrain``: the count reached, or
the budget safety net), the drain waits for that fit if it is still running, adopts it with one
catch-up Newton step for the rows removed since the snapshot (``core.Model.adopt_retrain``),
persists it (version + 1) and goes on with the same batch: the requests are answered
``method=newton`` on the new version. Which rows are caught up depends on the requests served,
never on the new noise; the fitted weights are never released before the catch-up.

When no prepared epoch can take over (none was started, or the catch-up does not fit it), nothing
more is applied to this model: ``certremove.retrain`` is sent to the retrain queue (consumed
first), which folds every pending request into a retrain from scratch (their rows excluded) and
answers them ``method=retrain``.

After a failure mid-batch the persisted model is reloaded (unacknowledged entries replay against
it); when that reload fails too the service stops for good and ``on_fatal`` ends the process
(default), so nothing is ever answered from a model that is ahead of the disk.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.guard import RemovalGuard
from producer import schema
from worker import faults
from worker.batch import Group, Plan, applied_answers, plan_batch, rejected_group
from worker.doorbell import Doorbell, SendTask
from worker.entries import Entry, parse_entries
from worker.errors import ServiceStoppedError
from worker.ledger import Answer, DeadLetter, Ledger
from worker.metrics import ServiceMetrics
from worker.stream import RequestStream

log = logging.getLogger("certremove.worker")

RETRAIN_FOLD_CAP = 50_000
RETRAIN_RESEND_S = 60.0
RATE_WINDOW_S = 3.0
#: seconds between two trims of the request stream (retention)
TRIM_EVERY_S = 10.0
#: first wait after an infrastructure failure; doubled per failure up to ``max_backoff``
FIRST_BACKOFF_S = 0.5
#: nice value of the background threads on the CPU (steady p99 over 4 interleaved pairs of runs:
#: 191-257 ms at 10, 226-315 ms at 0)
BACKGROUND_NICE = 10
#: start estimating an "auto" trigger ahead once the rows fall below this many times the point
#: where a fit would re-estimate it (core.model.AUTO_REESTIMATE_BELOW of the last estimate's)
ESTIMATE_AHEAD = 1.5
EXTRACTOR_SPENT = (
    "the DP feature extractor's group privacy covers no more removed rows and a full-pipeline "
    "retrain (extractor, features, head) cannot run"
)
EXTRACTOR_WAITS = (
    "the DP feature extractor's group privacy covers no more removed rows: the request waits for "
    "the full-pipeline retrain (extractor, features, head)"
)

#: ``pipeline(model, pending_rows) -> (dataset, new_model)``: the full-pipeline retrain
PipelineRetrain = Callable[[Any, list[int]], tuple[Any, Any]]


def _s(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def exit_process(exc: BaseException) -> None:
    """End the worker process at once (the supervisor restarts it on the persisted state)."""
    log.critical("the service stopped (%s): exiting the worker process", exc)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)


@dataclass
class DrainReport:
    """What one drain or retrain did (for logs and tests)."""

    steps: int = 0
    requests: int = 0
    rows_removed: int = 0
    requeued: bool = False
    retrain_requested: bool = False
    retrained: bool = False
    #: background retrains adopted (catch-up step, version + 1) during this drain
    adopted: int = 0
    #: the infrastructure failure this drain stopped on (it is retried after ``backoff`` s)
    infrastructure_error: str = ""
    backoff: float = 0.0


class BackgroundRunner:
    """One daemon thread running jobs in submission order (an estimate before the fit that uses
    it). A daemon: the process never waits for a fit at exit (its result is never persisted)."""

    def __init__(self, name: str = "certremove-retrain") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for it
                future.set_exception(exc)


class RemovalService:
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
        pipeline: the full-pipeline retrain for a model on DP-extractor features; None rejects
            requests past the extractor's group privacy with ``pipeline_off_reason``.
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
    """

    def __init__(
        self,
        *,
        model: Any,
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
        reload: Callable[[], Any] | None = None,
        pipeline: PipelineRetrain | None = None,
        pipeline_off_reason: str = "full-pipeline retrains are not configured",
        on_fatal: Callable[[BaseException], None] = exit_process,
        retrain_lead: float = 0.2,
        lease: Any = None,
        stream_retention: float | None = None,
        max_backoff: float = 30.0,
        keep_snapshots: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 <= retrain_lead < 1:
            raise ValueError(f"retrain_lead must lie in [0, 1), got {retrain_lead}")
        self.retrain_lead = retrain_lead
        self._pool: BackgroundRunner | None = None
        self._estimator: BackgroundRunner | None = None
        #: the next noise epoch, fitting in the background: (future, model it was started for)
        self._next: tuple[Future[tuple[Any, float]], Any] | None = None
        self._fit_seconds: float | None = None  # of the last background fit
        #: an "auto" max_removals estimated ahead of the next fit, in the background
        self._estimate: Future[Any] | None = None
        self._marks: deque[tuple[float, int]] = deque()  # (time, rows removed so far)
        #: entries read and not answered, carried from one time slice to the next in memory
        self._held: list[Entry] = []
        #: where to read this consumer's pending list from (None: read, all held in memory)
        self._pel_cursor: bytes | str | None = "0"
        self._reload = reload
        self._on_fatal = on_fatal
        self._stopped: str | None = None  # why the service no longer serves
        self._pipeline = pipeline
        # With a pipeline configured, requests past the extractor wait for it (never rejected).
        self._extractor_spent = (
            f"{EXTRACTOR_SPENT}: {pipeline_off_reason}" if pipeline is None else EXTRACTOR_WAITS
        )
        self.state_dir = Path(state_dir)
        self.stream, self.ledger, self.metrics, self.doorbell = stream, ledger, metrics, doorbell
        self.send_task = send_task
        self.max_batch, self.slice_seconds, self.max_failures = (
            max_batch,
            slice_seconds,
            max_failures,
        )
        self.lease = lease
        self.stream_retention = stream_retention
        self.max_backoff = max_backoff
        self.keep_snapshots = keep_snapshots
        self._sleep = sleep
        self._backoff = 0.0
        self._trimmed_at = 0.0
        #: answers of persisted steps not yet in the ledger file (journaled with each persist)
        self._unrecorded: list[Answer] = []
        #: the model in memory is ahead of the persisted state (a step ran, not yet persisted)
        self._dirty = False
        #: the persisted snapshot's journal still has to be checked against the ledger
        self._journal_due = False
        #: entry ids with a processing failure counted in Redis (cleared when acknowledged)
        self._failed: set[bytes] = set()
        self.clock = clock
        self.retrain_due: str | None = None  # the reason, while a retrain is due
        self._retrain_sent_at: float | None = None
        self._adopt(model)
        self.stream.ensure_group()
        self._failed = {_b(k) for k in self.stream.redis.hkeys(self.ledger.failures_key)}
        self._replay_journal()
        self.refresh_metrics()

    # ------------------------------------------------------------------ state
    def _adopt(self, model: Any) -> None:
        """Serve ``model`` (its ids; the ids earlier full-pipeline retrains excluded from its data
        count as removed already, see ``core.Model.excluded_ids``)."""
        self.model = model
        self._ids = np.asarray(model.ids)
        self._safety_seen = int(model.safety_retrains)
        self.close()  # background work for another model object is of no use to this one

    def refresh_metrics(self) -> None:
        """Publish the model's budget, version, size, test accuracy and extractor allowance."""
        self.metrics.observe_model(self.model)

    def extractor_removals_remaining(self) -> int | None:
        """Rows the DP feature extractor's group privacy still covers (None without one)."""
        value = getattr(self.model, "extractor_removals_remaining", None)
        return None if value is None else int(value)

    def _persist(self, answers: list[Answer] | None = None, model: Any = None, **save: Any) -> None:
        """Persist the model with the journal of every answer not yet in the ledger file: a
        crash between this and the ledger append is repaired at the next start
        (:meth:`_replay_journal`), so the replayed request is answered with its method and
        version. Checks the lease first: a worker that lost it writes nothing."""
        if self.lease is not None:
            self.lease.check()
        pending = self._unrecorded + list(answers or [])
        journal = {
            "answers": [a.to_json() for a in pending],
            "lease_token": None if self.lease is None else self.lease.token,
            "state_id": None if self.lease is None else self.lease.state_id,
        }
        (model or self.model).save(
            self.state_dir, journal=journal, keep=self.keep_snapshots, **save
        )
        self._unrecorded = pending
        self._dirty = False
        if self.lease is not None:
            self.lease.mark_state()

    def _replay_journal(self) -> None:
        """Record in the ledger the journaled answers of the persisted snapshot that the ledger
        file lacks (the process stopped between the persist and the ledger append)."""
        import core  # noqa: PLC0415 - the worker process has core loaded already

        journal = core.read_journal(self.state_dir)
        answers = [Answer.from_json(r) for r in (journal or {}).get("answers", [])]
        missing = []
        for a in answers:
            prior = self.ledger.seen(a.request_id)
            if prior is None or (prior.dead_letter and a.status == schema.STATUS_APPLIED):
                missing.append(a)
        if missing:
            self.ledger.record(missing)
            log.info("recorded %d journaled answers the ledger lacked", len(missing))
        self._unrecorded = []

    def _guard(self, entries: list[Entry]) -> RemovalGuard:
        at_most = sum(len(e.sample_ids) for e in entries if e.sample_ids)
        return self.model.removal_guard(at_most)

    def _is_excluded(self, sample_id: Any) -> bool:
        excluded = self.model.excluded_ids
        return bool(excluded) and self.model.sample_id_key(sample_id) in excluded

    def _plan(self, entries: list[Entry], *, fold: bool) -> tuple[Plan, np.ndarray]:
        alive = self.model.alive.cpu().numpy()
        plan = plan_batch(
            entries,
            rows_for_ids=self.model.rows_for_ids,
            alive=alive,
            sample_ids=self._ids,
            ledger=self.ledger,
            guard=self._guard(entries),
            now=self.clock(),
            fold_overlaps=fold,
            is_excluded=self._is_excluded,
        )
        return plan, alive

    def _finish(self, plan: Plan, committed: list[Answer], committed_entries: list[Entry]) -> None:
        """Ledger, statuses + XACK, dead letters and request metrics of a planned batch."""
        answers = plan.answers + committed
        recorded = {id(a) for a in self._unrecorded}
        self.ledger.record(self._unrecorded + [a for a in answers if id(a) not in recorded])
        self._unrecorded = []
        ack = [e.entry_id for e in plan.answered] + [e.entry_id for e in committed_entries]
        dead: list[DeadLetter] = [(e.entry_id, e.fields, e.error or "malformed") for e in plan.dead]
        ack_ids = ack + plan.ack_only
        self.ledger.publish(answers, ack_ids, dead)
        self._clear_failures(ack_ids + [eid for eid, _, _ in dead])
        if plan.dead:
            self.metrics.requests.labels(outcome="dead_letter").inc(len(plan.dead))
        outcomes: dict[str, int] = {}
        observe = self.metrics.request_latency_seconds.observe
        for a in answers:
            if a.only_if_queued:
                continue
            outcomes[a.status] = outcomes.get(a.status, 0) + 1
            if a.status == schema.STATUS_APPLIED and a.requested_at and a.applied_at:
                observe(max(0.0, a.applied_at - a.requested_at))
        for outcome, count in outcomes.items():
            self.metrics.requests.labels(outcome=outcome).inc(count)
        if plan.repeats:
            self.metrics.requests.labels(outcome="duplicate").inc(plan.repeats)

    # ------------------------------------------------------------------ drain
    def _recover(self) -> list[Entry]:
        """This consumer's pending entries plus idle ones claimed from others (never
        dead-lettered for how often Redis delivered them: restarts and retries re-read the
        pending list, and that is no fault of the entry's)."""
        held, self._held = self._held, []
        room = self.max_batch - len(held)
        raw: list[Any] = []
        if self._pel_cursor is not None and room > 0:
            # read the pending list once per process (and after a failure or a retrain), not
            # again at every time slice: entries read stay in memory across slices
            raw = self.stream.read_own_pending(room, start=self._pel_cursor)
            # reads after an explicit id are exclusive: the next page starts after the last one
            self._pel_cursor = None if len(raw) < room else raw[-1][0]
        if len(held) + len(raw) < self.max_batch:
            raw += self.stream.autoclaim(self.max_batch - len(held) - len(raw))
        if held and raw:  # a later page of the pending list holds entries read since
            mine = {e.entry_id for e in held}
            raw = [(eid, fields) for eid, fields in raw if eid not in mine]
        return held + parse_entries(raw)

    # ------------------------------------------------------------ failures
    def _clear_failures(self, entry_ids: list[bytes]) -> None:
        """Forget the failure counts of entries that are acknowledged now."""
        if not self._failed:
            return
        done = self._failed.intersection(entry_ids)
        if done:
            self.stream.redis.hdel(self.ledger.failures_key, *done)
            self._failed -= done

    def _entry_failed(self, entry: Entry, exc: BaseException) -> None:
        """Count a failure ``entry`` caused on its own; dead-letter it at ``max_failures``."""
        count = int(self.stream.redis.hincrby(self.ledger.failures_key, entry.entry_id, 1))
        self._failed.add(entry.entry_id)
        self.metrics.entry_failures.inc()
        error = f"{type(exc).__name__}: {exc}"[:300]
        log.warning(
            "entry %s (request %s) failed on its own, %d of %d: %s",
            _s(entry.entry_id),
            entry.request_id,
            count,
            self.max_failures,
            error,
        )
        if count >= self.max_failures:
            reason = f"dead-lettered: processing it failed {count} times ({error})"
            self._dead_letter([entry], reason)
        else:
            self._forget_held()  # it stays pending: read it again with the pending list

    def _dead_letter(self, entries: list[Entry], reason: str) -> None:
        """Copy ``entries`` to the dead-letter stream with ``reason``, answer them rejected
        (an answer the ledger holds already is repeated instead) and acknowledge them. When
        the status cannot be written (the entry's own status key is the fault), the copy and
        the acknowledgement go alone: the dead-letter stream holds the reason."""
        now = self.clock()
        answers: list[Answer] = []
        for e in entries:
            if not e.request_id:
                continue
            prior = self.ledger.seen(e.request_id)
            if prior is not None and not prior.dead_letter:
                prior.requested_at = e.requested_at
                answers.append(prior)
                continue
            answers.append(
                Answer(
                    e.request_id,
                    schema.STATUS_REJECTED,
                    reason=reason,
                    requested_at=e.requested_at,
                    applied_at=now,
                    dead_letter=True,
                )
            )
        dead: list[DeadLetter] = [(e.entry_id, e.fields, reason) for e in entries]
        self.ledger.record(answers)
        try:
            self.ledger.publish(answers, [], dead)
        except Exception as exc:
            if faults.is_infrastructure(exc) or faults.is_fenced(exc):
                raise
            log.warning("the dead letters' statuses cannot be written (%s): copying alone", exc)
            self.ledger.publish([], [], dead)
        self._clear_failures([e.entry_id for e in entries])
        self.metrics.requests.labels(outcome="dead_letter").inc(len(entries))
        for e in entries:
            log.warning(
                "dead-lettered entry %s (request %s): %s", _s(e.entry_id), e.request_id, reason
            )

    def _redo_dead_letters(self, batch: list[Entry]) -> list[Entry]:
        """Copy and acknowledge the entries whose dead-lettering stopped after the ledger recorded
        it (Redis failed before the copy): answered as a repeat, they would have no dead letter
        to replay. Returns the rest of ``batch``."""
        redo: list[tuple[Entry, str]] = []
        for e in batch:
            if e.entry_id not in self._failed or e.replay_of or not e.request_id:
                continue
            prior = self.ledger.seen(e.request_id)
            if prior is not None and prior.dead_letter:
                redo.append((e, prior.reason))
        for e, reason in redo:
            self._dead_letter([e], reason)
        done = {e.entry_id for e, _ in redo}
        return [e for e in batch if e.entry_id not in done] if done else batch

    def _forget_held(self) -> None:
        """Entries held across time slices are left to the pending list: read it again next."""
        self._held, self._pel_cursor = [], "0"

    def _resync(self) -> None:
        """After a failure mid-step the model in memory may be ahead of the persisted state:
        reload the persisted one (entries not acknowledged are replayed against it). When the
        reload fails, stop serving for good and call ``on_fatal`` (default: exit the process)."""
        if self._reload is None:
            return
        log.warning("reloading the persisted model after a failure")
        try:
            model = self._reload()
        except Exception as exc:  # noqa: BLE001 - whatever it is, this model must not serve
            self._stopped = f"reloading the persisted model after a failure failed: {exc}"
            log.critical("%s: the service stops", self._stopped)
            self._on_fatal(exc)
            return
        self._adopt(model)
        self.retrain_due, self._retrain_sent_at = None, None
        self._dirty, self._unrecorded, self._journal_due = False, [], True

    def _check_serving(self) -> None:
        if self._stopped is not None:
            raise ServiceStoppedError(self._stopped)

    def _settle(self) -> None:
        """Finish what a failure left before serving: the journal of a reloaded snapshot and
        answers persisted but not yet in the ledger file go to the ledger first (so a replayed
        request is answered with its method and version, not as already removed)."""
        if self._journal_due:
            self._replay_journal()
            self._journal_due = False
        if self._unrecorded:
            self.ledger.record(self._unrecorded)
            self._unrecorded = []

    def _on_failure(self, exc: Exception, retry: Callable[[], None]) -> DrainReport:
        """A drain or retrain failed: stop for good when the lease is lost; reload the model
        when it ran ahead of the disk; wait (backoff) and ``retry`` after a disk, Redis or
        memory failure, rejecting nothing; re-raise anything else."""
        self._forget_held()
        if faults.is_fenced(exc):
            self._stopped = f"this worker lost the lease of model {self.ledger.model!r}: {exc}"
            log.critical("%s: the service stops", self._stopped)
            self._on_fatal(exc)
            raise exc
        if self._dirty:
            self._resync()
            if self._stopped is not None:
                raise exc
        if not faults.is_infrastructure(exc):
            raise exc
        kind = faults.kind(exc)
        self.metrics.infrastructure_errors.labels(kind=kind).inc()
        self._backoff = min(self.max_backoff, max(FIRST_BACKOFF_S, 2 * self._backoff))
        self.metrics.infrastructure_backoff_seconds.set(self._backoff)
        log.warning(
            "%s failure (%s: %s); nothing is rejected for it: retrying in %.1f s",
            kind,
            type(exc).__name__,
            str(exc)[:300],
            self._backoff,
        )
        self._sleep(self._backoff)
        try:
            retry()
        except Exception as again:  # noqa: BLE001 - the periodic check sends the next drain
            log.warning("cannot queue the retry now (%s): the periodic check will", again)
        return DrainReport(
            requeued=True, infrastructure_error=str(exc)[:300], backoff=self._backoff
        )

    def _healthy(self) -> None:
        if self._backoff:
            log.info("serving again after an infrastructure failure")
            self._backoff = 0.0
            self.metrics.infrastructure_backoff_seconds.set(0.0)

    def drain(self) -> DrainReport:
        """Serve the stream for one time slice."""
        self._check_serving()
        try:
            self._settle()
            report = self._drain()
        except Exception as exc:  # noqa: BLE001 - sorted out by _on_failure
            hold_ms = int(self.slice_seconds * 1000) + 5000
            return self._on_failure(exc, lambda: self.doorbell.requeue(hold_ms))
        self._healthy()
        return report

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
        carry = self._recover()
        while True:
            room = self.max_batch - len(carry)
            batch = carry + (parse_entries(self.stream.read_new(room)) if room > 0 else [])
            if not batch:
                break
            carry = self._serve(batch, report)
            if self.retrain_due:
                report.retrain_requested = True
                self._forget_held()  # the retrain reads the pending list
                self.doorbell.release()
                return report
            if time.monotonic() >= deadline:
                report.requeued = True
                self._held = carry  # the next slice goes on with them, not re-delivered
                self.doorbell.requeue(hold_ms)
                return report
        self.doorbell.release()
        self._maybe_trim()
        if self.stream.has_undelivered() or self.stream.has_own_pending():
            self._forget_held()  # own pending entries not in memory (unread pages): read them
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
        trimmed = self.stream.trim(self.stream_retention, now)
        if trimmed:
            self.metrics.stream_trimmed.inc(trimmed)

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

    def _recover_from(self, exc: Exception) -> None:
        """After a step failed: reload the model if it ran ahead of the disk, then settle."""
        if self._dirty:
            self._resync()
            if self._stopped is not None:
                raise exc
        self._settle()

    def _step(self, batch: list[Entry], report: DrainReport) -> list[Entry]:
        """One Newton step over a batch; returns the deferred entries."""
        batch = self._redo_dead_letters(batch)
        plan, _ = self._plan(batch, fold=False)
        committed: list[Answer] = []
        committed_entries: list[Entry] = []
        if plan.groups:
            rows = [r for g in plan.groups for r in g.rows]
            t0 = time.perf_counter()
            self._dirty = True
            try:
                res = self.model.remove(rows, groups=[len(g.rows) for g in plan.groups])
            except ValueError as exc:  # core refused the call (InvalidInputError): answer it
                self._dirty = False  # core checks before it changes anything
                now = self.clock()
                plan.answers += [rejected_group(g, str(exc), now) for g in plan.groups]
                plan.answered += [g.entry for g in plan.groups]
                self._finish(plan, [], [])
                return plan.deferred
            seconds = time.perf_counter() - t0
            done = plan.groups[: res.applied_groups]
            committed = applied_answers(
                done, schema.METHOD_NEWTON, self.model.version, self.clock(), self._ids
            )
            if res.removed:
                self._persist(committed)
                n = len(res.removed)
                self.metrics.newton_update_seconds.observe(seconds)
                self.metrics.batch_size.observe(n)
                self.metrics.removals.labels(method=schema.METHOD_NEWTON).inc(n)
                report.rows_removed += n
                report.steps += 1
                self.refresh_metrics()
                self._mark_removed(n)
                self._maybe_prepare_next()
            else:
                self._dirty = False
            now = self.clock()
            for a in committed:
                a.applied_at = now  # certified once persisted
            committed_entries = [g.entry for g in done]
            if res.needs_retrain and res.retrain_reason == "extractor" and self._pipeline is None:
                # No retrain of the head helps: the request exceeds what the DP extractor's group
                # privacy still covers. Answer it; the requests after it go round again.
                stuck = plan.groups[res.applied_groups]
                plan.answers.append(rejected_group(stuck, self._extractor_spent, self.clock()))
                plan.answered.append(stuck.entry)
                plan.deferred = [g.entry for g in plan.groups[res.applied_groups + 1 :]] + (
                    plan.deferred
                )
            elif res.needs_retrain:
                reason = res.retrain_reason or "max_removals"
                self._count_safety()
                rest = plan.groups[res.applied_groups :]
                took = None if reason == "extractor" else self._adopt_next(reason, rest)
                if took is None:
                    self.retrain_due = reason
                else:
                    # The rest of the batch rode in the catch-up step, as far as it fitted; the
                    # groups left go round again on the new epoch.
                    adopted, ridden_answers = took
                    report.adopted += 1
                    report.rows_removed += len(adopted.removed)
                    ridden = rest[: adopted.applied_groups]
                    committed += ridden_answers
                    committed_entries += [g.entry for g in ridden]
                    report.steps += 1
                    plan.deferred = [g.entry for g in rest[adopted.applied_groups :]] + (
                        plan.deferred
                    )
                    if adopted.retrain_reason in ("budget", "numerical"):
                        # The new epoch's safety net fired (a b-dependent outcome): no more
                        # tries on it; a retrain folds the rest. (Past its count, the groups left
                        # go round again and meet the next background fit as usual.)
                        self.retrain_due = adopted.retrain_reason
        self._finish(plan, committed, committed_entries)
        report.requests += len(plan.answered) + len(committed_entries)
        if self.retrain_due:
            self._request_retrain()
        return plan.deferred

    # ------------------------------------------------------------ background retrain
    def _maybe_prepare_next(self) -> None:
        """Start fitting the next noise epoch in the background once this one has used
        ``1 - retrain_lead`` of its ``max_removals`` (a row count: independent of ``b``)."""
        model = self.model
        limit = model.max_removals
        if self.retrain_lead <= 0 or self._next is not None or not limit or self.retrain_due:
            return
        left = model.extractor_removals_remaining
        if left is not None and left < limit - model.removed_in_epoch:
            return  # the DP extractor's allowance ends this epoch: a head fit would be wasted
        if self._pool is None:
            self._pool = BackgroundRunner()
        if self._estimate is None and model.auto_reestimate_due(margin=ESTIMATE_AHEAD):
            # A fit soon would re-estimate an "auto" trigger by shadow runs (several fits): do
            # that now, in a thread of its own, on the rows of today (b-independent: the shadow
            # runs draw their own noise), and let the fit scale it.
            if self._estimator is None:
                self._estimator = BackgroundRunner("certremove-estimate")
            self._estimate = self._estimator.submit(
                self._background, self._estimate_ahead, model, model.retrain_snapshot()
            )
        if model.removed_in_epoch < limit - self._lead_rows(limit):
            return
        snapshot = model.retrain_snapshot()  # taken here, between steps
        estimate = None
        if self._estimate is not None and self._estimate.done():
            estimate, self._estimate = self._estimate, None
        # A fit never waits for shadow runs: with an estimate still running it scales the last
        # one for this epoch (the next fit takes the new estimate).
        reestimate = self._estimate is None
        self._next = (
            self._pool.submit(self._prepare, model, snapshot, estimate, reestimate),
            model,
        )
        log.info(
            "epoch %d: %d of %d removals used, fitting the next epoch in the background",
            model.version,
            model.removed_in_epoch,
            limit,
        )

    @staticmethod
    def _estimate_ahead(model: Any, snapshot: Any) -> Any:
        t0 = time.perf_counter()
        basis = model.estimate_max_removals(snapshot)
        log.info(
            "estimated max_removals ahead: %s (rows, value) in %.2f s",
            basis,
            time.perf_counter() - t0,
        )
        return basis

    def _lead_rows(self, limit: int) -> int:
        """Rows before the count at which the next epoch starts fitting: ``retrain_lead`` of the
        epoch, or more when the last fit took longer than that many rows arrive in (twice the
        rows removed meanwhile at the recent rate; shadow runs never delay a fit, see
        ``_maybe_prepare_next``), at most half the epoch. Past fit times and the load decide this,
        never the noise of the epoch being fitted (drawn after the snapshot), and the epoch in
        use still ends at its count."""
        lead = math.ceil(self.retrain_lead * limit)
        if self._fit_seconds is not None:
            lead = max(lead, math.ceil(2 * self._removal_rate() * self._fit_seconds))
        return min(lead, limit // 2)

    def _removal_rate(self) -> float:
        """Rows removed per second over the last few seconds of steps."""
        marks = self._marks
        if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
            return 0.0
        return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])

    def _mark_removed(self, rows: int) -> None:
        now = time.monotonic()
        total = (self._marks[-1][1] if self._marks else 0) + rows
        self._marks.append((now, total))
        while len(self._marks) > 2 and now - self._marks[0][0] > RATE_WINDOW_S:
            self._marks.popleft()

    def _background(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs ``job`` in the background thread at a lower CPU priority on the CPU, so the Newton
        steps of the current epoch keep theirs."""
        if str(getattr(self.model, "device", "cpu")) == "cpu":
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            except (OSError, AttributeError):  # not Linux, or not allowed: same priority
                pass
        return job(*args, **kwargs)

    def _prepare(
        self, model: Any, snapshot: Any, estimate: Future[Any] | None, reestimate: bool
    ) -> tuple[Any, float]:
        """Runs in the background thread: the fit (with the trigger estimated ahead, if any)."""
        self.metrics.retrain_in_progress.inc()
        t0 = time.perf_counter()
        try:
            basis = None
            if estimate is not None:
                try:
                    basis = estimate.result()
                except Exception:  # noqa: BLE001 - the fit estimates it itself then
                    log.exception("estimating max_removals ahead failed")
            prepared = self._background(
                model.prepare_retrain, snapshot, auto_basis=basis, reestimate=reestimate
            )
            return prepared, time.perf_counter() - t0
        finally:
            self.metrics.retrain_in_progress.dec()

    def _adopt_next(self, reason: str, rest: list[Group]) -> tuple[Any, list[Answer]] | None:
        """Take over the epoch fitted in the background (waiting for it if need be): one Newton
        step removes the rows removed since its snapshot and the ``rest`` of the batch (as far
        as they fit), persist, version + 1. Returns core's ``RemovalResult`` for ``rest`` and
        the answers of the groups that rode in it, or None when there is no fitted epoch or it
        cannot take over."""
        if self._next is None:
            return None
        future, model = self._next
        self._next = None
        if model is not self.model:
            return None
        t0 = time.perf_counter()
        try:
            prepared, fit_seconds = future.result()
        except Exception:  # noqa: BLE001 - the synchronous retrain takes over
            log.exception("the background retrain failed; retraining in the foreground")
            return None
        self.metrics.retrain_wait_seconds.observe(time.perf_counter() - t0)
        rows = [r for g in rest for r in g.rows]
        t1 = time.perf_counter()
        self._dirty = True
        try:
            res = self.model.adopt_retrain(prepared, rows, groups=[len(g.rows) for g in rest])
        except ValueError as exc:  # core refused the rows: the retrain that folds answers them
            self._dirty = False  # adopt_retrain restores the model on any error
            log.warning("the background retrain could not take the batch over: %s", exc)
            return None
        if res is None:
            self._dirty = False
            self._count_safety()
            log.warning("the background retrain could not take over; retraining in the foreground")
            return None
        step_seconds = time.perf_counter() - t1
        self._count_safety()
        ridden = applied_answers(
            rest[: res.applied_groups],
            schema.METHOD_NEWTON,
            self.model.version,
            self.clock(),
            self._ids,
        )
        self._persist(ridden)
        self._fit_seconds = fit_seconds
        self.metrics.retrains.labels(reason=reason).inc()
        self.metrics.retrain_seconds.observe(fit_seconds)
        self.metrics.newton_update_seconds.observe(step_seconds)
        if res.removed:
            n = len(res.removed)
            self.metrics.batch_size.observe(n)
            self.metrics.removals.labels(method=schema.METHOD_NEWTON).inc(n)
            self._mark_removed(n)
        self.refresh_metrics()
        log.info(
            "adopted the background retrain: version %d, %d rows caught up and %d removed in "
            "one step, fit %.2f s, waited %.2f s",
            self.model.version,
            self.model.removed_in_epoch - len(res.removed),
            len(res.removed),
            fit_seconds,
            t1 - t0,
        )
        self._maybe_prepare_next()
        return res, ridden

    def close(self) -> None:
        """Drop the background work (a fit in progress runs out in its daemon thread, unused)."""
        for job in (self._next[0] if self._next else None, self._estimate):
            if job is not None:
                job.cancel()
        self._next = self._estimate = None

    def _drop_beyond_extractor(self, plan: Plan) -> list[Entry]:
        """Keep, in arrival order, the groups a head retrain can exclude within what the DP
        extractor's group privacy still covers. Without a full-pipeline retrain the others are
        rejected; with one, the first group that does not fit and every later one stay pending
        (returned, neither answered nor acknowledged) for the pipeline retrain that follows.

        Rows are handed out again over the kept groups (each takes its ``needs`` not yet taken),
        so a kept request never counts on rows of a dropped one."""
        left = self.extractor_removals_remaining()
        if left is None:
            return []
        keep: list[Group] = []
        waiting: list[Entry] = []
        taken: set[int] = set()
        now = self.clock()
        for g in plan.groups:
            rows = [r for r in g.needs if r not in taken]
            if waiting or len(rows) > left:
                if self._pipeline is not None:
                    waiting.append(g.entry)
                else:
                    plan.answers.append(rejected_group(g, self._extractor_spent, now))
                    plan.answered.append(g.entry)
                continue
            g.rows = rows
            keep.append(g)
            taken.update(rows)
            left -= len(rows)
        plan.groups = keep
        return waiting

    def _retrain_pipeline(self, exclude: list[int], groups: list[Group]) -> list[Answer]:
        """Extractor, features and head again without every removed row (``core.pipeline``);
        the new model takes over the state directory with its new dataset. Returns the answers
        of ``groups`` (journaled with the new state)."""
        assert self._pipeline is not None
        log.info("DP extractor spent: full-pipeline retrain without %d more rows", len(exclude))
        ids = self._ids  # the rows of the old dataset
        dataset, model = self._pipeline(self.model, exclude)
        answers = applied_answers(groups, schema.METHOD_RETRAIN, model.version, self.clock(), ids)
        self._persist(answers, model=model, dataset=dataset, replace_dataset=True)
        self._adopt(model)
        return answers

    def _count_safety(self) -> None:
        fired = int(self.model.safety_retrains) - self._safety_seen
        if fired > 0:
            self.metrics.safety_retrains.inc(fired)
            self._safety_seen += fired

    def _request_retrain(self) -> None:
        """Send ``certremove.retrain`` once per due retrain (again if it seems lost)."""
        now = time.monotonic()
        if self._retrain_sent_at is None or now - self._retrain_sent_at > RETRAIN_RESEND_S:
            self.send_task(schema.TASK_RETRAIN, schema.retrain_queue_name(self.ledger.model))
            self._retrain_sent_at = now

    # ------------------------------------------------------------------ retrain
    def _pending_entries(self) -> list[Entry]:
        """Every entry this consumer holds, then waiting ones (up to the fold cap)."""
        return parse_entries(
            self.stream.read_all_pending_then_new(RETRAIN_FOLD_CAP, self.max_batch)
        )

    def retrain(self) -> DrainReport:
        """Retrain from scratch, folding every pending request in."""
        self._check_serving()
        try:
            self._settle()
            report = self._retrain()
        except Exception as exc:  # noqa: BLE001 - sorted out by _on_failure
            self._dirty = True  # whatever the retrain left in memory is not served
            return self._on_failure(exc, self._resend_retrain)
        self._healthy()
        return report

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
        self._forget_held()
        self.metrics.retrain_in_progress.inc()
        try:
            plan, _ = self._plan(self._pending_entries(), fold=True)
            full = self.retrain_due == "extractor" and self._pipeline is not None
            waiting = [] if full else self._drop_beyond_extractor(plan)
            exclude = [r for g in plan.groups for r in g.rows]
            retrained = True
            committed: list[Answer] = []
            t0 = time.perf_counter()
            self._dirty = True
            try:
                if full:
                    committed = self._retrain_pipeline(exclude, plan.groups)
                else:
                    self.model.retrain(exclude=exclude)
            except ValueError as exc:  # core refused the exclusions: answer them
                if faults.is_infrastructure(exc):  # e.g. the source images could not be read
                    raise
                now = self.clock()
                reason = str(exc)
                if full:  # e.g. the source images are gone: stop trying, reject from now on
                    reason = f"{EXTRACTOR_SPENT}: the full-pipeline retrain failed: {exc}"
                    self._pipeline, self._extractor_spent = None, reason
                    retrained = False
                    log.error("full-pipeline retrain failed: %s", exc)
                plan.answers += [rejected_group(g, reason, now) for g in plan.groups]
                plan.answered += [g.entry for g in plan.groups]
                plan.groups, exclude = [], []
                if not full:
                    self.model.retrain(exclude=[])  # the retrain that was due, still fresh noise
            seconds = time.perf_counter() - t0
            if not full:  # a pipeline retrain persisted its new dataset and model already
                committed = applied_answers(
                    plan.groups, schema.METHOD_RETRAIN, self.model.version, self.clock(), self._ids
                )
                self._persist(committed)
            self._dirty = False
            if retrained:
                self.metrics.retrains.labels(reason=self.retrain_due).inc()
                self.metrics.retrain_seconds.observe(seconds)
            self.metrics.removals.labels(method=schema.METHOD_RETRAIN).inc(len(exclude))
            # Requests past the extractor's allowance wait (pending) for the pipeline retrain.
            self.retrain_due = "extractor" if waiting and self._pipeline is not None else None
            self.refresh_metrics()
            now = self.clock()
            for a in committed:
                a.applied_at = now
            self._finish(plan, committed, [g.entry for g in plan.groups])
            report.retrained, report.rows_removed = retrained, len(exclude)
            report.requests = len(plan.answered) + len(plan.groups)
            log.info(
                "retrained: version %d, %d rows excluded, %.2f s",
                self.model.version,
                len(exclude),
                seconds,
            )
        finally:
            self.metrics.retrain_in_progress.dec()
        if self.retrain_due:
            log.info("%d requests wait for the full-pipeline retrain", len(waiting))
            report.retrain_requested = True
            self._request_retrain()
            return report
        self.doorbell.ring()
        return report
