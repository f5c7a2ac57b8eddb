"""The one script that publishes answers (:class:`StatusPublisher`).

The status hashes, the dead-letter copies, the state record and the ``XACK`` of a batch go in one
server-side script (statuses first: an entry is never acknowledged before its status is written).
The script is fenced: it runs only while this worker holds the model's lease (``worker.lease``).
It runs after the model state was persisted and the answers were appended to the ledger file
(:mod:`worker.ledger`).

Dead-letter copies hold the entry's own fields (request id, sample ids, enqueue time), its entry
id, the reason, and the count of any other fields (never the fields themselves: an entry with
thousands of fields must not make the copy fail).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from producer import schema
from worker.entries import RawFields, fields_dict
from worker.lease import FENCED_LUA, holds_lua
from worker.status import Answer

#: fields of an entry kept in its dead-letter copy (the rest are counted)
_KEPT_FIELDS = (
    schema.FIELD_REQUEST_ID.encode(),
    schema.FIELD_SAMPLE_IDS.encode(),
    schema.FIELD_REQUESTED_AT.encode(),
    schema.FIELD_REPLAY_OF.encode(),
)
#: longest value kept per field in a dead-letter copy (bytes)
_DEAD_VALUE_MAX = 1 << 20

# KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3] lease, KEYS[4] lease token counter,
# KEYS[5] the state record (worker.state_marker), then the status hashes: first the ARGV[5]
# "common" answers, which share the 8 values ARGV[6..13] (a committed batch: same status,
# method, version and time), then the others. ARGV[1] group, ARGV[2] lease token ('' =
# unfenced: tests and tools), ARGV[3] status TTL in seconds ('0' = keep), ARGV[4] the lease's
# life in ms (``worker.lease.holds_lua``); after the common values, per other answer a mode ('w'
# write, 'q' write only while the status is missing or queued) and its 8 values in _NAMES order
# ('' = leave the field alone); then the count of dead letters and, per dead letter, its entry
# id and its field count and fields (flat); then the count of the state record's values and the
# values (flat: state_id, id, seq, n, ...; 0 = none); then the entry ids to acknowledge.
# Statuses are written first, dead letters copied next, the state record then,
# acknowledgements last: an error stops the script before any entry is acknowledged without its
# status and its dead-letter copy.
_NAMES = schema.ANSWER_FIELDS
_PUBLISH_LUA = (
    (
        holds_lua(3, 4, 2, 4)
        + "if redis.replicate_commands then redis.replicate_commands() end\n"
        + f"if ARGV[2] ~= '' and not holds() then {FENCED_LUA} end\n"
    )
    + """
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
for k = 6, ncommon + 5 do
  redis.call('HSET', KEYS[k], unpack(common))
  expire(KEYS[k])
end
local a = 14
for k = ncommon + 6, #KEYS do
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
-- the state record (worker.state_marker), never back to an older snapshot of this directory:
-- written with the acknowledgements it covers
local nmark = tonumber(ARGV[a])
a = a + 1
if nmark > 0 then
  local mark = {}
  for j = a, a + nmark - 1 do mark[#mark + 1] = ARGV[j] end
  local cur = redis.call('HMGET', KEYS[5], 'state_id', 'seq')
  if not (cur[1] == mark[2] and tonumber(cur[2] or '0') >= tonumber(mark[4])) then
    redis.call('HSET', KEYS[5], unpack(mark))
  end
  a = a + nmark
end
for _, id in ipairs(dead) do ack(id) end
for i = a, #ARGV do ack(ARGV[i]) end
if #ids > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)) end
return 1
"""
)

#: ``(entry_id, fields, reason)`` of an entry for the dead-letter stream
DeadLetter = tuple[bytes, RawFields, str]


class StatusPublisher:
    """Publishes the answers of one model (status hashes, dead letters, ``XACK``) in one script.

    Args:
        client: redis-py client (``decode_responses=False``).
        model: the model name.
        status_ttl: seconds a final status hash lives in Redis (0: for good).
        fence: returns the lease token the script must find (None: unfenced).
        lease_ttl_ms: the lease's life, to take it again in the script when it lapsed while
            Redis was away and nobody took it since.

    :attr:`marker` (set by the service): returns the state record's fields
    (``worker.lease.Lease.marker_fields``) of the newest snapshot persisted without its record,
    or None; each script writes them with its acknowledgements (unless the record already names
    that snapshot or a newer one of the same directory).
    """

    def __init__(
        self,
        client: redis.Redis,
        model: str,
        *,
        status_ttl: int = 0,
        fence: Callable[[], Any] | None = None,
        lease_ttl_ms: int = 30_000,
    ) -> None:
        self.model = model
        self.stream = schema.stream_key(model)
        self.group = schema.group_name(model)
        self.dead_letter_key = schema.dead_letter_key(model)
        self.lease_key = schema.lease_key(model)
        self.lease_counter_key = schema.lease_counter_key(model)
        self.status_ttl = int(status_ttl)
        self.fence = fence
        self.lease_ttl_ms = int(lease_ttl_ms)
        self.marker_key = schema.state_marker_key(model)
        self.marker: Callable[[], list[str] | None] | None = None
        self._script = client.register_script(_PUBLISH_LUA)

    def publish(
        self, answers: list[Answer], ack_ids: list[bytes], dead: list[DeadLetter] | None = None
    ) -> None:
        """Write the status hashes, copy ``dead`` entries (with their reason) to the dead-letter
        stream and acknowledge them and ``ack_ids``: one script, in that order.

        Raises:
            redis.ResponseError: ``CERTREMOVE_FENCED ...`` when this worker lost the lease (see
                ``worker.faults.is_fenced``), or whatever Redis refused (nothing was acknowledged
                then).
        """
        dead = dead or []
        if not answers and not ack_ids and not dead:
            return
        common_key = None
        common: list[Answer] = []
        others: list[Answer] = []
        for a in answers:  # the first answer with a common key sets the one shared
            shared = a.common_key()
            if shared is not None and common_key is None:
                common_key = shared
            (common if shared is not None and shared == common_key else others).append(a)
        prefix = schema.status_key(self.model, "")
        keys = [
            self.stream, self.dead_letter_key, self.lease_key, self.lease_counter_key,
            self.marker_key,
        ]  # fmt: skip
        keys += [prefix + a.request_id for a in common]
        keys += [prefix + a.request_id for a in others]
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
        mark = self.marker() if self.marker is not None and token is not None else None
        args.append(len(mark or ()))
        args += mark or []
        args += ack_ids
        self._script(keys=keys, args=args)


def dead_letter_record(entry_id: bytes, fields: RawFields, reason: str) -> dict[bytes, bytes]:
    """The dead-letter copy of an entry: its own fields (each cut at 1 MiB), the count of any
    other fields, its entry id and the reason."""
    fields = fields_dict(fields)
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
