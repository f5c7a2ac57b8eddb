"""Answers on their way out, in order: the journal persisted with the model state, the ledger
file, then the status hashes, dead-letter copies and ``XACK`` in one script; and the failure
counts of entries that failed on their own (docs/design.md "Request life cycle").

A crash between the persist and the ledger append is repaired at the next start
(:meth:`Outbox.replay_journal`), so a replayed request is answered with its method and version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from producer import schema
from worker import faults
from worker.batch import Plan
from worker.entries import Entry
from worker.errors import StateDamagedError
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.publisher import Publisher
from worker.status import Answer, answers_from_record
from worker.status_script import DeadLetter

log = logging.getLogger("certremove.worker")

#: the journal form this version writes (``"format"`` in the journal): 2, grouped ``records``.
#: A journal without the key was written before it (``answers``, an object per answer, or
#: ``records``) and is read; a later format is refused: a newer version wrote it, and reading
#: it partly would lose the answers it holds
JOURNAL_FORMAT = 2


class Outbox:
    """The answers of one model's service.

    Args:
        ledger: the ledger (file and status script).
        client: redis-py client (the failure counts).
        metrics: observes the answers.
    """

    def __init__(self, ledger: Ledger, client: redis.Redis, metrics: ServiceMetrics) -> None:
        self.ledger, self.redis, self.metrics = ledger, client, metrics
        #: answers of persisted steps not yet in the ledger file (journaled with each persist)
        self.unrecorded: list[Answer] = []
        #: entry ids with a processing failure counted in Redis (cleared when acknowledged)
        self._failed = {_b(k) for k in client.hkeys(ledger.failures_key)}
        #: where :meth:`finish` queues a batch's publication while :attr:`deferring` (the
        #: drain's common path, ``worker.publisher``); otherwise it publishes at once
        self.publisher = Publisher()
        self.deferring = False
        #: entries whose queued publication failed for a reason that is not Redis's: a batch
        #: holding one publishes at once, so that a fault it causes is isolated (by halves)
        self.suspect: set[bytes] = set()

    # ------------------------------------------------------------ journal
    def journal(self, answers: list[Answer]) -> list[Answer]:
        """Every answer a persist now journals: those not yet recorded, then ``answers``."""
        return self.unrecorded + answers

    def replay_journal(self, journal: dict[str, Any] | None) -> None:
        """Record in the ledger the journaled answers of the persisted snapshot that the ledger
        file lacks (the process stopped between the persist and the ledger append). A journal
        holds ``records`` (grouped like ledger lines, :func:`worker.status.answer_records`) or,
        written by earlier versions, ``answers`` (an object per answer); both are read."""
        journal = journal or {}
        fmt = journal.get("format", 1)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= JOURNAL_FORMAT:
            raise StateDamagedError(
                f"the live snapshot's journal has format {fmt!r}; this version reads formats 1 "
                f"to {JOURNAL_FORMAT}: a newer certremove wrote it. Run that version again (do "
                "not run `certremove state recover`, which would drop the answers it holds)"
            )
        answers = [Answer.from_json(r) for r in journal.get("answers", [])]
        for rec in journal.get("records", []):
            answers += answers_from_record(rec)
        missing = []
        for a in answers:
            prior = self.ledger.seen(a.request_id)
            if prior is None or (prior.dead_letter and a.status == schema.STATUS_APPLIED):
                missing.append(a)
        if missing:
            self.ledger.record(missing)
            log.info("recorded %d journaled answers the ledger lacked", len(missing))
        self.unrecorded = []

    def settle(self) -> None:
        """Answers persisted but not yet in the ledger file go to the ledger now."""
        if self.unrecorded:
            self.ledger.record(self.unrecorded)
            self.unrecorded = []

    # ------------------------------------------------------------ answers
    def finish(self, plan: Plan, entries: list[Entry] | None = None) -> None:
        """Ledger, statuses + XACK, dead letters and request metrics of a planned batch. The
        ledger first, here; then the rest, here too, or, while :attr:`deferring`, queued on
        :attr:`publisher` (``entries``: the batch's entries it acknowledges, served again if
        that publication fails)."""
        answers = plan.answers + plan.committed
        recorded = {id(a) for a in self.unrecorded}
        self.ledger.record(self.unrecorded + [a for a in answers if id(a) not in recorded])
        self.unrecorded = []
        if self.deferring and entries is not None and not self.holds_suspect(entries):
            self.publisher.submit(lambda: self._publish_timed(plan, answers), entries)
        else:
            self._publish(plan, answers)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block (the drain loop) :meth:`finish` queues publications on
        :attr:`publisher`; outside it publishes at once."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def holds_suspect(self, entries: list[Entry]) -> bool:
        """Whether one of ``entries`` is :attr:`suspect`."""
        suspect = self.suspect
        return bool(suspect) and any(e.entry_id in suspect for e in entries)

    def take_failed(self, carry: list[Entry], *, wait: bool = False) -> list[Entry]:
        """Look at the publications queued on :attr:`publisher` (``wait``: wait for all of them
        first); ``carry`` when none failed. When one failed: a Redis fault (or a lost lease) is
        raised, for the drain's failure handling (its entries stay pending, the pending list
        brings them back); anything else puts its entries, and those of the publications skipped
        after it, in front of ``carry``, to be served again with their statuses published at
        once (:attr:`suspect` until acknowledged), so that a fault an entry causes on its own
        is found by halves as usual."""
        if wait:
            self.publisher.wait()
        failed = self.publisher.failure()
        if failed is None:
            return carry
        exc, entries = failed
        if faults.is_infrastructure(exc) or faults.is_fenced(exc):
            raise exc
        self.suspect.update(e.entry_id for e in entries)
        return entries + carry

    def _publish_timed(self, plan: Plan, answers: list[Answer]) -> None:
        """:meth:`_publish` on the publishing thread, timed as the ``publish`` phase."""
        with self.metrics.phases.timed("publish"):
            self._publish(plan, answers)

    def _publish(self, plan: Plan, answers: list[Answer]) -> None:
        """Statuses + XACK, dead letters, failure counts, request metrics and log lines."""
        dead: list[DeadLetter] = [(e.entry_id, e.fields, e.error or "malformed") for e in plan.dead]
        ack_ids = plan.acknowledged
        self.ledger.publish(answers, ack_ids, dead)
        self.clear_failures(ack_ids + [eid for eid, _, _ in dead])
        self.metrics.on_answers(answers, repeats=plan.repeats, dead=len(plan.dead))
        log_rejections(answers)
        for entry_id, _fields, reason in dead:
            log_dead_letter(_s(entry_id), None, reason)

    def dead_letter(self, entries: list[Entry], reason: str, now: float) -> None:
        """Copy ``entries`` to the dead-letter stream with ``reason``, answer them rejected
        (an answer the ledger holds already is repeated instead) and acknowledge them. When
        the status cannot be written (the entry's own status key is the fault), the copy and
        the acknowledgement go alone: the dead-letter stream holds the reason.

        The ledger records the rejection only after the copy: were it first, a Redis failure
        before the copy would make the retry answer the entry as a repeat of its rejection,
        with no dead letter to replay. (Nothing was removed, so a rejection the ledger lacks
        after a crash costs nothing: the entry is simply served again.)"""
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
        try:
            self.ledger.publish(answers, [], dead)
        except Exception as exc:
            if faults.is_infrastructure(exc) or faults.is_fenced(exc):
                raise
            log.warning("the dead letters' statuses cannot be written (%s): copying alone", exc)
            self.ledger.publish([], [], dead)
        self.ledger.record(answers)
        self.clear_failures([e.entry_id for e in entries])
        self.metrics.on_answers([], dead=len(entries))
        for e in entries:
            log_dead_letter(_s(e.entry_id), e.request_id, reason)

    # ------------------------------------------------------------ failure counts
    def entry_failed(self, entry: Entry, exc: BaseException, max_failures: int, now: float) -> bool:
        """Count a failure ``entry`` caused on its own; dead-letter it at ``max_failures``
        (True) or leave it pending (False)."""
        count = int(self.redis.hincrby(self.ledger.failures_key, entry.entry_id, 1))
        self._failed.add(entry.entry_id)
        self.metrics.on_entry_failure()
        error = f"{type(exc).__name__}: {exc}"[:300]
        log.warning(
            "entry %s (request %s) failed on its own, %d of %d: %s",
            _s(entry.entry_id),
            entry.request_id,
            count,
            max_failures,
            error,
        )
        if count < max_failures:
            return False
        reason = f"dead-lettered: processing it failed {count} times ({error})"
        self.dead_letter([entry], reason, now)
        return True

    def clear_failures(self, entry_ids: list[bytes]) -> None:
        """Forget the failure counts of entries that are acknowledged now."""
        if self.suspect:
            self.suspect.difference_update(entry_ids)
        if not self._failed:
            return
        done = self._failed.intersection(entry_ids)
        if done:
            self.redis.hdel(self.ledger.failures_key, *done)
            self._failed -= done


def log_rejections(answers: list[Answer]) -> None:
    """One line per request answered ``rejected`` now (repeats of earlier answers are not):
    its request id and reason, never its sample ids."""
    for a in answers:
        if a.status == schema.STATUS_REJECTED and not a.only_if_queued and not a.dead_letter:
            reason = " ".join(a.reason.split())[:300]
            log.info(
                "rejected request %s: %s",
                a.request_id,
                reason,
                extra={"request_id": a.request_id, "reason": reason},
            )


def log_dead_letter(entry_id: str, request_id: str | None, reason: str) -> None:
    """One warning line per dead-lettered entry: entry id, request id and reason, never its
    sample ids."""
    reason = " ".join(reason.split())[:300]
    log.warning(
        "dead-lettered entry %s (request %s): %s",
        entry_id,
        request_id or "none",
        reason,
        extra={"request_id": request_id, "reason": reason, "entry_id": entry_id},
    )


def _s(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
