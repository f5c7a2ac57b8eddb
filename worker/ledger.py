"""Request statuses and the append-only ledger of answered request ids (DESIGN.md §3, §4).

Two records, written in this order after the model state was persisted:
1. an append-only JSON-lines file beside the model state (``ledger.jsonl``): one line per
   committed batch, never rewritten, so a repeated request id is recognised even after a crash
   between the persist and the status write;
2. the status hashes, the dead-letter copies and the ``XACK`` of the batch, in one server-side
   script (statuses first: an entry is never acknowledged before its status is written).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import schema

# KEYS[1] stream, KEYS[2] dead-letter stream, then the status hashes: first the ARGV[2] "common"
# answers, which share the 8 values ARGV[3..10] (a committed batch: same status, method, version and
# time), then the others. ARGV[1] group; after the common values, per other answer a mode ('w'
# write, 'q' write only while the status is missing or queued) and its 8 values in _NAMES order
# ('' = leave the field alone); then the count of dead letters and, per dead letter, its entry id
# and its field count and fields (flat); then the entry ids to acknowledge. Statuses are written
# first, dead letters copied next, acknowledgements last: an error stops the script before any
# entry is acknowledged without its status and its dead-letter copy.
_NAMES = schema.STATUS_FIELDS
_PUBLISH_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
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
local ncommon = tonumber(ARGV[2])
local common = fields(2)
for k = 3, ncommon + 2 do
  redis.call('HSET', KEYS[k], unpack(common))
end
local a = 11
for k = ncommon + 3, #KEYS do
  local write = true
  if ARGV[a] == 'q' then
    local cur = redis.call('HGET', KEYS[k], 'status')
    write = (cur == false or cur == 'queued')
  end
  if write then
    local args = fields(a)
    if #args > 0 then redis.call('HSET', KEYS[k], unpack(args)) end
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
_Key = tuple[str, str, int | None, float | None, str]  # status, method, version, time, reason


@dataclass
class Answer:
    """The final answer to one request (what its status hash will say)."""

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


class Ledger:
    """Status hashes in Redis plus the append-only file of answered request ids.

    Args:
        client: redis-py client (``decode_responses=False``).
        model: the model name.
        path: the ledger file; None keeps the ids in memory only (tests).
    """

    def __init__(self, client: redis.Redis, model: str, path: Path | None) -> None:
        self.redis = client
        self.model = model
        self.stream = schema.stream_key(model)
        self.group = schema.group_name(model)
        self.dead_letter_key = schema.dead_letter_key(model)
        self.path = path
        self._publish = client.register_script(_PUBLISH_LUA)
        self._known: dict[str, _Key] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        with open(path, "r+b") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                # A crash tore the last line: cut it off, or the next append would join it and
                # be lost too. That line's batch was never published, so it will be replayed.
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line left by an older version
            key = (rec["s"], rec.get("m", ""), rec.get("v"), rec.get("t"), rec.get("r", ""))
            for rid in rec.get("ids", []):
                self._known[rid] = key

    def seen(self, request_id: str) -> Answer | None:
        """The recorded answer of a request id already answered (reason included), else None."""
        rec = self._known.get(request_id)
        if rec is None:
            return None
        status, method, version, at, reason = rec
        return Answer(
            request_id, status, method, version, reason=reason, applied_at=at, only_if_queued=True
        )

    def __len__(self) -> int:
        return len(self._known)

    def record(self, answers: Iterable[Answer]) -> None:
        """Append the answers to the ledger file (fsynced) and remember their ids."""
        groups: dict[_Key, list[str]] = {}
        for a in answers:
            if a.only_if_queued:
                continue
            key = (a.status, a.method, a.model_version, a.applied_at, a.reason)
            groups.setdefault(key, []).append(a.request_id)
        if not groups:
            return
        for key, ids in groups.items():
            for rid in ids:
                self._known[rid] = key
        if self.path is None:
            return
        lines = "".join(
            json.dumps({"s": s, "m": m, "v": v, "t": t, **({"r": r} if r else {}), "ids": ids})
            + "\n"
            for (s, m, v, t, r), ids in groups.items()
        )
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def publish(
        self, answers: list[Answer], ack_ids: list[bytes], dead: list[DeadLetter] | None = None
    ) -> None:
        """Write the status hashes, copy ``dead`` entries (with their reason) to the dead-letter
        stream and acknowledge them and ``ack_ids``: one script, in that order."""
        dead = dead or []
        if not answers and not ack_ids and not dead:
            return
        common_key = next((a.common_key() for a in answers if a.common_key()), None)
        common = [a for a in answers if common_key and a.common_key() == common_key]
        others = [a for a in answers if not (common_key and a.common_key() == common_key)]
        keys = [self.stream, self.dead_letter_key] + [
            schema.status_key(self.model, a.request_id) for a in common + others
        ]
        args: list[Any] = [self.group, len(common)]
        args += common[0].values(with_requested_at=False) if common else [""] * len(_NAMES)
        for a in others:
            args.append("q" if a.only_if_queued else "w")
            args += a.values()
        args.append(len(dead))
        for eid, fields, reason in dead:
            record = {**(fields or {}), b"entry_id": eid, b"reason": reason.encode()}
            args += [eid, 2 * len(record)]
            for k, v in record.items():
                args += [k, v]
        args += ack_ids
        self._publish(keys=keys, args=args)
