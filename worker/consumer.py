"""The worker's Celery consumer: a malformed message is dropped, a lost broker ends the worker.

Wired in by :func:`worker.app.create_app` (``worker_consumer``). Over Celery's own consumer it

- reads through :class:`worker.transport.Transport`, whatever the broker URL's scheme, so a list
  item that is not a kombu envelope is logged and dropped instead of ending the worker;
- checks every task message before Celery's handler sees it (a ``certremove.*`` task of this
  worker, JSON content, a ``[args, kwargs, embed]`` body whose arguments fit the task, no
  callbacks or chains) and routes what fails to Celery's hooks (``on_unknown_message``,
  ``on_unknown_task``, ``on_decode_error``, ``on_invalid_task``), which here log one warning line
  with a short excerpt and drop the message (a pickle body is refused by kombu's ``accept`` check
  before anything is deserialized). Messages are only wake-ups (the Redis Stream is the durable
  record), so dropping one loses no request;
- turns a broker connection that cannot be (re-)established within the retries
  (``broker_connection_max_retries``) and any error that would end the consumer into a
  :class:`worker.fatal.WorkerFatal`: the worker exits non-zero with one line.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import redis
from celery import signals
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection
from kombu.exceptions import OperationalError
from kombu.serialization import prepare_accept_content
from vine import promise

from worker import fatal
from worker.transport import guard, printable, warn_dropped

log = logging.getLogger("certremove.worker")

_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


def body_problem(body: Any, fun: Any) -> str | None:
    """Why a decoded task body does not fit the task function ``fun``, or None."""
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "the body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "the arguments are not a list and an object"
    if embed is not None and not isinstance(embed, dict):
        return "the embed part is not an object"
    if embed and any(embed.get(key) for key in _EMBED_KEYS):
        return "callbacks, errbacks, chains and chords are not accepted"
    try:
        inspect.signature(fun).bind(*args, **kwargs)
    except TypeError as exc:
        return f"the arguments do not fit the task ({exc})"
    return None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with the checks of the module docstring."""

    # -------------------------------------------------------------- connection
    def connection_for_read(self, heartbeat: Any = None) -> Connection:
        return self.ensure_connected(guard(self.app.connection_for_read(heartbeat=heartbeat)))

    def ensure_connected(self, conn: Connection) -> Connection:
        try:
            return super().ensure_connected(conn)
        except (OperationalError, redis.RedisError, OSError) as exc:
            when = "at start-up" if self.first_connection_attempt else "after losing it"
            raise fatal.from_exception(exc, self._settings, when) from exc

    def start(self) -> None:
        try:
            super().start()
        except Exception as exc:  # what would end the worker as "Unrecoverable error"
            raise fatal.from_exception(exc, self._settings, "while consuming") from exc

    @property
    def _settings(self) -> Any:
        return self.app.conf.certremove_settings

    # -------------------------------------------------------------- messages
    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)
        recoverable = (OperationalError, *self.connection_errors, *self.channel_errors)

        def on_task_received(message: Any) -> Any:
            if not self._accept(message):
                return None
            try:
                return handle(message)
            except recoverable:
                raise
            except Exception as exc:  # a message Celery cannot handle must not end the worker
                log.debug("handling a broker message failed", exc_info=exc)
                self._drop(message, f"Celery could not handle it ({type(exc).__name__}: {exc})")
                return None

        return on_task_received

    def _accept(self, message: Any) -> bool:
        """Whether ``message`` is a task message this worker runs; if not, it is dropped through
        the matching Celery hook."""
        headers = message.headers
        name = headers.get("task") if isinstance(headers, dict) else None
        if not isinstance(name, str):
            self.on_unknown_message(None, message)
            return False
        if name not in self.strategies or name not in self.app.tasks:
            self.on_unknown_task(None, message, KeyError(name))
            return False
        if not isinstance(headers.get("id"), str) or not headers["id"]:
            self.on_invalid_task(None, message, InvalidTaskError("no task id"))
            return False
        if message.accept is None:  # kombu sets it from the consumer; never decode without it
            message.accept = prepare_accept_content(self.app.conf.accept_content)
        try:
            body = message.decode()
        except Exception as exc:  # noqa: BLE001 - ContentDisallowed, DecodeError, codec errors
            self.on_decode_error(message, exc)
            return False
        problem = body_problem(body, self.app.tasks[name].run)
        if problem is not None:
            self.on_invalid_task(body, message, InvalidTaskError(problem))
            return False
        return True

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._drop(message, f"the body does not decode ({type(exc).__name__}: {exc})")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, "not a Celery task message (no task name)")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        self._drop(message, f"unknown task '{printable(name, 60)}'")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._drop(message, f"invalid task message: {exc}", exc)

    def _drop(self, message: Any, reason: str, exc: BaseException | None = None) -> None:
        """Log one warning line and drop ``message`` (rejected without requeue: acknowledged)."""
        info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        queue = info.get("routing_key")
        where = printable(queue, 100) if isinstance(queue, str) and queue else "the broker"
        warn_dropped(where, " ".join(reason.split())[:200], message.body)
        if not message.acknowledged:
            message.reject_log_error(log, self.connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)
