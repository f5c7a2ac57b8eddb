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
import time
import uuid
from typing import Any

from celery import Celery, bootsteps

from producer import schema
from producer.client import append_requests
from worker.runtime import Runtime, build_runtime
from worker.settings import Settings

log = logging.getLogger("certremove.worker")


class _Holder:
    runtime: Runtime | None = None


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks and the service bootstep on ``app``."""
    holder = _Holder()

    def send_task(name: str, queue: str) -> None:
        app.send_task(name, queue=queue)

    def service() -> Any:
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
        svc = service()
        rid = str(request_id) if request_id else uuid.uuid4().hex
        try:
            at = float(requested_at) if requested_at is not None else time.time()
        except (TypeError, ValueError):
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
            holder.runtime = build_runtime(settings, send_task)
            holder.runtime.service.doorbell.requeue(5000)  # drain on worker ready
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
