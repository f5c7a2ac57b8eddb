"""The worker's log lines: ``text`` (Celery's usual layout) or ``json`` (one object per line).

:func:`configure` sets up the root logger once, on stderr; ``certremove worker --log-format``
(``CERTREMOVE_LOG_FORMAT``) chooses the format and ``worker.app`` hooks Celery's
``setup_logging`` signal, so Celery's own lines (``celery.*``) come out in the same format.

A JSON line carries ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, then the
structured fields a call gave with ``extra=`` (:data:`FIELDS`: ``request_id``, ``reason``,
``model``, ...), the model name :func:`configure` was given, and ``exc`` with the traceback when
there is one. Log calls never pass sample ids (a request is named by its id only).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
#: structured fields copied from a record (``log.info(..., extra={...})``) into a JSON line
FIELDS = ("request_id", "reason", "model", "entry_id", "queue", "version", "kind")
_HANDLER_MARK = "_certremove_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring).

    Args:
        static: fields added to every line unless the record has its own (the model name).
    """

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = {k: v for k, v in (static or {}).items() if v is not None}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self.static)
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def check_format(fmt: str) -> str:
    """``fmt`` lower-cased if it is ``text`` or ``json``.

    Raises:
        ValueError: any other value.
    """
    value = fmt.strip().lower()
    if value not in FORMATS:
        raise ValueError(f"the log format must be text or json, got {fmt!r}")
    return value


def formatter(fmt: str, model: str | None = None) -> logging.Formatter:
    """The formatter of ``fmt`` (``model`` goes into every JSON line)."""
    if check_format(fmt) == "json":
        return JsonFormatter({"model": model})
    return logging.Formatter(TEXT_FORMAT)


def configure(
    level: int | str,
    fmt: str = "text",
    *,
    model: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Log ``level`` and above to ``stream`` (stderr) in ``fmt``, through one handler on the root
    logger (a handler an earlier call installed is replaced; others are left alone). Celery's
    own loggers propagate to the root, so they come out in the same format.

    Raises:
        ValueError: an unknown format or level.
    """
    if isinstance(level, str):
        name = level.strip().upper()
        numeric = logging.getLevelName(name)
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}")
        level = numeric
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt, model))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings (Celery's SecurityWarning) as log lines too
    for name in ("celery", "celery.task", "celery.redirected", "kombu"):
        # Celery gives some of its loggers handlers of their own; let them go through the root.
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    return handler


def celery_prints_as_json(model: str | None = None) -> None:
    """Celery's worker prints a few lines itself, outside logging (``worker: Warm shutdown
    (MainProcess)``, from its signal handlers, through ``celery.apps.worker.safe_say``): in JSON
    mode they become JSON lines too (written straight to the stream, as Celery does, since they
    come from a signal handler)."""
    import celery.apps.worker as celery_worker  # noqa: PLC0415 - only in the worker process

    fmt = JsonFormatter({"model": model})

    def say(msg: str, f: TextIO = sys.__stderr__) -> None:  # type: ignore[assignment]
        record = logging.LogRecord("celery.apps.worker", logging.INFO, "", 0, msg, None, None)
        try:
            f.write(fmt.format(record) + "\n")
            f.flush()
        except Exception:  # noqa: BLE001, S110 - as Celery's own: never fail a signal handler
            pass

    celery_worker.safe_say = say
