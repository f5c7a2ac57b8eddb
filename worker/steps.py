"""One Newton step over a batch, and the handover to the next epoch at an epoch's end.

A step plans the batch against the served model, removes every group in **one** ``model.remove``
call (``groups`` = request sizes), persists the state with the journal of its answers and
publishes them (:mod:`worker.outbox`). When core says the current epoch is done, the step takes
the epoch fitted in the background (:class:`worker.epochs.NextEpoch`) and adopts it with one
catch-up step that also carries the rest of the batch; when none can take over, it says which
retrain is due and leaves it to the service.

One Newton step per batch: when a batch takes the epoch to its ``max_removals`` while the next
epoch is being fitted for it, the epoch's last step serves the batch's head and the rest is
deferred to the next batch, which the catch-up step carries (two Newton steps in one batch were a
latency spike of about one step at every epoch change). The epoch still ends exactly at its
count, and whether the rest waits depends on counts only (the rows the step removed, a fit
started at a count, :meth:`NextEpoch.maybe_prepare`), never on ``b``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from producer import schema
from worker.batch import Group, Plan
from worker.entries import Entry
from worker.epochs import NextEpoch
from worker.metrics import ServiceMetrics
from worker.outbox import Outbox
from worker.refactor import BackgroundRefactor
from worker.served import ServedModel

log = logging.getLogger("certremove.worker")


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


def _acknowledged(batch: list[Entry], plan: Plan) -> list[Entry]:
    """The entries of ``batch`` that ``plan``'s publication acknowledges (not the deferred)."""
    if not plan.deferred:
        return batch
    deferred = {e.entry_id for e in plan.deferred}
    return [e for e in batch if e.entry_id not in deferred]


class NewtonSteps:
    """Serves batches with Newton steps on the served model.

    Args:
        served, outbox, epochs, metrics: the collaborators (see their modules).
        extractor_spent: returns why a request past the DP extractor's allowance is rejected,
            or None when such requests wait for a full-pipeline retrain.
        clock: wall-clock time of answers.
    """

    def __init__(
        self,
        served: ServedModel,
        outbox: Outbox,
        epochs: NextEpoch,
        metrics: ServiceMetrics,
        extractor_spent: Callable[[], str | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.served, self.outbox, self.epochs, self.metrics = served, outbox, epochs, metrics
        self.extractor_spent = extractor_spent
        self.clock = clock
        #: called once a step's rows are removed, before its persist, and again after it (the
        #: service reads the next batch ahead then, ``worker.stream.Intake.read_ahead``); never
        #: raises
        self.stepped: Callable[[], None] = lambda: None
        #: fresh preconditioners for the steps, factored in the background (worker.refactor)
        self.refactors = BackgroundRefactor(metrics)

    def step(self, batch: list[Entry], report: DrainReport) -> tuple[list[Entry], str | None]:
        """One Newton step over a batch (counted into ``report``); returns the deferred entries
        and the retrain now due (None: none)."""
        due: str | None = None
        served, phases = self.served, self.metrics.phases
        with phases.timed("plan"):
            plan = served.plan(batch, fold=False)
        if plan.groups:
            t0 = time.perf_counter()
            served.dirty = True
            try:
                res = served.model.remove(plan.rows, groups=plan.sizes)
            except ValueError as exc:  # core refused the call (InvalidInputError): answer it
                served.dirty = False  # core checks before it changes anything
                plan.reject_all(str(exc), self.clock())
                with phases.timed("answer"):
                    self.outbox.finish(plan, _acknowledged(batch, plan))
                return plan.deferred, None
            seconds = time.perf_counter() - t0
            phases.observe("step", seconds)
            self.stepped()
            committed = plan.commit(
                plan.groups[: res.applied_groups],
                schema.METHOD_NEWTON,
                served.model.version,
                self.clock(),
                served.ids,
            )
            if res.removed:
                with phases.timed("persist"):
                    # the state record goes with the batch's acknowledgements (status script)
                    served.persist(committed, mark=False)
                self.stepped()  # read on ahead: what arrived during the step and the persist
                self.metrics.on_step(len(res.removed), seconds)
                report.rows_removed += len(res.removed)
                report.steps += 1
                served.refresh_metrics()
                self._removed(len(res.removed))
                self.refactors.after_step(served.model)
            else:
                served.dirty = False
            plan.certify(self.clock())  # certified once persisted
            rest = plan.groups[res.applied_groups :]
            spent = self.extractor_spent()
            if res.needs_retrain and res.retrain_reason == "extractor" and spent is not None:
                # No retrain of the head helps: the request exceeds what the DP extractor's group
                # privacy still covers. Answer it; the requests after it go round again.
                plan.reject(rest[0], spent, self.clock())
                plan.defer(rest[1:])
            elif res.needs_retrain:
                reason = res.retrain_reason or "max_removals"
                served.count_safety()
                if (
                    reason == "max_removals"
                    and res.removed
                    and self.epochs.fitting_for(served.model)
                ):
                    # This batch ran the epoch's last Newton step: the rest rides in the next
                    # batch's catch-up step (see the module docstring).
                    plan.defer(rest)
                else:
                    with phases.timed("epoch"):
                        adopted = (
                            None if reason == "extractor" else self._adopt_next(reason, rest, plan)
                        )
                    # The rest of the batch rode in the catch-up step, as far as it fitted; the
                    # groups left go round again on the new epoch.
                    due = reason if adopted is None else self._adopted(adopted, report)
        with phases.timed("answer"):
            self.outbox.finish(plan, _acknowledged(batch, plan))
        report.requests += plan.served
        return plan.deferred, due

    @staticmethod
    def _adopted(adopted: tuple[int, str], report: DrainReport) -> str | None:
        """Count an adopted epoch's catch-up step into ``report``; returns the retrain now due.
        When the new epoch's safety net fired (a b-dependent outcome) there are no more tries
        on it: a retrain folds the rest. (Past its count, the groups left go round again and
        meet the next background fit as usual.)"""
        report.adopted += 1
        report.rows_removed += adopted[0]
        report.steps += 1
        return adopted[1] if adopted[1] in ("budget", "numerical") else None

    def _removed(self, rows: int) -> None:
        """A step removed ``rows``: the removal rate, and maybe the next epoch's fit."""
        self.epochs.mark_removed(rows)
        self.epochs.maybe_prepare(self.served.model)

    def _adopt_next(self, reason: str, rest: list[Group], plan: Plan) -> tuple[int, str] | None:
        """Take over the epoch fitted in the background (waiting for it if need be): one Newton
        step removes the rows removed since its snapshot and the ``rest`` of the batch (as far
        as they fit; committed into ``plan``, the others deferred), persist, version + 1.
        Returns the rows removed for ``rest`` and the new epoch's retrain reason ('' if none),
        or None when there is no fitted epoch or it cannot take over."""
        served = self.served
        taken = self.epochs.take(served.model)
        if taken is None:
            return None
        prepared, fit_seconds, waited = taken
        t1 = time.perf_counter()
        if prepared is None:  # the safety net fired on the catch-up on the fit's thread
            served.model.count_safety_firing()
            res = None
        else:
            served.dirty = True
            try:
                res = served.model.adopt_retrain(
                    prepared, [r for g in rest for r in g.rows], groups=[len(g.rows) for g in rest]
                )
            except ValueError as exc:  # core refused the rows: the folding retrain answers them
                served.dirty = False  # adopt_retrain restores the model on any error
                log.warning("the background retrain could not take the batch over: %s", exc)
                return None
        if res is None:
            served.dirty = False
            served.count_safety()
            log.warning("the background retrain could not take over; retraining in the foreground")
            return None
        step_seconds = time.perf_counter() - t1
        served.count_safety()
        ridden = plan.commit(
            rest[: res.applied_groups],
            schema.METHOD_NEWTON,
            served.model.version,
            self.clock(),
            served.ids,
        )
        served.persist(ridden, retrain_reason=reason)
        plan.certify(self.clock())  # the riders are certified once persisted, too
        self.refactors.after_step(served.model)  # the catch-up step may ask for a factor
        self.epochs.fitted(fit_seconds)
        self.metrics.on_retrain(reason, fit_seconds)
        self.metrics.on_step(len(res.removed), step_seconds)
        if res.removed:
            self.epochs.mark_removed(len(res.removed))
        served.refresh_metrics()
        log.info(
            "adopted the background retrain: version %d, %d rows caught up and %d removed, "
            "fit %.2f s, waited %.2f s",
            served.model.version,
            served.model.removed_in_epoch - len(res.removed),
            len(res.removed),
            fit_seconds,
            waited,
        )
        self.epochs.maybe_prepare(served.model)
        plan.defer(rest[res.applied_groups :])
        return len(res.removed), res.retrain_reason or ""
