"""The announcement of a release (``worker/releases.py``): its entry on the stream
``certremove:{model}:releases``, the ``released_version``/``released_at`` fields of the status
hashes that still exist, the receipts (``worker/receipts.py``), then an ``announced`` line in the
release record.

**In parts.** A release made while requests flow (an epoch change under load) covers every
request since the previous one, tens of thousands at a time: their statuses (a Redis script that
holds the server) and receipts (a signature each) took 50-160 ms at once, a latency spike of the
drain that made it. While batches are served (the last one within :data:`BUSY_S`),
:class:`AnnounceQueue` therefore announces one part per call, :data:`ANNOUNCE_RATE` times the
requests applied since the last call (at least :data:`ANNOUNCE_PART`), which keeps up with any
load; idle (a drain that emptied the stream, or no batch for :data:`BUSY_S`), everything left.
The stream entry goes out with a release's first part, the
``announced`` line after its last. Every part is idempotent, so a failed or interrupted one is
simply done again (after a restart, from the release's first request).

**On a thread of its own**: a part is a Redis script
over up to a thousand status keys and a receipt per request, 3-10 ms of the drain loop in four
batches of ten under a steady load. After a batch (``hand_over``) the part is handed to the
thread ``certremove-announce`` and the drain goes on; while it runs, later hand-overs announce
nothing (the requests applied meanwhile size the next part), and a failure is raised by the next
call (logged and counted there, the part done again). Every other call (the start, the periodic
check, the drain's end, a whole announcement) waits for the part in flight and runs on the
caller's thread. A new release waits for the part before it changes the queue (:meth:`wait`).
Statuses come before their release's fields: a release is made only once the statuses it covers
are published (``worker.release_gate``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import redis

from producer import schema
from worker.lease import FENCED_LUA, holds_lua
from worker.receipts import ReceiptSigner, ReceiptStore
from worker.release_records import Covered, ReleaseRecords

log = logging.getLogger("certremove.worker")

#: entries kept on the releases stream (approximately)
STREAM_MAXLEN = 10_000
#: stream entries looked at for a release's entry before announcing it (after a restart)
ANNOUNCE_LOOKBACK = 100
#: status keys per script call
STATUS_CHUNK = 1000
#: requests (statuses, receipts) announced per call while batches are served: ANNOUNCE_RATE times
#: those applied since the last call, at least ANNOUNCE_PART (a status costs about 5 us of Redis
#: time, a receipt a signature)
ANNOUNCE_PART = 500
ANNOUNCE_RATE = 2
#: seconds since the last batch within which the service counts as busy (announces in parts)
BUSY_S = 2.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Set released_version/released_at on the status hashes that still exist and have none yet.
# KEYS[1] lease, KEYS[2] lease token counter, then the status keys; ARGV[1] token ('' unfenced),
# ARGV[2] the lease's life in ms, ARGV[3] release, ARGV[4] released_at.
_RELEASED_LUA = (
    holds_lua(1, 2, 1, 2)
    + f"if ARGV[1] ~= '' and not holds() then {FENCED_LUA} end\n"
    + """
local n = 0
for k = 3, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 and redis.call('HEXISTS', KEYS[k], 'released_version') == 0 then
    redis.call('HSET', KEYS[k], 'released_version', ARGV[3], 'released_at', ARGV[4])
    n = n + 1
  end
end
return n
"""
)


class Announcer:
    """Announces releases: the stream entry (once), the statuses, the receipts, the record.

    Args:
        model_name: the model.
        client: redis-py client (stream, statuses).
        records: the release record (gets the ``announced`` lines).
        signer, receipts: sign and keep the receipts (None: no receipts).
        fence, lease_ttl_ms: the lease token the status script must find (None: unfenced).
    """

    def __init__(
        self,
        *,
        model_name: str,
        client: redis.Redis,
        records: ReleaseRecords,
        signer: ReceiptSigner | None,
        receipts: ReceiptStore | None,
        fence: Callable[[], Any] | None,
        lease_ttl_ms: int,
    ) -> None:
        self.model_name, self.redis, self.records = model_name, client, records
        self.signer, self.receipts = signer, receipts
        self.fence, self.lease_ttl_ms = fence, int(lease_ttl_ms)
        self._script = client.register_script(_RELEASED_LUA)
        self._streamed: set[int] = set()

    def announce(
        self,
        rec: dict[str, Any],
        covered: list[Covered],
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> bool:
        """Announce release ``rec``: its stream entry (once), then the statuses and receipts of
        ``covered[start:stop]`` (all from ``start`` when ``stop`` is None); the ``announced``
        record line once the last of ``covered`` is done. Returns whether the release is now
        fully announced. Every part is idempotent (the stream entry is looked for, a status
        keeps its first ``released_version``, a receipt is issued once), so a part that fails
        is simply done again."""
        number = int(rec["release"])
        if number not in self._streamed and self._on_stream(number, str(rec["content_sha256"])):
            self._streamed.add(number)  # a restart (or a lost reply) after its entry went out
        if number not in self._streamed:
            self.redis.xadd(
                schema.releases_key(self.model_name),
                {
                    "release": str(number),
                    "model_version": str(rec["model_version"]),
                    "noise_epoch": str(rec["noise_epoch"]),
                    "path": str(rec["path"]),
                    "content_sha256": str(rec["content_sha256"]),
                    "created_at": repr(float(rec["created_at"])),
                },
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            self._streamed.add(number)
        end = len(covered) if stop is None else min(stop, len(covered))
        part = covered[start:end]
        token = self.fence() if self.fence is not None else None
        fixed = [
            schema.lease_key(self.model_name),
            schema.lease_counter_key(self.model_name),
        ]
        for i in range(0, len(part), STATUS_CHUNK):
            keys = [
                schema.status_key(self.model_name, c.request_id) for c in part[i : i + STATUS_CHUNK]
            ]
            self._script(
                keys=fixed + keys,
                args=[
                    "" if token is None else str(token),
                    str(self.lease_ttl_ms),
                    str(number),
                    repr(float(rec["created_at"])),
                ],
            )
        self._issue_receipts(rec, part)
        if end < len(covered):
            return False
        self.records.append({"announced": number})
        return True

    def _on_stream(self, number: int, content_sha256: str) -> bool:
        """Whether the releases stream has the entry of release ``number`` (these weights)
        already, among its last entries (releases are announced in order)."""
        key = schema.releases_key(self.model_name)
        entries: Any = self.redis.xrevrange(key, count=ANNOUNCE_LOOKBACK)
        for _eid, fields in entries or []:
            got = {_text(k): _text(v) for k, v in (fields or {}).items()}
            if got.get("release") == str(number) and got.get("content_sha256") == content_sha256:
                return True
        return False

    def _issue_receipts(self, rec: dict[str, Any], covered: list[Covered]) -> None:
        if self.signer is None or self.receipts is None:
            return
        todo = [c for c in covered if c.request_id not in self.receipts.issued]
        unknown = [c for c in todo if c.removed_ids is None]
        if unknown:
            log.warning(
                "no receipt for %d requests of release %s: their ledger lines predate the "
                "per-request split of removed ids",
                len(unknown),
                rec["release"],
            )
        todo = [c for c in todo if c.removed_ids is not None]
        missing_at = [c for c in todo if c.requested_at is None]
        if missing_at:  # read back from the status hashes that still exist (after a restart)
            pipe = self.redis.pipeline(transaction=False)
            for c in missing_at:
                pipe.hget(schema.status_key(self.model_name, c.request_id), "requested_at")
            for c, raw in zip(missing_at, pipe.execute(), strict=True):
                try:
                    c.requested_at = float(raw) if raw else None
                except ValueError:
                    c.requested_at = None
        receipts = [
            self.signer.receipt(
                model=self.model_name,
                request_id=c.request_id,
                removed_ids=c.removed_ids or [],
                release=int(rec["release"]),
                model_version=c.model_version,
                epsilon=float(rec["epsilon"]),
                delta=float(rec["delta"]),
                method=c.method,
                requested_at=c.requested_at,
                applied_at=c.applied_at,
                released_at=float(rec["created_at"]),
            )
            for c in todo
        ]
        self.receipts.append(receipts)


class AnnounceQueue:
    """The releases made whose announcement is not done, announced in order, whole or in parts.

    Args:
        announcer: announces one release (or a part of it).
    """

    def __init__(self, announcer: Announcer) -> None:
        self.announcer = announcer
        #: (release record, the requests it covers), oldest first
        self.pending: list[tuple[dict[str, Any], list[Covered]]] = []
        #: requests of the first pending release announced so far
        self.offset = 0
        #: requests applied since the last call of :meth:`run` (they size the next part)
        self.applied = 0
        self._last_batch: float | None = None
        #: the announcing thread, started by the first part handed over
        self._runner: ThreadPoolExecutor | None = None
        #: the part on the announcing thread (its outcome is taken by the next run)
        self._job: Future[None] | None = None

    def batch_served(self) -> None:
        """A batch was served now (the service is busy for :data:`BUSY_S`)."""
        self._last_batch = time.monotonic()

    def busy(self) -> bool:
        """Whether a batch was served within the last :data:`BUSY_S` seconds."""
        last = self._last_batch
        return last is not None and time.monotonic() - last < BUSY_S

    def running(self) -> bool:
        """Whether a part is being announced on the announcing thread now."""
        return self._job is not None and not self._job.done()

    def wait(self) -> None:
        """Wait for the part on the announcing thread, if any (before the queue is changed);
        its failure stays for the next :meth:`run` to raise."""
        if self._job is not None:
            wait_futures([self._job])

    def run(
        self, *, whole: bool = False, budget: int | None = None, hand_over: bool = False
    ) -> None:
        """Announce the pending releases in order: all of them (``whole``), else at most
        ``budget`` requests' worth (default: the part of the module docstring). Raises what a
        part raised (it is done again next time), or what the part handed over last raised.
        ``hand_over`` (the drain loop after a batch): the part is handed to the announcing thread and this returns at once, and nothing is handed over while a
        part runs there. Otherwise the part in flight is waited for, and this runs here."""
        job = self._job
        if job is not None:
            if hand_over and not whole and not job.done():
                return  # the requests applied meanwhile size the next part
            self._job = None
            job.result()  # (waits) the part's failure, raised once
        if budget is None:
            budget = max(ANNOUNCE_PART, ANNOUNCE_RATE * self.applied)
        self.applied = 0
        if not hand_over or whole or not self.pending:
            self._announce(None if whole else budget)
            return
        if self._runner is None:
            self._runner = ThreadPoolExecutor(1, thread_name_prefix="certremove-announce")
        self._job = self._runner.submit(self._announce, budget)

    def _announce(self, budget: int | None) -> None:
        """Announce the pending releases in order, at most ``budget`` requests (None: all)."""
        while self.pending and (budget is None or budget > 0):
            rec, covered = self.pending[0]
            stop = None if budget is None else self.offset + budget
            if not self.announcer.announce(rec, covered, start=self.offset, stop=stop):
                assert stop is not None  # a whole announcement is done or raised
                self.offset = stop
                return
            if budget is not None:
                budget -= len(covered) - self.offset
            self.pending.pop(0)
            self.offset = 0
