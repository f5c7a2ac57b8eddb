"""The next noise epoch, fitted in the background while Newton steps go on (``retrain_lead``).

Once a noise epoch has used ``1 - retrain_lead`` of its ``max_removals`` (a count, independent of
``b``; earlier when the last fit took longer than that lead, see :meth:`NextEpoch.lead_rows`),
the next epoch is fitted in a background thread from a snapshot of the alive rows, with fresh
noise. When core says the current epoch is done, the service takes the fitted epoch
(:meth:`NextEpoch.take`, waiting for the fit if it still runs) and adopts it with one catch-up
Newton step (``core.Model.adopt_retrain``). An "auto" trigger is estimated ahead by shadow runs
in a second thread, so a fit never waits for them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from worker.metrics import ServiceMetrics

if TYPE_CHECKING:
    from core.model import Model, PreparedRetrain, RetrainSnapshot

log = logging.getLogger("certremove.worker")

RATE_WINDOW_S = 3.0
#: nice value of the background threads on the CPU (steady p99 over 4 interleaved pairs of runs:
#: 191-257 ms at 10, 226-315 ms at 0)
BACKGROUND_NICE = 10
#: nice value of the shadow-run estimates ahead: below the fits (a fit that runs beside an estimate
#: gets about three times its share of a contended core; a fit never waits for an estimate, so an
#: estimate may well be slow)
ESTIMATE_NICE = 15
#: fraction of the time the shadow-run estimates ahead run on the CPU (they sleep after each
#: shadow step for as long as it took, times (1 - duty) / duty): nice does not ration memory
#: bandwidth, which the steps that serve requests share with them
#: (steady p99 over three interleaved pairs of runs on the AMD 2-vCPU VM: 89 / 88 / 126 ms at
#: 0.5 against 96 / 101 / 121 ms without pauses, the step 18-19 against 21 ms; the estimate
#: takes twice as long, and a fit never waits for it)
ESTIMATE_DUTY = 0.5
#: start estimating an "auto" trigger ahead once the rows fall below this many times the point
#: where a fit would re-estimate it (core.trigger.AUTO_REESTIMATE_BELOW of the last estimate's)
ESTIMATE_AHEAD = 1.5
#: the lead covers the slowest of the last this many fits (a fit beside a shadow-run estimate or
#: other load took 0.4-1.3 s where one alone takes 0.13 s: the last one alone under-led, and the
#: drain waited for the next at the count)
FIT_HISTORY = 3
#: seconds between heartbeats while a drain waits for the background fit (worker.tasks beats
#: every 2 s from the event loop, which the wait holds)
WAIT_BEAT_S = 2.0

#: the shadow-run estimate of an "auto" trigger, ``(rows, value)`` (None unless "auto")
Basis = tuple[int, int] | None


class BackgroundRunner:
    """One daemon thread running jobs in submission order (an estimate before the fit that uses
    it). A daemon: the process never waits for a fit at exit (its result is never persisted)."""

    def __init__(self, name: str = "certremove-retrain") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any]]]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def _run(self) -> None:
        while True:
            future, job = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for it
                future.set_exception(exc)


class NextEpoch:
    """Prepares the next noise epoch of the served model and hands it over.

    Args:
        retrain_lead: fraction of an epoch's ``max_removals`` left when the next epoch starts
            fitting (0 turns background retrains off).
        metrics: observes the fits and the waits for them.
    """

    def __init__(self, retrain_lead: float, metrics: ServiceMetrics) -> None:
        if not 0 <= retrain_lead < 1:
            raise ValueError(f"retrain_lead must lie in [0, 1), got {retrain_lead}")
        self.retrain_lead = retrain_lead
        self.metrics = metrics
        self._pool: BackgroundRunner | None = None
        self._estimator: BackgroundRunner | None = None
        #: the next noise epoch, fitting in the background: (future, model it was started for)
        self._next: tuple[Future[tuple[PreparedRetrain | None, float]], Model] | None = None
        #: seconds of the last FIT_HISTORY background fits that were adopted
        self._fit_times: deque[float] = deque(maxlen=FIT_HISTORY)
        #: an "auto" max_removals estimated ahead of the next fit, in the background
        self._estimate: Future[Basis] | None = None
        self._marks: deque[tuple[float, int]] = deque()  # (time, rows removed so far)

    def close(self) -> None:
        """Drop the background work (a fit in progress runs out in its daemon thread, unused)."""
        for job in (self._next[0] if self._next else None, self._estimate):
            if job is not None:
                job.cancel()
        self._next = self._estimate = None

    def fitting_for(self, model: Model) -> bool:
        """Whether the next epoch of ``model`` is being fitted (or fitted, not yet taken)."""
        return self._next is not None and self._next[1] is model

    def mark_removed(self, rows: int) -> None:
        """A step removed ``rows`` rows now (the recent removal rate)."""
        now = time.monotonic()
        total = (self._marks[-1][1] if self._marks else 0) + rows
        self._marks.append((now, total))
        while len(self._marks) > 2 and now - self._marks[0][0] > RATE_WINDOW_S:
            self._marks.popleft()

    def removal_rate(self) -> float:
        """Rows removed per second over the last few seconds of steps."""
        marks = self._marks
        if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
            return 0.0
        return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])

    @property
    def fit_seconds(self) -> float | None:
        """Seconds of the last background fit that was adopted (None: none yet)."""
        return self._fit_times[-1] if self._fit_times else None

    def fitted(self, seconds: float) -> None:
        """A background fit of ``seconds`` was adopted (the leads of the next fits)."""
        self._fit_times.append(seconds)

    def lead_rows(self, limit: int) -> int:
        """Rows before the count at which the next epoch starts fitting: ``retrain_lead`` of the
        epoch, or more when a recent fit (the slowest of the last :data:`FIT_HISTORY`) took
        longer than that many rows arrive in (twice the rows removed meanwhile at the recent
        rate; shadow runs never delay a fit, see :meth:`maybe_prepare`), at most half the epoch.
        Past fit times and the load decide this, never the noise of the epoch being fitted
        (drawn after the snapshot), and the epoch in use still ends at its count."""
        lead = math.ceil(self.retrain_lead * limit)
        if self._fit_times:
            slowest = max(self._fit_times)
            lead = max(lead, math.ceil(2 * self.removal_rate() * slowest))
        return min(lead, limit // 2)

    def maybe_prepare(self, model: Model) -> None:
        """Start fitting the next noise epoch of ``model`` in the background once this one has
        used ``1 - retrain_lead`` of its ``max_removals`` (a row count: independent of ``b``)."""
        limit = model.max_removals
        if self.retrain_lead <= 0 or self._next is not None or not limit:
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
                niced,
                str(model.device),
                _estimate_ahead,
                model,
                model.retrain_snapshot(),
                nice=ESTIMATE_NICE,
            )
        if model.removed_in_epoch < limit - self.lead_rows(limit):
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

    def _prepare(
        self,
        model: Model,
        snapshot: RetrainSnapshot,
        estimate: Future[Basis] | None,
        reestimate: bool,
    ) -> tuple[PreparedRetrain | None, float]:
        """Runs in the background thread: the fit (with the trigger estimated ahead, if any) and
        the catch-up of the rows removed while it ran (``Model.catch_up``; None when its safety
        net fired)."""
        with self.metrics.fitting():
            t0 = time.perf_counter()
            basis = None
            if estimate is not None:
                try:
                    basis = estimate.result()
                except Exception:  # noqa: BLE001 - the fit estimates it itself then
                    log.exception("estimating max_removals ahead failed")
            try:
                prepared = niced(
                    str(model.device),
                    model.prepare_retrain,
                    snapshot,
                    auto_basis=basis,
                    reestimate=reestimate,
                )
            except BaseException:
                self.metrics.on_retrain_failure()
                raise
            # the rows removed during the fit, removed from it here: the drain loop's adoption
            # step then removes only those removed after this (None: the safety net fired)
            caught: PreparedRetrain | None = prepared
            try:
                caught = niced(str(model.device), model.catch_up, prepared)
            except Exception:  # noqa: BLE001 - the adoption does the whole catch-up then
                log.exception("the catch-up on the fit's thread failed; the adoption does it")
            return caught, time.perf_counter() - t0

    def take(self, model: Model) -> tuple[PreparedRetrain | None, float, float] | None:
        """The epoch fitted for ``model``, waiting for the fit if it still runs: ``(prepared,
        fit seconds, seconds waited)``, ``prepared`` None when the safety net fired on its
        catch-up; None when none was started for it or the fit failed."""
        if self._next is None:
            return None
        future, fitted_for = self._next
        self._next = None
        if fitted_for is not model:
            return None
        t0 = time.perf_counter()
        try:
            # the wait holds the event loop (minutes when the fit started late): it is serving,
            # so the heartbeat goes on meanwhile (certremove health), as for a blocking retrain
            with self.metrics.beating(WAIT_BEAT_S):
                prepared, fit_seconds = future.result()
        except Exception:  # noqa: BLE001 - the synchronous retrain takes over
            log.exception("the background retrain failed; retraining in the foreground")
            return None
        waited = time.perf_counter() - t0
        self.metrics.on_epoch_wait(waited)
        return prepared, fit_seconds, waited


def _estimate_ahead(model: Model, snapshot: RetrainSnapshot) -> Basis:
    t0 = time.perf_counter()
    pause = _paced(ESTIMATE_DUTY) if str(model.device) == "cpu" else None
    basis = model.estimate_max_removals(snapshot, pause=pause)
    log.info(
        "estimated max_removals ahead: %s (rows, value) in %.2f s",
        basis,
        time.perf_counter() - t0,
    )
    return basis


def _paced(duty: float) -> Callable[[float], None]:
    """A pause that sleeps after each shadow step so that the estimate runs ``duty`` of the
    time: its passes over X then share the memory bandwidth with fewer of the drain's steps."""

    def pause(seconds: float) -> None:
        time.sleep(seconds * (1.0 - duty) / duty)

    return pause


def niced(
    device: str,
    job: Callable[..., Any],
    *args: Any,
    nice: int = BACKGROUND_NICE,
    **kwargs: Any,
) -> Any:
    """Runs ``job`` in the background thread at a lower CPU priority (``nice``) on the CPU, so
    the Newton steps of the current epoch keep theirs."""
    if device == "cpu":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError):  # not Linux, or not allowed: same priority
            pass
    return job(*args, **kwargs)
