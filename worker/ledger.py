"""The append-only ledger of answered requests (the permanent record).

Written after the model state was persisted, before the statuses are published
(:mod:`worker.status`, which also holds :class:`Answer`): an append-only JSON-lines file beside
the model state (``ledger.jsonl``, rotated into gzipped segments ``ledger-NNNNNN.jsonl.gz`` that
are kept for good): one line per committed batch, never rewritten, so a repeated request id is
recognised even after a crash between the persist and the status write, and after its status hash
expired in Redis. A line holds the answer (status, method, version, time, reason), its request
ids, the ``unknown_ids`` and ``already_removed_ids`` of requests that had some, and the sample ids
the batch removed (the state directory holds every sample id already, so this adds nothing an
operator of it cannot see; it lets the worker check at start that a model never serves a removed
row again), with ``xn`` (how many of them each request removed, in ``ids`` order) on a line of
several requests, for their receipts.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import redis

from core import compact_json
from producer import schema
from worker.status import Answer, AnswerKey, answer_records, group_answers
from worker.status_script import DeadLetter, StatusPublisher, dead_letter_record

__all__ = [
    "LEDGER_NAME",
    "Answer",
    "DeadLetter",
    "Ledger",
    "LedgerDamagedError",
    "dead_letter_record",
    "ledger_files",
    "read_records",
    "removed_sample_ids",
]

#: the live ledger file in a state directory
LEDGER_NAME = "ledger.jsonl"
#: rotate the live file into a gzipped segment past this size
ROTATE_BYTES = 64 * 2**20


def write_whole(fd: int, data: bytes, end: int, *, fsync: bool = True) -> None:
    """Write ``data`` at offset ``end`` of ``fd`` (and fsync it): whole or nothing. A write that
    fails part-way (a disk filling up) is cut back to ``end`` and re-raised; when the cut fails
    too, the caller cuts past its last known whole line before its next append."""
    os.lseek(fd, end, os.SEEK_SET)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, end)
            if fsync:
                os.fsync(fd)
        except OSError:
            pass
        raise


class LedgerDamagedError(RuntimeError):
    """A ledger file has a damaged line that is not the torn last line of a crash."""


def ledger_files(state_dir: Path) -> list[Path]:
    """The ledger files of a state directory, oldest first (rotated segments, then the live
    file)."""
    state_dir = Path(state_dir)
    segments = sorted(state_dir.glob("ledger-*.jsonl.gz"))
    live = state_dir / LEDGER_NAME
    return segments + ([live] if live.exists() else [])


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, is the last line without a newline) of one ledger file."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        yield i + 1, line, i == len(lines) - 1


def read_records(state_dir: Path) -> Iterator[dict[str, Any]]:
    """Every ledger record of a state directory, oldest first.

    A torn last line of the live file (a crash mid-append: its batch was never published, so it
    is replayed) is skipped.

    Raises:
        LedgerDamagedError: any other line does not parse (names the file and the line).
    """
    for path in ledger_files(state_dir):
        try:
            for number, line, torn in _lines(path):
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("ids"), list):
                        raise ValueError("not a ledger record")
                except ValueError as exc:
                    if torn and path.name == LEDGER_NAME:
                        continue
                    raise LedgerDamagedError(
                        f"{path}: line {number} is damaged ({str(exc)[:100]}): restore the file "
                        "from a backup, or move the damaged line out of it by hand after checking "
                        "it; the worker does not start on a ledger it cannot read"
                    ) from exc
                yield rec
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise LedgerDamagedError(
                f"{path} cannot be read ({exc}): restore it from a backup"
            ) from exc


def removed_sample_ids(state_dir: Path) -> list[Any]:
    """Every sample id the ledger says was removed (by any applied request), oldest first.

    Raises:
        LedgerDamagedError: a ledger file is damaged.
    """
    out: list[Any] = []
    for rec in read_records(state_dir):
        out += rec.get("x") or []
    return out


class Ledger:
    """Status hashes in Redis plus the append-only ledger file of answered requests.

    Args:
        client: redis-py client (``decode_responses=False``).
        model: the model name.
        path: the live ledger file (``STATE_DIR/ledger.jsonl``); None keeps the answers in
            memory only (tests).
        status_ttl: seconds a final status hash lives in Redis (0: for good); the ledger file
            keeps the permanent record and answers a repeated request id after that.
        rotate_bytes: rotate the live file into a gzipped segment past this size.
        fence: returns the lease token the status script must find (None: unfenced).
        lease_ttl_ms: the lease's life, to take it again in the script when it lapsed while
            Redis was away and nobody took it since.

    Raises:
        LedgerDamagedError: a ledger file is damaged.
    """

    def __init__(
        self,
        client: redis.Redis,
        model: str,
        path: Path | None,
        *,
        status_ttl: int = 0,
        rotate_bytes: int = ROTATE_BYTES,
        fence: Any = None,
        lease_ttl_ms: int = 30_000,
    ) -> None:
        self.redis = client
        self.model = model
        self.failures_key = schema.failures_key(model)
        self.path = path
        self.rotate_bytes = int(rotate_bytes)
        self.status = StatusPublisher(
            client, model, status_ttl=status_ttl, fence=fence, lease_ttl_ms=lease_ttl_ms
        )
        self._known: dict[str, AnswerKey] = {}
        #: unknown_ids / already_removed_ids of answered requests that had some
        self._lists: dict[str, tuple[list[Any], list[Any]]] = {}
        #: every sample id the ledger says was removed (read once at start, then kept up)
        self.removed_ids: list[Any] = []
        #: size of the live file up to its last whole line (None: not read yet)
        self._size: int | None = None
        #: records (lines) in the ledger files, segments included: a record's position is its
        #: index (segments are kept for good, so positions never change; ``worker.releases``)
        self.count = 0
        #: called with the answers of each :meth:`record` once they are on disk
        self.listeners: list[Callable[[list[Answer]], None]] = []
        if path is not None:
            self._load(path)
            self._size = path.stat().st_size if path.exists() else 0

    def _load(self, path: Path) -> None:
        if path.exists():
            with open(path, "r+b") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    # A crash tore the last line: cut it off, or the next append would join it
                    # and be lost too. That line's batch was never published: it is replayed.
                    f.truncate(data.rfind(b"\n") + 1)
                    f.flush()
                    os.fsync(f.fileno())
        for rec in read_records(path.parent):
            key = (
                rec["s"],
                rec.get("m", ""),
                rec.get("v"),
                rec.get("t"),
                rec.get("r", ""),
                bool(rec.get("d")),
            )
            self.count += 1
            self.removed_ids += rec.get("x") or []
            lists = rec.get("l") or {}
            for rid in rec["ids"]:
                self._known[rid] = key
                if rid in lists:
                    u, a = lists[rid]
                    self._lists[rid] = (list(u), list(a))

    def seen(self, request_id: str) -> Answer | None:
        """The recorded answer of a request id already answered (reason, unknown and already
        removed ids included), else None."""
        rec = self._known.get(request_id)
        if rec is None:
            return None
        status, method, version, at, reason, dead = rec
        unknown, already = self._lists.get(request_id, ([], []))
        return Answer(
            request_id,
            status,
            method,
            version,
            list(unknown),
            list(already),
            reason=reason,
            applied_at=at,
            only_if_queued=True,
            dead_letter=dead,
        )

    def knows_any(self, request_ids: Iterable[str]) -> bool:
        """Whether :meth:`seen` knows any of ``request_ids`` (one set operation)."""
        return not self._known.keys().isdisjoint(request_ids)

    def __len__(self) -> int:
        return len(self._known)

    def record(self, answers: Iterable[Answer]) -> None:
        """Append the answers to the ledger file (fsynced), then remember them: an answer is
        known only once it is on disk."""
        groups = group_answers(a for a in answers if not a.only_if_queued)
        if not groups:
            return
        if self.path is not None:
            # compact JSON, a line per record (core.compact_json: a batch of 8,192 answers)
            lines = [
                compact_json.dumps(rec, allow_nan=True) + b"\n" for rec in answer_records(groups)
            ]
            self._append(b"".join(lines))
        self.count += len(groups)
        known, lists = self._known, self._lists
        for key, group in groups.items():
            rids = [a.request_id for a in group]
            known.update(dict.fromkeys(rids, key))
            self.removed_ids.extend([i for a in group for i in a.removed_ids])
            distinct = set(rids)
            if len(distinct) < len(rids):  # a request id twice: in order, as given
                for a in group:
                    if a.unknown_ids or a.already_removed_ids:
                        lists[a.request_id] = (list(a.unknown_ids), list(a.already_removed_ids))
                    else:
                        lists.pop(a.request_id, None)
                continue
            listed = [a for a in group if a.unknown_ids or a.already_removed_ids]
            # a request recorded again without lists forgets its earlier ones: found with one
            # set operation, not a look-up per request
            for rid in (lists.keys() & distinct).difference(a.request_id for a in listed):
                del lists[rid]
            for a in listed:
                lists[a.request_id] = (list(a.unknown_ids), list(a.already_removed_ids))
        recorded = [a for group in groups.values() for a in group]
        for listener in self.listeners:
            listener(recorded)

    def _append(self, data: bytes) -> None:
        """Append whole lines (UTF-8) or nothing: a write that fails part-way (a disk filling up)
        is cut off again, and anything past the last line known to be whole (a cut that failed
        too) is cut before the next append, so a retry never lands behind a partial line."""
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if self._size is not None and end > self._size:
                os.ftruncate(fd, self._size)
                end = self._size
            try:
                write_whole(fd, data, end)
            except BaseException:
                self._size = end  # cut before the next append if the cut failed too
                raise
            self._size = end + len(data)
        finally:
            os.close(fd)
        if self._size >= self.rotate_bytes:
            self.rotate()

    def rotate(self) -> Path | None:
        """Move the live file into the next gzipped segment (kept for good) and start a new
        one. Returns the segment, or None when there was nothing to rotate."""
        if self.path is None or not self.path.exists() or self.path.stat().st_size == 0:
            return None
        root = self.path.parent
        taken = [
            int(p.name[7:13]) for p in root.glob("ledger-*.jsonl.gz") if p.name[7:13].isdigit()
        ]
        segment = root / f"ledger-{max(taken, default=0) + 1:06d}.jsonl.gz"
        tmp = root / f".{segment.name}.tmp"
        with open(self.path, "rb") as src, gzip.open(tmp, "wb") as dst:
            dst.write(src.read())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, segment)
        # The segment holds every line; only now the live file starts again (a crash in between
        # leaves both: the same lines twice, which reads the same).
        os.replace(self.path, root / ".ledger.rotated")
        self.path.touch()
        self._size = 0
        (root / ".ledger.rotated").unlink()
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return segment

    def publish(
        self, answers: list[Answer], ack_ids: list[bytes], dead: list[DeadLetter] | None = None
    ) -> None:
        """Write the status hashes, copy ``dead`` entries to the dead-letter stream and
        acknowledge them and ``ack_ids``, in one script (``worker.status_script.StatusPublisher``)."""
        self.status.publish(answers, ack_ids, dead)

    @property
    def fence(self) -> Any:
        """Returns the lease token the status script must find (None: unfenced)."""
        return self.status.fence

    @fence.setter
    def fence(self, value: Any) -> None:
        self.status.fence = value

    @property
    def status_ttl(self) -> int:
        """Seconds a final status hash lives in Redis (0: for good)."""
        return self.status.status_ttl

    @status_ttl.setter
    def status_ttl(self, value: int) -> None:
        self.status.status_ttl = int(value)
