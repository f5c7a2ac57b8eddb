"""The model's request stream as the worker sees it: a consumer group (docs/design.md "Drain").

:class:`RequestStream` reads new entries, replays this consumer's own pending list, claims idle
entries of other consumers (``XPENDING ... IDLE`` per consumer, then ``XCLAIM``) and reports
delivery counts. :class:`Intake` is what this consumer holds: entries read and not yet answered,
kept in memory across time slices, and where to read its pending list from; it reads the next
batch's new entries ahead, in a thread, while a batch is served (:meth:`Intake.read_ahead`).
Acknowledgement and the dead-letter stream are :mod:`worker.status_script`'s, in one script with the
status writes.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import redis

from producer import schema
from worker.entries import Entry, RawEntry, parse_entries


class RequestStream:
    """Consumer-group access to ``certremove:{model}:requests``.

    Args:
        client: a redis-py client with ``decode_responses=False``.
        model: the model name.
        consumer: this worker's stable consumer name.
        claim_idle_ms: claim other consumers' entries idle at least this long.
    """

    def __init__(
        self, client: redis.Redis, model: str, consumer: str, *, claim_idle_ms: int = 10_000
    ) -> None:
        self.redis = client
        # XREADGROUP without redis-py's reply callback (a dict built per entry): the entries'
        # fields stay the flat lists Redis sent, parsed once by worker.entries; the same
        # connections (the same pool, timeouts and retries) as ``client``
        self._raw = redis.Redis(connection_pool=client.connection_pool)
        self._raw.response_callbacks.pop("XREADGROUP", None)
        self.key = schema.stream_key(model)
        self.group = schema.group_name(model)
        self.dead_letter_key = schema.dead_letter_key(model)
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms

    def ensure_group(self) -> None:
        """Create the consumer group (from the start of the stream) if it does not exist."""
        try:
            self.redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: bytes | str, count: int, block_ms: int | None = None) -> list[RawEntry]:
        try:
            reply: Any = self._raw.xreadgroup(
                self.group, self.consumer, {self.key: start}, count=count, block=block_ms
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream or group was deleted under us: start again
            return []
        if not reply:
            return []
        # RESP3: {stream: [[id, fields], ...]}; RESP2: [[stream, [[id, fields], ...]]]
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        return list(entries or [])

    def read_new(self, count: int, block_ms: int | None = None) -> list[RawEntry]:
        """Entries never delivered to any consumer (``>``), at most ``count``."""
        return self._read(">", count, block_ms)

    def read_own_pending(self, count: int, start: bytes | str = "0") -> list[RawEntry]:
        """This consumer's delivered-but-unacknowledged entries after ``start`` (replay; the
        read is exclusive: an entry's own id continues after it)."""
        return self._read(start, count)

    def read_all_pending_then_new(self, cap: int, page: int = 2048) -> list[RawEntry]:
        """Every entry this consumer holds (paged), then undelivered ones, ``cap`` in all."""
        out: list[RawEntry] = []
        start: bytes | str = "0"
        while len(out) < cap:
            got = self.read_own_pending(min(page, cap - len(out)), start=start)
            if not got:
                break
            out += got
            start = got[-1][0]
        if len(out) < cap:
            out += self.read_new(cap - len(out))
        return out

    def autoclaim(self, count: int) -> list[RawEntry]:
        """Claim up to ``count`` entries other consumers left idle for ``claim_idle_ms``.

        Only other consumers' entries: ``XAUTOCLAIM`` would also claim this consumer's own idle
        entries (waiting behind a long retrain, say) and count a delivery each time.
        """
        out: list[RawEntry] = []
        try:
            consumers = self.redis.xpending(self.key, self.group).get("consumers") or []
        except redis.ResponseError:
            return out
        for c in consumers:
            if _s(c["name"]) == self.consumer or len(out) >= count:
                continue
            rows = self.redis.xpending_range(
                self.key,
                self.group,
                min="-",
                max="+",
                count=count - len(out),
                consumername=c["name"],
                idle=self.claim_idle_ms,
            )
            ids: list[Any] = [r["message_id"] for r in rows]
            if not ids:
                continue
            claimed: Any = self.redis.xclaim(
                self.key, self.group, self.consumer, self.claim_idle_ms, ids
            )
            # a claimed id whose entry was deleted comes back without fields: nothing to serve
            out += [(eid, fields) for eid, fields in claimed if fields]
        return out

    def delivery_counts(self, entry_ids: list[bytes]) -> dict[bytes, int]:
        """How often each of this consumer's pending entries was delivered."""
        if not entry_ids:
            return {}
        lo, hi = min(entry_ids, key=_id_key), max(entry_ids, key=_id_key)
        rows = self.redis.xpending_range(
            self.key,
            self.group,
            min=lo,
            max=hi,
            count=len(entry_ids) + 1000,
            consumername=self.consumer,
        )
        wanted = set(entry_ids)
        return {
            r["message_id"]: int(r["times_delivered"]) for r in rows if r["message_id"] in wanted
        }

    def trim(self, keep_seconds: float, now: float) -> int:
        """Delete acknowledged entries older than ``keep_seconds`` (``XTRIM MINID``); never an
        entry that is pending (delivered, not acknowledged) or not yet delivered. Returns how
        many were deleted."""
        cut = _id_key(f"{int(max(0.0, now - keep_seconds) * 1000)}-0".encode())
        try:
            groups = self.redis.xinfo_groups(self.key)
            summary = self.redis.xpending(self.key, self.group)
        except redis.ResponseError:
            return 0
        if summary.get("pending") and summary.get("min"):
            cut = min(cut, _id_key(summary["min"]))
        last = next((g["last-delivered-id"] for g in groups if _s(g["name"]) == self.group), None)
        cut = min(cut, _id_key(last or b"0-0"))  # the last delivered entry itself stays
        if cut <= (0, 0):
            return 0
        return int(self.redis.xtrim(self.key, minid=f"{cut[0]}-{cut[1]}", approximate=False))

    def has_own_pending(self) -> bool:
        """This consumer holds unacknowledged entries (read without counting a delivery)."""
        return bool(
            self.redis.xpending_range(
                self.key, self.group, min="-", max="+", count=1, consumername=self.consumer
            )
        )

    def pending_count(self) -> int:
        """Entries delivered to some consumer and not yet acknowledged."""
        return int(self.redis.xpending(self.key, self.group)["pending"])

    def has_undelivered(self) -> bool:
        """True when the stream holds entries not yet delivered to the group."""
        try:
            groups = self.redis.xinfo_groups(self.key)
        except redis.ResponseError:
            return False
        last = next((g["last-delivered-id"] for g in groups if _s(g["name"]) == self.group), b"0-0")
        return bool(self.redis.xread({self.key: last}, count=1))

    def has_work(self) -> bool:
        """Entries are pending (any consumer) or undelivered."""
        try:
            return self.pending_count() > 0 or self.has_undelivered()
        except redis.ResponseError:
            return False


#: :meth:`Intake.fill` tops a batch up from the stream only while it holds less than this share
#: of ``max_batch``
TOP_UP_BELOW = 0.25


class Intake:
    """The entries this consumer serves next: held ones first (read in an earlier time slice and
    not answered), then its own pending list (read once per process, and again after a failure
    or a retrain), then idle entries claimed from other consumers, then new ones.

    Args:
        stream: the request stream.
        max_batch: most entries served in one step.
    """

    def __init__(self, stream: RequestStream, max_batch: int) -> None:
        self.stream = stream
        self.max_batch = max_batch
        #: entries read and not answered, carried from one time slice to the next in memory
        self._held: list[Entry] = []
        #: where to read this consumer's pending list from (None: read, all held in memory)
        self._cursor: bytes | str | None = "0"
        #: new entries read ahead (while a batch was served), served after the batch's carry
        self._ahead: list[Entry] = []
        #: the read ahead in flight, if any, and the one thread that reads ahead (started on
        #: first use, not per batch; stopped when the intake is garbage-collected)
        self._reading: Future[list[Entry]] | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="certremove-read-ahead")
        weakref.finalize(self, self._reader.shutdown, wait=False)

    def recover(self) -> list[Entry]:
        """Held entries, this consumer's pending entries plus idle ones claimed from others
        (never dead-lettered for how often Redis delivered them: restarts and retries re-read
        the pending list, and that is no fault of the entry's)."""
        self._collect()  # a read ahead an interrupted time slice left behind
        held, self._held, self._ahead = self._held + self._ahead, [], []
        room = self.max_batch - len(held)
        raw: list[Any] = []
        if self._cursor is not None and room > 0:
            # read the pending list once per process (and after a failure or a retrain), not
            # again at every time slice: entries read stay in memory across slices
            raw = self.stream.read_own_pending(room, start=self._cursor)
            # reads after an explicit id are exclusive: the next page starts after the last one
            self._cursor = None if len(raw) < room else raw[-1][0]
        if len(held) + len(raw) < self.max_batch:
            raw += self.stream.autoclaim(self.max_batch - len(held) - len(raw))
        if held and raw:  # a later page of the pending list holds entries read since
            mine = {e.entry_id for e in held}
            raw = [(eid, fields) for eid, fields in raw if eid not in mine]
        return held + parse_entries(raw)

    def fill(self, carry: list[Entry]) -> list[Entry]:
        """``carry`` topped up with new entries (those read ahead first), ``max_batch`` in all;
        entries read ahead past that wait for the next batch, in stream order.

        A batch that holds :data:`TOP_UP_BELOW` of ``max_batch`` already (a backlog) is served
        as it is: the read that would top it up waits behind the previous batch's status script
        on a busy Redis (44 ms measured in a burst, the script's whole length), while the
        entries it would bring are read ahead during this batch's step instead."""
        self._collect()
        batch = carry + self._ahead
        self._ahead = batch[self.max_batch :] if len(batch) > self.max_batch else []
        batch = batch[: self.max_batch]
        if len(batch) >= self.max_batch * TOP_UP_BELOW:
            return batch
        room = self.max_batch - len(batch)
        return batch + (parse_entries(self.stream.read_new(room)) if room > 0 else [])

    def read_ahead(self) -> None:
        """Start reading (and parsing) up to ``max_batch`` new entries in a thread, while the
        caller serves a batch: the read's round trip and parsing overlap the Newton step, the
        persist's fsyncs and the status script. :meth:`fill` takes them. Entries read ahead are
        delivered like any other: pending for this consumer until acknowledged, so when they
        are dropped (:meth:`forget`) the pending list brings them back.

        Called again while a batch is served (after its Newton step, ``worker.steps``): a read
        that has finished is kept and another one started, so what arrives during the step (a
        burst's thousands of entries) is read and parsed beside the batch's persist and answer
        rather than by the next :meth:`fill` on the drain's thread; one still in flight (or
        failed) is left alone."""
        reading = self._reading
        if reading is not None:
            if not reading.done() or reading.exception() is not None:
                return  # still reading; or failed: its error is raised where it is taken
            self._ahead += reading.result()  # done: keep what it read, read again
            self._reading = None
        if len(self._ahead) < self.max_batch:
            count = self.max_batch - len(self._ahead)
            self._reading = self._reader.submit(_read_new, self.stream, count)

    def _collect(self) -> None:
        """Wait for the read ahead in flight and keep what it read (its error is raised here,
        like the read's own would be)."""
        reading, self._reading = self._reading, None
        if reading is not None:
            self._ahead += reading.result()

    def hold(self, entries: list[Entry]) -> None:
        """Keep ``entries``, and any read ahead, for the next time slice (not re-delivered)."""
        self._collect()
        self._held, self._ahead = entries + self._ahead, []

    def holds_any(self, entry_ids: set[bytes]) -> bool:
        """Whether an entry held across time slices or read ahead has one of ``entry_ids``."""
        return any(e.entry_id in entry_ids for e in self._held) or any(
            e.entry_id in entry_ids for e in self._ahead
        )

    def reread_pending(self) -> None:
        """Read the pending list again at the next time slice (an entry left pending on
        purpose); what is held or read ahead stays (that read skips what it holds)."""
        self._cursor = "0"

    def forget(self) -> None:
        """Entries held across time slices or read ahead are left to the pending list: read it
        again next."""
        reading, self._reading = self._reading, None
        if reading is not None:
            wait([reading])  # its entries are pending: the pending list has them
        self._held, self._ahead, self._cursor = [], [], "0"

    def everything(self, cap: int) -> list[Entry]:
        """Every entry this consumer holds, then waiting ones, ``cap`` in all (a retrain)."""
        self.forget()
        return parse_entries(self.stream.read_all_pending_then_new(cap, self.max_batch))


def _read_new(stream: RequestStream, count: int) -> list[Entry]:
    """One read ahead, on the reader thread: up to ``count`` new entries, parsed."""
    return parse_entries(stream.read_new(count))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = _s(entry_id).partition("-")
    return int(ms), int(seq or 0)
