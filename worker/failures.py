"""Failure handling of the removal service (``worker.service.RemovalService`` inherits it).

A drain or retrain that fails: stop for good when the lease is lost; reload the persisted model
when the one in memory ran ahead of the disk (stop for good, calling ``on_fatal``, when that
reload fails too); after a disk, Redis or memory failure wait (0.5 s doubling up to
``max_backoff``), queue the retry and reject nothing; re-raise anything else. Before serving
again, answers a failure left persisted but not in the ledger file go there first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker import faults
from worker.errors import ServiceStoppedError
from worker.steps import DrainReport

if TYPE_CHECKING:
    from core.model import Model
    from worker.ledger import Ledger
    from worker.metrics import ServiceMetrics
    from worker.outbox import Outbox
    from worker.served import ServedModel
    from worker.stream import Intake

log = logging.getLogger("certremove.worker")

#: first wait after an infrastructure failure; doubled per failure up to ``max_backoff``
FIRST_BACKOFF_S = 0.5


class FailureHandling:
    """The failure paths of :class:`worker.service.RemovalService` (its state, declared here)."""

    served: ServedModel
    outbox: Outbox
    intake: Intake
    ledger: Ledger
    metrics: ServiceMetrics
    max_backoff: float
    retrain_due: str | None
    _retrain_sent_at: float | None
    _journal_due: bool
    _stopped: str | None
    _backoff: float
    _reload: Callable[[], Model] | None
    _on_fatal: Callable[[BaseException], None]
    _sleep: Callable[[float], None]

    def _adopt(self, model: Model) -> None:
        raise NotImplementedError

    def _replay_journal(self) -> None:
        raise NotImplementedError

    def _recover_from(self, exc: Exception) -> None:
        """After a step failed: reload the model if it ran ahead of the disk, then settle (the
        statuses of earlier batches published first; a failure among them stays for the
        drain, ``worker.publisher``)."""
        self.outbox.publisher.wait()
        self._reload_if_dirty(exc)
        self._settle()

    def _reload_if_dirty(self, exc: Exception) -> None:
        """Reload the persisted model when the one in memory ran ahead of it; re-raise ``exc``
        when that reload failed (the service has stopped)."""
        if self.served.dirty:
            self._resync()
            if self._stopped is not None:
                raise exc

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
        self.served.dirty, self.outbox.unrecorded, self._journal_due = False, [], True

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
        self.outbox.settle()

    def _on_failure(self, exc: Exception, retry: Callable[[], None]) -> DrainReport:
        """A drain or retrain failed: stop for good when the lease is lost; reload the model
        when it ran ahead of the disk; wait (backoff) and ``retry`` after a disk, Redis or
        memory failure, rejecting nothing; re-raise anything else. The entries of status
        publications still queued or failed (``worker.publisher``) stay pending, like those
        held: the pending list brings them back; a publication refused for a lost lease stops
        the service, whatever failed here meanwhile (as when it failed the step itself)."""
        self.outbox.publisher.wait()
        failed = self.outbox.publisher.failure()
        if failed is not None and isinstance(failed[0], Exception) and faults.is_fenced(failed[0]):
            exc = failed[0]
        self.intake.forget()
        if faults.is_fenced(exc):
            self._stopped = f"this worker lost the lease of model {self.ledger.model!r}: {exc}"
            log.critical("%s: the service stops", self._stopped)
            self._on_fatal(exc)
            raise exc
        self._reload_if_dirty(exc)
        if not faults.is_infrastructure(exc):
            raise exc
        kind = faults.kind(exc)
        self._backoff = min(self.max_backoff, max(FIRST_BACKOFF_S, 2 * self._backoff))
        self.metrics.on_infrastructure_error(kind, self._backoff)
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
            self.metrics.on_healthy()
