"""Which failures are the infrastructure's (wait and retry) and which are an entry's own.

A deletion request is never rejected because a disk, Redis or the process failed: those errors
mean "wait and retry with backoff". Only a failure that an entry causes on its own (it fails when
served alone, with the infrastructure answering) counts against the entry; after
``max_failures`` such failures it goes to the dead-letter stream with the reason.
"""

from __future__ import annotations

import re

import redis

#: Redis error replies that say the server cannot serve now, whatever the command
_TRANSIENT_REPLIES = (
    "OOM",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "MISCONF",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "UNBLOCKED",
)

#: the same replies from a command inside a script, as Redis 6 reports them ("Error running script
#: (call to f_...): @user_script:1: @user_script: 1: -OOM command not allowed ...")
_IN_SCRIPT = re.compile(r"@USER_SCRIPT: ?\d+: -?(?:" + "|".join(_TRANSIENT_REPLIES) + r")\b")
#: redis-py's classes for those replies: it strips the reply's first word from the message (Redis
#: 7 inside a script: OutOfMemoryError "command not allowed when used memory > 'maxmemory'.
#: script: ..., on @user_script:31."), so the class is what says it
_TRANSIENT_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.TryAgainError,
)
#: what torch says when an allocation fails: a RuntimeError (CPU), or torch.OutOfMemoryError (a
#: RuntimeError too), never MemoryError
_OUT_OF_MEMORY = ("OUT OF MEMORY", "CAN'T ALLOCATE MEMORY")


class LeaseLostError(RuntimeError):
    """This worker no longer holds the model's lease: it must not persist or answer anything."""


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__``/``__context__``), at most 10 deep."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def is_fenced(exc: BaseException) -> bool:
    """True when ``exc`` says this worker lost the model's lease (fatal for this process)."""
    for e in cause_chain(exc):
        if isinstance(e, LeaseLostError):
            return True
        if isinstance(e, redis.ResponseError) and "CERTREMOVE_FENCED" in str(e):
            return True
    return False


def is_infrastructure(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a disk, memory or Redis failure: retry later."""
    for e in cause_chain(exc):
        if isinstance(e, OSError | MemoryError | redis.ConnectionError | redis.TimeoutError):
            return True
        if isinstance(e, RuntimeError) and (
            type(e).__name__ == "OutOfMemoryError"
            or any(s in str(e).upper() for s in _OUT_OF_MEMORY)
        ):
            return True
        if isinstance(e, _TRANSIENT_CLASSES):
            return True
        if isinstance(e, redis.ResponseError):
            text = str(e).lstrip("-").upper()
            if text.startswith(_TRANSIENT_REPLIES) or "SCRIPT KILL" in text:
                return True
            if _IN_SCRIPT.search(text):
                return True
    return False


def kind(exc: BaseException) -> str:
    """A label for metrics: ``redis``, ``disk`` or ``other``."""
    for e in cause_chain(exc):
        if isinstance(e, redis.RedisError):
            return "redis"
        if isinstance(e, OSError):
            return "disk"
    return "other"
