"""The Celery tasks (thin: parse, call the service) and the bootstep that owns the service.

- ``certremove.drain`` (queue ``certremove.{model}``): one time slice of the stream.
- ``certremove.retrain`` (queue ``certremove.{model}.retrain``, consumed first): retrain.
- ``certremove.remove`` (queue ``certremove.{model}``): append one request to the stream, for
  Celery clients that only know ``send_task``; without a ``request_id`` the Celery task id is the
  request id (the sender reads the status under it: there is no result backend).

The service is built once per worker process by :class:`ServiceStep` (solo pool: one process owns
the model), which also sends a drain when the worker starts and, every ``drain_interval`` seconds,
rings the doorbell while entries are pending, so a drain killed mid-flight never stalls the model.
It sets the heartbeat (``certremove_heartbeat_timestamp_seconds``) every :data:`HEARTBEAT_S`
seconds from the worker's event loop and after each drain, and from a thread while a blocking
retrain runs (it holds the loop for its whole length), so the heartbeat stops when the loop is
wedged or the process is gone (``certremove health``).

Nothing here imports ``core`` or torch at module level (``celery -A worker.app inspect ping``
starts fast): the model and the service are loaded by :class:`ServiceStep` in the worker process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task, bootsteps
from celery.exceptions import Reject

from producer import schema
from producer.client import append_requests, encode_sample_ids, redis_py_url
from worker import fatal, faults
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.runtime import Runtime
    from worker.service import RemovalService

log = logging.getLogger("certremove.worker")

#: seconds between two heartbeats of the worker's event loop
HEARTBEAT_S = 2.0
#: first wait between two tries to reach Redis at start; doubled per try up to the cap
BROKER_FIRST_BACKOFF_S = 0.5
BROKER_MAX_BACKOFF_S = 5.0
#: pause before a ``certremove.remove`` message whose append failed in Redis goes back to its
#: queue (at most ``max_backoff``): the fault is given a moment, and the retries do not spin
REMOVE_REQUEUE_S = 1.0


class _Holder:
    runtime: Runtime | None = None


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks and the service bootstep on ``app``."""
    holder = _Holder()

    def send_task(name: str, queue: str) -> None:
        app.send_task(name, queue=queue)

    def service() -> RemovalService:
        if holder.runtime is None:  # a task that arrives before the bootstep (never in solo)
            from worker.runtime import build_runtime  # noqa: PLC0415 - loads core and torch

            holder.runtime = build_runtime(settings, send_task)
        return holder.runtime.service

    def beat() -> None:
        if holder.runtime is not None:
            holder.runtime.service.metrics.beat()

    @app.task(name=schema.TASK_DRAIN, ignore_result=True, shared=False)
    def drain() -> dict[str, Any]:
        report = service().drain()
        beat()
        return report.__dict__

    @app.task(name=schema.TASK_RETRAIN, ignore_result=True, shared=False)
    def retrain() -> dict[str, Any]:
        svc = service()
        with svc.metrics.beating(HEARTBEAT_S):  # a blocking retrain holds the event loop
            report = svc.retrain()
        return report.__dict__

    @app.task(name=schema.TASK_REMOVE, ignore_result=True, bind=True, shared=False)
    def remove(
        task: Task,
        request_id: str | None = None,
        sample_ids: Any = None,
        requested_at: float | None = None,
    ) -> str:
        if request_id is not None and (
            isinstance(request_id, bool) or not isinstance(request_id, str | int)
        ):
            # No request id to answer under: a malformed message, dropped (sample_ids are checked
            # by the drain, which answers a bad list as `rejected`).
            log.warning(
                "dropped a malformed broker message: %s needs a string request_id, got %s",
                schema.TASK_REMOVE,
                type(request_id).__name__,
            )
            return ""
        svc = service()
        # Without a request id the task id is the request id: the sender knows it
        # (``send_task(...).id``) and reads the status under it. A falsy one given (0) is kept.
        given = request_id is not None and str(request_id) != ""
        rid = str(request_id) if given else str(task.request.id)
        try:
            at = float(requested_at) if requested_at is not None else time.time()
        except (TypeError, ValueError, OverflowError):
            at = time.time()
        if not math.isfinite(at):
            at = time.time()
        try:
            entry = [(rid, encode_sample_ids(sample_ids))]
            append_requests(svc.stream.redis, settings.model, entry, at)
        except Exception as exc:
            if not faults.is_infrastructure(exc):
                raise
            # Late acks acknowledge a task that failed: the request, in this message only, would
            # be lost. Requeued, it is appended at a later delivery (one that reached Redis
            # although its reply did not is answered as a repeat: same request id).
            pause = min(REMOVE_REQUEUE_S, settings.max_backoff)
            log.warning(
                "appending request %s failed (%s: %s): its message goes back to the queue in %g s",
                rid,
                type(exc).__name__,
                " ".join(str(exc).split())[:200],
                pause,
            )
            time.sleep(pause)
            raise Reject(exc, requeue=True) from exc
        svc.doorbell.ring()
        return rid

    class ServiceStep(bootsteps.StartStopStep):
        """Load the model at start, kick a drain, ring periodically while entries are pending."""

        requires = {"celery.worker.components:Timer"}

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self.tref: Any = None
            self.beat_ref: Any = None

        def start(self, worker: Any) -> None:
            try:
                wait_for_broker(settings)
                from worker.runtime import build_runtime  # noqa: PLC0415 - core and torch

                holder.runtime = build_runtime(settings, send_task)
                holder.runtime.service.doorbell.requeue(5000)  # drain on worker ready
            except Exception as exc:
                # Celery would log "Unrecoverable error" with a traceback and exit 0: exit
                # non-zero by class with one line instead (worker.fatal).
                raise fatal.from_exception(exc, settings) from exc
            self.tref = worker.timer.call_repeatedly(settings.drain_interval, self.tick)
            # Fired by the worker's event loop (the main thread), between tasks: the heartbeat
            # stops when the loop is wedged, unlike a thread of its own.
            self.beat_ref = worker.timer.call_repeatedly(HEARTBEAT_S, beat)

        def tick(self) -> None:
            svc = holder.runtime.service if holder.runtime else None
            try:
                if svc is not None and svc.stream.has_work():
                    svc.doorbell.ring()
                if svc is not None:
                    svc.release_tick()  # a manual request, an interval run out, a retry
            except Exception as exc:  # noqa: BLE001 - a failed check must not kill the timer
                log.warning(
                    "periodic drain check failed (%s: %s); the next one is in %g s",
                    type(exc).__name__,
                    " ".join(str(exc).split())[:200],
                    settings.drain_interval,
                )
                log.debug("periodic drain check failed", exc_info=exc)

        def stop(self, worker: Any) -> None:
            for ref in (self.tref, self.beat_ref):
                if ref is not None:
                    ref.cancel()

    app.steps["worker"].add(ServiceStep)


def wait_for_broker(
    settings: Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until Redis answers ``PING``, before the model is loaded: tries with exponential
    backoff (0.5 s doubling up to 5 s) for ``settings.broker_connect_timeout`` seconds in all,
    a warning line per failed try.

    Raises:
        WorkerFatal: Redis refused the credentials (status 2, at once: retrying cannot help), or
            did not answer in time (status 4, one line naming the broker and what to do).
    """
    timeout = settings.broker_connect_timeout
    broker = fatal.broker_name(settings)
    deadline = clock() + timeout
    delay = BROKER_FIRST_BACKOFF_S
    tries = 0
    client = redis.Redis.from_url(
        redis_py_url(settings.broker_url),
        socket_connect_timeout=min(5.0, timeout),
        socket_timeout=min(5.0, timeout),
        **settings.tls_options(),
    )
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.RedisError, OSError) as exc:
                if fatal.is_auth_error(exc):
                    raise fatal.from_exception(exc, settings) from exc
                tries += 1
                left = deadline - clock()
                if left <= 0:
                    when = f"at start-up (tried {tries} times in {timeout:g} s)"
                    raise fatal.from_exception(exc, settings, when) from exc
                wait = min(delay, left)
                log.warning(
                    "cannot reach Redis at %s (%s): try %d failed, next in %.1f s (giving up "
                    "after %g s, CERTREMOVE_BROKER_CONNECT_TIMEOUT)",
                    broker,
                    " ".join(str(exc).split())[:200],
                    tries,
                    wait,
                    timeout,
                )
                sleep(wait)
                delay = min(BROKER_MAX_BACKOFF_S, 2 * delay)
    finally:
        client.close()
