"""One owner per model, across hosts: a lease in Redis with a fencing token.

The flock on the state directory (``worker.runtime.lock_state_dir``) keeps two workers of one
host off one state directory; it cannot see a worker on another host, or one on another state
directory of the same model, and two such workers would each remove half of the requests. So a
worker takes the model's lease before it serves:

- ``INCR certremove:{model}:lease:token`` hands out a fencing token that grows with every owner;
  ``SET certremove:{model}:lease TOKEN NX PX ttl`` takes the lease, and a thread renews it every
  ``ttl / 3``. A second worker is refused while the lease lives, with a message naming the owner.
- Every status script checks the lease holds this worker's token (``worker.ledger``), and every
  persist checks it first: a worker that lost its lease (paused past the ttl, cut off from Redis)
  and finds another owner stops without writing anything (``LeaseLostError``).
- The token and the state directory's id go into each persisted snapshot's journal, and Redis
  keeps which state directory persisted the model last and its snapshot number
  (``certremove:{model}:state``, ``worker.state_marker``). A worker whose state directory is not
  that one, or is behind it (restored from an old backup), is refused at start: serving it would
  bring removed rows back. ``certremove owner reset`` lets an operator accept a state directory
  after all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from producer import schema
from worker.faults import LeaseLostError
from worker.state_marker import StateBehindError, as_text, check_state, snapshot_seq, state_id

log = logging.getLogger("certremove.worker")

#: the Lua reply of a script run by a worker that lost the lease (``worker.faults.is_fenced``)
FENCED_LUA = (
    "return redis.error_reply('CERTREMOVE_FENCED this worker no longer holds the model lease')"
)


def holds_lua(lease: int, counter: int, token: int, ttl: int) -> str:
    """Lua defining ``holds()``: true while the lease ``KEYS[lease]`` holds the token
    ``ARGV[token]``; a lease that lapsed (Redis was away) and nobody took since (the counter
    ``KEYS[counter]`` still ends at this token) is taken again for ``ARGV[ttl]`` ms. The one
    fencing rule of the renewal, the state record and the status script."""
    return f"""
local function holds()
  local cur = redis.call('GET', KEYS[{lease}])
  if cur == ARGV[{token}] then return true end
  if cur == false and redis.call('GET', KEYS[{counter}]) == ARGV[{token}] then
    redis.call('SET', KEYS[{lease}], ARGV[{token}], 'PX', ARGV[{ttl}])
    return true
  end
  return false
end
"""


# KEYS[1] lease, KEYS[2] token counter; ARGV[1] token, ARGV[2] ttl ms.
_RENEW_LUA = (
    holds_lua(1, 2, 1, 2)
    + """
if not holds() then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS[1] lease, KEYS[2] state marker, KEYS[3] token counter; ARGV[1] token, ARGV[2] ttl ms, then
# field/value pairs.
_MARK_LUA = (
    holds_lua(1, 3, 1, 2)
    + f"""
if not holds() then {FENCED_LUA} end
local args = {{}}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(args))
return 1
"""
)


class LeaseHeldError(RuntimeError):
    """Another worker holds the model's lease."""


@dataclass
class Owner:
    """Who holds a lease (as read from Redis)."""

    token: int
    consumer: str
    host: str
    pid: int
    state_id: str


class Lease:
    """The lease of one model, held by this process.

    Args:
        client: redis-py client.
        model: the model name.
        consumer: this worker's consumer name (shown to a refused second worker).
        ttl_ms: how long the lease lives without renewal.
        state_dir: this worker's state directory.
    """

    def __init__(
        self,
        client: redis.Redis,
        model: str,
        consumer: str,
        state_dir: Path,
        *,
        ttl_ms: int = 30_000,
    ) -> None:
        self.redis = client
        self.model = model
        self.consumer = consumer
        self.state_dir = Path(state_dir)
        self.ttl_ms = int(ttl_ms)
        self.key = schema.lease_key(model)
        self.counter = schema.lease_counter_key(model)
        self.info_key = f"{self.key}:owner"
        self.marker_key = schema.state_marker_key(model)
        self.token: int | None = None
        self.state_id = state_id(self.state_dir)
        self._renew = client.register_script(_RENEW_LUA)
        self._mark = client.register_script(_MARK_LUA)
        self._valid_until = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire
    def owner(self) -> Owner | None:
        """The current holder, or None when the lease is free."""
        token = self.redis.get(self.key)
        if token is None:
            return None
        info = {
            as_text(k): as_text(v) for k, v in (self.redis.hgetall(self.info_key) or {}).items()
        }
        return Owner(
            int(token),
            info.get("consumer", "?"),
            info.get("host", "?"),
            int(info.get("pid", "0") or 0),
            info.get("state_id", "?"),
        )

    def acquire(self, *, wait_s: float | None = None) -> int:
        """Take the lease and check this state directory is the model's latest; returns the
        fencing token.

        A lease left by this worker's own previous process (same host, same state directory,
        whose flock this process now holds: so that process is gone) is taken over at once. One
        held under this worker's consumer name elsewhere is waited for up to ``wait_s``
        (default: the ttl), as a restarted pod's predecessor may be; any other holder is refused.

        Raises:
            LeaseHeldError: another worker holds it.
            StateBehindError: another state directory, or a later snapshot of this one, served
                the model last.
        """
        token = int(self.redis.incr(self.counter))
        deadline = time.monotonic() + (self.ttl_ms / 1000 + 1 if wait_s is None else wait_s)
        while True:
            sent = time.monotonic()  # the lease's life counts from here (see renew)
            if self.redis.set(self.key, token, nx=True, px=self.ttl_ms):
                break
            holder = self.owner()
            if holder is None:
                continue  # expired between the two calls
            if holder.host == socket.gethostname() and holder.state_id == self.state_id:
                if self._take_over(holder.token, token):
                    log.warning(
                        "took over the lease of model %r from this worker's previous process "
                        "(pid %d, token %d)",
                        self.model,
                        holder.pid,
                        holder.token,
                    )
                    break
                continue
            if holder.consumer == self.consumer and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise LeaseHeldError(
                f"model {self.model!r} is already served by consumer {holder.consumer!r} on "
                f"{holder.host} (pid {holder.pid}, token {holder.token}): run exactly one worker "
                f"per model; if that worker is gone, its lease expires within "
                f"{self.ttl_ms / 1000:.0f} s"
            )
        self.token = token
        self._valid_until = sent + self.ttl_ms / 1000
        self.redis.hset(
            self.info_key,
            mapping={
                "consumer": self.consumer,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "state_id": self.state_id,
                "since": repr(time.time()),
            },
        )
        try:
            check_state(self.redis, self.model, self.state_dir, self.state_id)
        except StateBehindError:
            self.release()
            raise
        self.mark_state()
        return token

    def _take_over(self, old: int, new: int) -> bool:
        """Replace the lease ``old`` with ``new`` atomically (False when it changed since)."""
        return bool(
            self.redis.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                "redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0",
                1,
                self.key,
                str(old),
                str(new),
                str(self.ttl_ms),
            )
        )

    def mark_state(self, seq: int | None = None) -> None:
        """Record in Redis that this state directory's current snapshot (number ``seq``, read
        from ``CURRENT`` when not given) is the model's latest (fenced: only while the lease is
        held). Written as given, unlike the status script's copy (which never goes back): call
        it only with the newest snapshot persisted."""
        if self.token is None:
            return
        self._mark(
            keys=[self.key, self.marker_key, self.counter],
            args=[
                str(self.token),
                str(self.ttl_ms),
                *self.marker_fields(snapshot_seq(self.state_dir) if seq is None else seq),
            ],
        )

    def marker_fields(self, seq: int) -> list[str]:
        """The state record's fields for snapshot ``seq`` of this directory (what
        :meth:`mark_state` writes; ``worker.status_script.StatusPublisher`` writes them with a batch's
        acknowledgements): ``state_id``, ``seq``, ``consumer``, ``at``, each name then value."""
        return [
            "state_id",
            self.state_id,
            "seq",
            str(int(seq)),
            "consumer",
            self.consumer,
            "at",
            repr(time.time()),
        ]

    # ------------------------------------------------------------------ hold
    def renew(self) -> bool:
        """Extend the lease; False when another worker holds it now."""
        if self.token is None:
            return False
        # Redis extends the lease after this moment, and its reply may arrive up to a socket
        # timeout later: counted from the reply, the lease would look longer than it is, and
        # check() could pass after it lapsed.
        sent = time.monotonic()
        ok = bool(self._renew(keys=[self.key, self.counter], args=[self.token, self.ttl_ms]))
        if ok:
            self._valid_until = sent + self.ttl_ms / 1000
        else:
            self._lost = f"the lease of model {self.model!r} passed to another worker"
        return ok

    def start(self) -> None:
        """Renew in a daemon thread every ttl/3 (errors are retried; the lease may lapse).

        A renewal that fails is tried again at once, then every ttl/3: a single hung connection
        (timed out after ``CERTREMOVE_REDIS_TIMEOUT``, at most ttl/2, and dropped by redis-py)
        then costs one timeout, and the retry on a fresh connection lands before the lease
        lapses (ttl/3 + ttl/2 < ttl).
        """
        if self._thread is not None:
            return
        interval = self.ttl_ms / 3000

        def run() -> None:
            wait = interval
            while not self._stop.wait(wait):
                try:
                    if not self.renew():
                        log.critical("%s: this worker stops serving", self._lost)
                        return
                    wait = interval
                except Exception as exc:  # noqa: BLE001 - Redis away: try again
                    log.warning("renewing the model lease failed: %s", exc)
                    wait = 0.0 if wait else interval  # once at once, then at the usual pace

        self._thread = threading.Thread(target=run, name="certremove-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Before persisting: make sure the lease is still this worker's.

        Raises:
            LeaseLostError: another worker holds it (fatal: stop serving).
            redis.ConnectionError: Redis cannot tell (an infrastructure failure: retry).
        """
        if self.token is None:
            return
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        if time.monotonic() < self._valid_until - self.ttl_ms / 3000:
            return  # renewed recently enough
        if not self.renew():
            raise LeaseLostError(str(self._lost))

    def fence_token(self) -> int | None:
        """The token the status script must find (None: not fenced)."""
        return self.token

    def release(self) -> None:
        """Give the lease up (only if still this worker's)."""
        self._stop.set()
        if self.token is None:
            return
        try:
            self.redis.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
                "end return 0",
                1,
                self.key,
                self.token,
            )
        except redis.RedisError:
            pass
        self.token = None
