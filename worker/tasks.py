"""The Celery tasks (thin: parse, call the service) and the bootstep that owns the service.

- ``certremove.drain`` (queue ``certremove.{model}``): one time slice of the stream.
- ``certremove.retrain`` (queue ``certremove.{model}.retrain``, consumed first): retrain.
- ``certremove.remove`` (queue ``certremove.{model}``): append one request to the stream, for
  Celery clients that only know ``send_task``.

The service is built once per worker process by :class:`ServiceStep` (solo pool: one process owns
the model), which also sends a drain when the worker starts and, every ``drain_interval`` seconds,
rings the doorbell while entries are pending, so a drain killed mid-flight never stalls the model.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from typing import Any

from celery import Celery, bootsteps

from producer import schema
from producer.client import append_requests
from worker import fatal
from worker.runtime import Runtime, build_runtime
from worker.service import RemovalService
from worker.settings import Settings

log = logging.getLogger("certremove.worker")


class _Holder:
    runtime: Runtime | None = None


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks and the service bootstep on ``app``."""
    holder = _Holder()

    def send_task(name: str, queue: str) -> None:
        app.send_task(name, queue=queue)

    def service() -> RemovalService:
        if holder.runtime is None:  # a task that arrives before the bootstep (never in solo)
            holder.runtime = build_runtime(settings, send_task)
        return holder.runtime.service

    @app.task(name=schema.TASK_DRAIN, ignore_result=True)
    def drain() -> dict[str, Any]:
        report = service().drain()
        return report.__dict__

    @app.task(name=schema.TASK_RETRAIN, ignore_result=True)
    def retrain() -> dict[str, Any]:
        report = service().retrain()
        return report.__dict__

    @app.task(name=schema.TASK_REMOVE, ignore_result=True)
    def remove(
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
        rid = str(request_id) if request_id else uuid.uuid4().hex
        try:
            at = float(requested_at) if requested_at is not None else time.time()
        except (TypeError, ValueError, OverflowError):
            at = time.time()
        if not math.isfinite(at):
            at = time.time()
        append_requests(svc.stream.redis, settings.model, [(rid, json.dumps(sample_ids))], at)
        svc.doorbell.ring()
        return rid

    class ServiceStep(bootsteps.StartStopStep):
        """Load the model at start, kick a drain, ring periodically while entries are pending."""

        requires = {"celery.worker.components:Timer"}

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self.tref: Any = None

        def start(self, worker: Any) -> None:
            try:
                wait_for_broker(app, settings)
                holder.runtime = build_runtime(settings, send_task)
                holder.runtime.service.doorbell.requeue(5000)  # drain on worker ready
            except Exception as exc:
                # Celery would log "Unrecoverable error" with a traceback and exit 0: exit
                # non-zero by class with one line instead (worker.fatal).
                raise fatal.from_exception(exc, settings) from exc
            self.tref = worker.timer.call_repeatedly(settings.drain_interval, self.tick)

        def tick(self) -> None:
            svc = holder.runtime.service if holder.runtime else None
            try:
                if svc is not None and svc.stream.has_work():
                    svc.doorbell.ring()
            except Exception:  # noqa: BLE001 - a failed check must not kill the timer
                log.exception("periodic drain check failed")

        def stop(self, worker: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()

    app.steps["worker"].add(ServiceStep)


def wait_for_broker(app: Celery, settings: Settings) -> None:
    """Wait until Redis answers, with kombu's own retry (2, 4, 6 ... s apart, at most
    ``settings.broker_max_retries`` retries), before the model is loaded.

    Raises:
        WorkerFatal: Redis refused the credentials (at once: retrying cannot help).
        OperationalError: Redis did not answer within the retries.
    """
    broker = fatal.broker_name(settings)
    tries = [0]

    def on_error(exc: BaseException, interval: float) -> None:
        if fatal.is_auth_error(exc):
            raise fatal.from_exception(exc, settings) from exc
        tries[0] += 1
        log.warning(
            "cannot reach Redis at %s (%s): retry %d of %d in %.0f s",
            broker,
            " ".join(str(exc).split())[:200],
            tries[0],
            settings.broker_max_retries,
            interval,
        )

    with app.connection_for_read() as conn:
        conn.ensure_connection(errback=on_error, max_retries=settings.broker_max_retries)
