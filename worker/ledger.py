"""Request statuses and the append-only ledger of answered requests.

Two records, written in this order after the model state was persisted:
1. an append-only JSON-lines file beside the model state (``ledger.jsonl``, rotated into gzipped
   segments ``ledger-NNNNNN.jsonl.gz`` that are kept for good): one line per committed batch,
   never rewritten, so a repeated request id is recognised even after a crash between the persist
   and the status write, and after its status hash expired in Redis. A line holds the answer
   (status, method, version, time, reason), its request ids, the ``unknown_ids`` and
   ``already_removed_ids`` of requests that had some, and the sample ids the batch removed (the
   state directory holds every sample id already, so this adds nothing an operator of it cannot
   see; it lets the worker check at start that a model never serves a removed row again);
2. the status hashes, the dead-letter copies and the ``XACK`` of the batch, in one server-side
   script (statuses first: an entry is never acknowledged before its status is written). The
   script is fenced: it runs only while this worker holds the model's lease (``worker.lease``).

Dead-letter copies hold the entry's own fields (request id, sample ids, enqueue time), its entry
id, the reason, and the count of any other fields (never the fields themselves: an entry with
thousands of fields must not make the copy fail).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import schema

#: the live ledger file in a state directory
LEDGER_NAME = "ledger.jsonl"
#: rotate the live file into a gzipped segment past this size
ROTATE_BYTES = 64 * 2**20
#: fields of an entry kept in its dead-letter copy (the rest are counted)
_KEPT_FIELDS = (
    schema.FIELD_REQUEST_ID.encode(),
    schema.FIELD_SAMPLE_IDS.encode(),
    schema.FIELD_REQUESTED_AT.encode(),
    schema.FIELD_REPLAY_OF.encode(),
)
#: longest value kept per field in a dead-letter copy (bytes)
_DEAD_VALUE_MAX = 1 << 20

# KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3] lease, KEYS[4] lease token counter, then
# the status hashes: first the ARGV[5] "common" answers, which share the 8 values ARGV[6..13] (a
# committed batch: same status, method, version and time), then the others. ARGV[1] group,
# ARGV[2] lease token ('' = unfenced: tests and tools), ARGV[3] status TTL in seconds ('0' =
# keep), ARGV[4] the lease's life in ms (to take it again when it lapsed during a Redis outage
# and nobody took it since: the counter still ends at this token); after the common values, per other answer a mode ('w' write, 'q' write
# only while the status is missing or queued) and its 8 values in _NAMES order ('' = leave the
# field alone); then the count of dead letters and, per dead letter, its entry id and its field
# count and fields (flat); then the entry ids to acknowledge. Statuses are written first, dead
# letters copied next, acknowledgements last: an error stops the script before any entry is
# acknowledged without its status and its dead-letter copy.
_NAMES = schema.STATUS_FIELDS
_PUBLISH_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
if ARGV[2] ~= '' then
  local owner = redis.call('GET', KEYS[3])
  if owner ~= ARGV[2] then
    if owner == false and redis.call('GET', KEYS[4]) == ARGV[2] then
      redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[4])
    else
      return redis.error_reply('CERTREMOVE_FENCED this worker no longer holds the model lease')
    end
  end
end
local ttl = tonumber(ARGV[3])
local names = {'status', 'method', 'model_version', 'unknown_ids', 'already_removed_ids',
               'reason', 'requested_at', 'applied_at'}
local function fields(base)
  local args = {}
  for j = 1, #names do
    local v = ARGV[base + j]
    if v ~= '' then args[#args + 1] = names[j]; args[#args + 1] = v end
  end
  return args
end
local function expire(key)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
local ncommon = tonumber(ARGV[5])
local common = fields(5)
for k = 5, ncommon + 4 do
  redis.call('HSET', KEYS[k], unpack(common))
  expire(KEYS[k])
end
local a = 14
for k = ncommon + 5, #KEYS do
  local write = true
  if ARGV[a] == 'q' then
    local cur = redis.call('HGET', KEYS[k], 'status')
    write = (cur == false or cur == 'queued')
  end
  if write then
    local args = fields(a)
    if #args > 0 then redis.call('HSET', KEYS[k], unpack(args)) end
    expire(KEYS[k])
  end
  a = a + 1 + #names
end
local ids = {}
local function ack(id)
  ids[#ids + 1] = id
  if #ids >= 1000 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)); ids = {} end
end
local ndead = tonumber(ARGV[a])
a = a + 1
local dead = {}
for d = 1, ndead do
  local id, nf = ARGV[a], tonumber(ARGV[a + 1])
  local rec = {}
  for j = a + 2, a + 1 + nf do rec[#rec + 1] = ARGV[j] end
  redis.call('XADD', KEYS[2], '*', unpack(rec))
  dead[#dead + 1] = id
  a = a + 2 + nf
end
for _, id in ipairs(dead) do ack(id) end
for i = a, #ARGV do ack(ARGV[i]) end
if #ids > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)) end
return 1
"""

#: ``(entry_id, fields, reason)`` of an entry for the dead-letter stream
DeadLetter = tuple[bytes, dict[bytes, bytes], str]
#: status, method, version, time, reason, dead-lettered
_Key = tuple[str, str, int | None, float | None, str, bool]


class LedgerDamagedError(RuntimeError):
    """A ledger file has a damaged line that is not the torn last line of a crash."""


@dataclass
class Answer:
    """The final answer to one request (what its status hash will say).

    ``removed_ids`` (the sample ids this request removed) go to the ledger file only, never to
    Redis. ``dead_letter`` marks the rejection of a dead-lettered entry: an operator may replay
    it (``certremove deadletters replay``), and the replayed entry is served as new.
    """

    request_id: str
    status: str
    method: str = ""
    model_version: int | None = None
    unknown_ids: list[Any] = field(default_factory=list)
    already_removed_ids: list[Any] = field(default_factory=list)
    reason: str = ""
    requested_at: float | None = None
    applied_at: float | None = None
    only_if_queued: bool = False
    removed_ids: list[Any] = field(default_factory=list)
    dead_letter: bool = False

    def common_key(self) -> tuple[str, str, int | None, float | None] | None:
        """Answers with equal keys share their status values (a plain committed request)."""
        if self.only_if_queued or self.unknown_ids or self.already_removed_ids or self.reason:
            return None
        return (self.status, self.method, self.model_version, self.applied_at)

    def values(self, *, with_requested_at: bool = True) -> list[str]:
        """The 8 status values in script order ('' leaves a field alone); the producer already
        wrote ``requested_at``, so shared values leave it alone."""
        at = "" if self.requested_at is None or not with_requested_at else repr(self.requested_at)
        return [
            self.status,
            self.method,
            "" if self.model_version is None else str(self.model_version),
            json.dumps(self.unknown_ids),
            json.dumps(self.already_removed_ids),
            self.reason,
            at,
            "" if self.applied_at is None else repr(self.applied_at),
        ]

    def key(self) -> _Key:
        return (
            self.status,
            self.method,
            self.model_version,
            self.applied_at,
            self.reason,
            self.dead_letter,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able copy (the journal persisted with the model state)."""
        return {
            "rid": self.request_id,
            "s": self.status,
            "m": self.method,
            "v": self.model_version,
            "u": self.unknown_ids,
            "a": self.already_removed_ids,
            "r": self.reason,
            "q": self.requested_at,
            "t": self.applied_at,
            "x": self.removed_ids,
        }

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> Answer:
        return cls(
            str(rec["rid"]),
            str(rec["s"]),
            str(rec.get("m") or ""),
            rec.get("v"),
            list(rec.get("u") or []),
            list(rec.get("a") or []),
            reason=str(rec.get("r") or ""),
            requested_at=rec.get("q"),
            applied_at=rec.get("t"),
            removed_ids=list(rec.get("x") or []),
        )


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
        self.stream = schema.stream_key(model)
        self.group = schema.group_name(model)
        self.dead_letter_key = schema.dead_letter_key(model)
        self.lease_key = schema.lease_key(model)
        self.failures_key = schema.failures_key(model)
        self.lease_counter_key = schema.lease_counter_key(model)
        self.path = path
        self.status_ttl = int(status_ttl)
        self.rotate_bytes = int(rotate_bytes)
        self.fence = fence
        self.lease_ttl_ms = int(lease_ttl_ms)
        self._publish = client.register_script(_PUBLISH_LUA)
        self._known: dict[str, _Key] = {}
        #: unknown_ids / already_removed_ids of answered requests that had some
        self._lists: dict[str, tuple[list[Any], list[Any]]] = {}
        #: size of the live file up to its last whole line (None: not read yet)
        self._size: int | None = None
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

    def __len__(self) -> int:
        return len(self._known)

    def record(self, answers: Iterable[Answer]) -> None:
        """Append the answers to the ledger file (fsynced), then remember them: an answer is
        known only once it is on disk."""
        groups: dict[_Key, list[Answer]] = {}
        for a in answers:
            if a.only_if_queued:
                continue
            groups.setdefault(a.key(), []).append(a)
        if not groups:
            return
        if self.path is not None:
            lines = []
            for (s, m, v, t, r, d), group in groups.items():
                rec: dict[str, Any] = {"s": s, "m": m, "v": v, "t": t}
                if r:
                    rec["r"] = r
                if d:
                    rec["d"] = 1
                rec["ids"] = [a.request_id for a in group]
                lists = {
                    a.request_id: [a.unknown_ids, a.already_removed_ids]
                    for a in group
                    if a.unknown_ids or a.already_removed_ids
                }
                if lists:
                    rec["l"] = lists
                removed = [i for a in group for i in a.removed_ids]
                if removed:
                    rec["x"] = removed
                lines.append(json.dumps(rec) + "\n")
            self._append("".join(lines))
        for key, group in groups.items():
            for a in group:
                self._known[a.request_id] = key
                if a.unknown_ids or a.already_removed_ids:
                    self._lists[a.request_id] = (list(a.unknown_ids), list(a.already_removed_ids))
                else:
                    self._lists.pop(a.request_id, None)

    def _append(self, text: str) -> None:
        """Append whole lines or nothing: a write that fails part-way (a disk filling up) is cut
        off again, and anything past the last line known to be whole (a cut that failed too) is
        cut before the next append, so a retry never lands behind a partial line."""
        assert self.path is not None
        data = text.encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if self._size is not None and end > self._size:
                os.ftruncate(fd, self._size)
                end = self._size
            os.lseek(fd, end, os.SEEK_SET)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                except OSError:
                    pass  # cut before the next append (self._size stays at end)
                self._size = end
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
        """Write the status hashes, copy ``dead`` entries (with their reason) to the dead-letter
        stream and acknowledge them and ``ack_ids``: one script, in that order.

        Raises:
            redis.ResponseError: ``CERTREMOVE_FENCED ...`` when this worker lost the lease (see
                ``worker.faults.is_fenced``), or whatever Redis refused (nothing was acknowledged then).
        """
        dead = dead or []
        if not answers and not ack_ids and not dead:
            return
        common_key = next((a.common_key() for a in answers if a.common_key()), None)
        common = [a for a in answers if common_key and a.common_key() == common_key]
        others = [a for a in answers if not (common_key and a.common_key() == common_key)]
        keys = [self.stream, self.dead_letter_key, self.lease_key, self.lease_counter_key] + [
            schema.status_key(self.model, a.request_id) for a in common + others
        ]
        token = self.fence() if self.fence is not None else None
        args: list[Any] = [
            self.group,
            "" if token is None else str(token),
            str(self.status_ttl),
            str(self.lease_ttl_ms),
            len(common),
        ]
        args += common[0].values(with_requested_at=False) if common else [""] * len(_NAMES)
        for a in others:
            args.append("q" if a.only_if_queued else "w")
            args += a.values()
        args.append(len(dead))
        for eid, fields, reason in dead:
            record = dead_letter_record(eid, fields, reason)
            args += [eid, 2 * len(record)]
            for k, v in record.items():
                args += [k, v]
        args += ack_ids
        self._publish(keys=keys, args=args)


def dead_letter_record(
    entry_id: bytes, fields: dict[bytes, bytes] | None, reason: str
) -> dict[bytes, bytes]:
    """The dead-letter copy of an entry: its own fields (each cut at 1 MiB), the count of any
    other fields, its entry id and the reason."""
    fields = fields or {}
    record: dict[bytes, bytes] = {}
    for name in _KEPT_FIELDS:
        value = fields.get(name)
        if isinstance(value, bytes | str):
            raw = value.encode() if isinstance(value, str) else value
            record[name] = raw[:_DEAD_VALUE_MAX]
    other = len(fields) - len(record)
    if other > 0:
        record[b"other_fields"] = str(other).encode()
    record[b"entry_id"] = entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()
    record[b"reason"] = reason.encode("utf-8", errors="replace")[:2000]
    return record
