"""How the worker process ends on a fatal error: a non-zero status by class and one clear line.

Celery catches what a bootstep raises: an exception becomes "Unrecoverable error" with a
traceback, and ``celery_app.worker_main`` then returns normally (status 0), so a supervisor with
``restart: on-failure`` would never restart the worker. The worker's own steps therefore turn a
fatal error into :class:`WorkerFatal`, a ``SystemExit`` that Celery's ``Worker.start`` turns into
the worker's exit code without a traceback; ``certremove worker`` prints the recorded line on
stderr and exits with the code.

Exit statuses (docs/design.md "Exit codes", README "Worker exit status"):

- 1: an unexpected error, or the service stopped (its persisted model could not be reloaded);
- 2: bad configuration (a setting, the broker URL, Redis refusing the credentials);
- 3: a state directory problem (no model, damaged, locked or leased by another worker);
- 4: infrastructure unavailable (Redis unreachable after the retries, the metrics port in use).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from kombu.exceptions import OperationalError

from producer.urls import redact_url
from worker.errors import StateLockedError, StateMissingError
from worker.faults import cause_chain
from worker.lease import LeaseHeldError
from worker.settings import Settings, SettingsError
from worker.state_marker import StateBehindError

log = logging.getLogger("certremove.worker")

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STATE = 3
EXIT_INFRA = 4

_AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM", "INVALID PASSWORD", "AUTH <PASSWORD>")


class WorkerFatal(SystemExit):
    """End the worker with exit status ``code``; ``message`` says what went wrong and what to do.

    A ``SystemExit``: Celery's ``Worker.start`` stops the worker with ``code`` as its exit code and
    logs no traceback; ``except Exception`` blocks on the way do not swallow it.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


_last: WorkerFatal | None = None
_reported_by_caller = False


def report_at_exit() -> None:
    """The caller (``certremove worker``) prints the error line itself when the worker ends; without
    this call the line is logged when the error happens (``celery -A worker.app worker``)."""
    global _reported_by_caller
    _reported_by_caller = True


def last() -> WorkerFatal | None:
    """The fatal error that ended the worker in this process, if any."""
    return _last


def fatal(code: int, message: str, settings: Settings | None = None) -> WorkerFatal:
    """Record and return the :class:`WorkerFatal` to raise (the broker password, if any, masked)."""
    global _last
    secret = _password(settings.broker_url) if settings is not None else None
    if secret:
        message = message.replace(secret, "***")
    _last = WorkerFatal(code, message)
    if not _reported_by_caller:
        log.critical("error: %s", message)
    return _last


def from_exception(
    exc: BaseException, settings: Settings, when: str = "at start-up"
) -> WorkerFatal:
    """The :class:`WorkerFatal` for ``exc`` (classified by :func:`classify`), recorded; its
    traceback is logged at DEBUG."""
    if isinstance(exc, WorkerFatal):
        return exc
    log.debug("fatal error %s", when, exc_info=exc)
    code, message = classify(exc, settings, when)
    return fatal(code, message, settings)


def broker_name(settings: Settings) -> str:
    """The broker URL as it may be printed (password masked)."""
    return redact_url(settings.broker_url)


def is_auth_error(exc: BaseException) -> bool:
    """True when Redis refused the credentials (wrong or missing password, no permission)."""
    for e in cause_chain(exc):
        if isinstance(e, redis.AuthenticationError):
            return True
        if isinstance(e, redis.ResponseError | OperationalError | redis.ConnectionError):
            text = str(e).upper()
            if any(reply in text for reply in _AUTH_REPLIES):
                return True
    return False


def classify(exc: BaseException, settings: Settings, when: str = "at start-up") -> tuple[int, str]:
    """``(exit status, one-line message naming what to do)`` for a fatal ``exc``."""
    detail = _one_line(exc)
    if is_auth_error(exc):
        return EXIT_CONFIG, (
            f"Redis at {broker_name(settings)} refused the credentials ({detail}): set the right "
            "password in CERTREMOVE_BROKER_URL"
        )
    if isinstance(exc, SettingsError):
        return EXIT_CONFIG, f"bad configuration: {detail}"
    if isinstance(exc, (StateLockedError, StateMissingError, *_state_errors())):
        return EXIT_STATE, detail  # these name the directory and say what to do
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OperationalError):
        return EXIT_INFRA, (
            f"cannot reach Redis at {broker_name(settings)} {when} ({detail}): start Redis or fix "
            "CERTREMOVE_BROKER_URL"
        )
    if isinstance(exc, OSError) and exc.filename is None:
        where = f"{settings.metrics_addr}:{settings.metrics_port}"
        if exc.errno == errno.EADDRINUSE:
            return EXIT_INFRA, (
                f"cannot serve metrics on {where}: the port is already in use: stop what uses it "
                "or set CERTREMOVE_METRICS_PORT to a free port"
            )
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM):
            return EXIT_CONFIG, (
                f"cannot serve metrics on {where} ({detail}): fix CERTREMOVE_METRICS_ADDR or "
                "CERTREMOVE_METRICS_PORT"
            )
    if isinstance(exc, OSError):
        return (
            EXIT_STATE,
            f"cannot use {settings.state_dir} ({detail}): check the path and its permissions",
        )
    if isinstance(exc, ValueError):
        return EXIT_CONFIG, f"bad configuration: {detail}"
    return EXIT_FAILURE, (
        f"unexpected error {when}: {detail} (run with --loglevel DEBUG for the traceback)"
    )


def _state_errors() -> tuple[type[BaseException], ...]:
    if "core.errors" not in sys.modules:  # no core error can exist: do not load torch for it
        return (LeaseHeldError, StateBehindError)
    from core.errors import StateError  # noqa: PLC0415

    return (StateError, LeaseHeldError, StateBehindError)


def _one_line(exc: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, OSError | redis.RedisError | OperationalError | RuntimeError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _password(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        return parts.password or next(iter(parse_qs(parts.query).get("password", [])), None)
    except ValueError:
        return None


def exit_code(value: Any) -> int:
    """A process exit status for Celery's ``worker.exitcode`` (None or 0: success)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    return EXIT_FAILURE


def exit_process(exc: BaseException) -> None:
    """End the worker process at once (the supervisor restarts it on the persisted state)."""
    log.critical("the service stopped (%s): exiting the worker process", exc)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)
