"""Status publication off the drain's critical path (docs/design.md "Request life cycle").

The last part of a batch's answer, the status script (status hashes, dead-letter copies and
``XACK`` in one Redis call, :meth:`worker.status_script.StatusPublisher.publish`) and what follows it (the
failure counts cleared, the request metrics, the log lines), runs on one thread of its own, in
batch order, while the drain goes on with the next batch: most of it is waiting for Redis, which
runs on the other core, and the drain's next read, plan and Newton step overlap it.

Nothing about durability moves: a batch's answers are in the persisted journal and in the ledger
file before its publication is queued, exactly as before a synchronous publication. A request is
acknowledged only by its batch's script, so a publication that fails or never runs (a crash)
leaves its entries pending: Redis delivers them again and the ledger answers them as repeats.

After a publication fails, the later ones queued behind it are not run (their entries stay
pending too); :meth:`Publisher.failure` hands the failure and every entry not published to the
service, which treats a Redis fault like any other (back off, read the pending list again) and
anything else by serving those entries again synchronously, where a fault an entry causes on its
own is isolated as usual (``worker.service``).
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from worker.entries import Entry

log = logging.getLogger("certremove.worker")


class _Skipped(Exception):
    """A publication not run because an earlier one failed."""


class Publisher:
    """Runs publications in order on one thread (started on first use).

    ``submit(publish, entries)`` queues ``publish()``; ``entries`` are the stream entries it
    acknowledges (served again when it fails). :meth:`wait` waits for everything queued;
    :meth:`failure` returns the first failure and the entries of every publication that did not
    complete, once all of them have ended.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: deque[tuple[Future[None], list[Entry]]] = deque()
        #: set on the publishing thread when a publication fails; later ones are skipped
        self._broken = False

    def submit(self, publish: Callable[[], None], entries: list[Entry]) -> None:
        """Queue ``publish`` after those queued before it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="certremove-publish")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        self._jobs.append((self._pool.submit(self._run, publish), entries))
        self._prune()

    def _run(self, publish: Callable[[], None]) -> None:
        if self._broken:
            raise _Skipped
        try:
            publish()
        except BaseException:
            self._broken = True
            raise

    def _prune(self) -> None:
        """Forget publications that completed, from the front (a failed one stays)."""
        jobs = self._jobs
        while jobs and jobs[0][0].done() and jobs[0][0].exception() is None:
            jobs.popleft()

    @property
    def busy(self) -> bool:
        """Whether a publication is queued or running (or a failure not yet taken)."""
        self._prune()
        return bool(self._jobs)

    def wait(self) -> None:
        """Wait until every publication queued has ended (a failure stays for :meth:`failure`)."""
        if self._jobs:
            wait([f for f, _ in self._jobs])
        self._prune()

    def failure(self) -> tuple[BaseException, list[Entry]] | None:
        """None while no publication failed; else, once every queued publication has ended, the
        first failure and the entries of every publication that did not complete (in order),
        forgotten here (the publisher is usable again)."""
        self._prune()
        if not self._jobs or not self._jobs[0][0].done():
            return None
        self.wait()
        first: BaseException | None = None
        entries: list[Entry] = []
        for fut, job_entries in self._jobs:
            exc = fut.exception()
            if exc is None:
                continue
            if first is None and not isinstance(exc, _Skipped):
                first = exc
            entries += job_entries
        self._jobs.clear()
        self._broken = False
        if first is None:  # (cannot happen: a skip follows a failure)
            first = RuntimeError("a status publication was skipped")
        log.warning(
            "publishing the statuses of %d entries failed (%s: %s): none of them is acknowledged",
            len(entries),
            type(first).__name__,
            " ".join(str(first).split())[:300],
        )
        return first, entries
