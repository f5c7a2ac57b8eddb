"""Build the one :class:`~worker.service.RemovalService` of a worker process.

Called once when the Celery worker starts (``worker.tasks.ServiceStep``): loads the model from the
state directory (on CUDA when available, unless ``CERTREMOVE_DEVICE`` says otherwise), connects
to Redis, starts the operator metrics endpoint and wires the collaborators together.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from producer.client import redis_py_url
from worker.doorbell import Doorbell, SendTask
from worker.errors import StateLockedError, StateMissingError
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.service import PipelineRetrain, RemovalService
from worker.settings import Settings
from worker.stream import RequestStream

log = logging.getLogger("certremove.worker")


@dataclass
class Runtime:
    """What a worker process holds: the service and where its metrics are served."""

    service: RemovalService
    metrics_port: int


def load_model(settings: Settings) -> Any:
    """The current model of ``settings.state_dir``.

    Raises:
        StateMissingError: no model there (run ``certremove train`` first) or unreadable.
    """
    import torch  # noqa: PLC0415 - torch is loaded only in the worker process, never by producers

    import core  # noqa: PLC0415

    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))

    if not (settings.state_dir / "CURRENT").exists():
        raise StateMissingError(
            f"no model in {settings.state_dir}: run `certremove train --state {settings.state_dir}`"
        )
    try:
        return core.load_model(settings.state_dir, device=settings.device)
    except core.errors.StateError as exc:
        raise StateMissingError(str(exc)) from exc


def pipeline_retrainer(settings: Settings) -> PipelineRetrain | None:
    """The full-pipeline retrain (``core.pipeline``) when enabled and the source data is known."""
    if not settings.pipeline_retrain or settings.data_dir is None:
        return None
    data_dir, device = settings.data_dir, settings.device

    def run(model: Any, pending_rows: list[int]) -> tuple[Any, Any]:
        from core.pipeline import retrain_pipeline  # noqa: PLC0415

        return retrain_pipeline(model, data_dir=data_dir, pending_rows=pending_rows, device=device)

    return run


def _pipeline_off_reason(settings: Settings) -> str:
    if not settings.pipeline_retrain:
        return "the operator disabled full-pipeline retrains (CERTREMOVE_PIPELINE_RETRAIN=0)"
    return "no source data for a full-pipeline retrain is configured (CERTREMOVE_DATA_DIR)"


#: state directories this process holds the worker lock of (path -> open lock file)
_HELD: dict[Path, Any] = {}
LOCK_NAME = ".worker.lock"


def lock_state_dir(state_dir: Path) -> None:
    """Hold the state directory's worker lock for the life of this process (``flock``; the
    kernel drops it when the process ends, also on SIGKILL). Two workers writing one state
    directory would each persist a mask without the other's removals: removals undone.

    Raises:
        StateLockedError: another process holds it (names its pid).
    """
    path = Path(state_dir).resolve()
    if path in _HELD:
        return
    fh = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise StateLockedError(
            f"another worker (pid {holder}) already serves {path}: run exactly one worker per "
            "model and state directory"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _HELD[path] = fh


def build_runtime(
    settings: Settings, send_task: SendTask, *, serve_metrics: bool = True
) -> Runtime:
    """Load the model and assemble the service (see the module docstring).

    Raises:
        StateLockedError: another worker serves the state directory.
        StateMissingError: no model there.
    """
    model = load_model(settings)
    lock_state_dir(settings.state_dir)
    client = redis.Redis.from_url(redis_py_url(settings.broker_url), health_check_interval=30)
    metrics = ServiceMetrics(CollectorRegistry())
    port = 0
    if serve_metrics:
        port = metrics.serve(settings.metrics_port, settings.metrics_addr)
    service = RemovalService(
        model=model,
        state_dir=settings.state_dir,
        stream=RequestStream(
            client, settings.model, settings.consumer, claim_idle_ms=settings.claim_idle_ms
        ),
        ledger=Ledger(client, settings.model, settings.state_dir / "ledger.jsonl"),
        metrics=metrics,
        doorbell=Doorbell(client, settings.model, send_task),
        send_task=send_task,
        max_batch=settings.max_batch,
        slice_seconds=settings.slice_seconds,
        max_deliveries=settings.max_deliveries,
        reload=lambda: load_model(settings),
        pipeline=pipeline_retrainer(settings),
        pipeline_off_reason=_pipeline_off_reason(settings),
        retrain_lead=settings.retrain_lead,
    )
    # The model, its data and the id index live as long as the process: keep them out of the
    # cyclic collector's generations (full collections were a visible share of each batch).
    gc.freeze()
    dev = getattr(model, "device", "?")
    log.info(
        "certremove worker: model %r version %s on %s, %d rows alive; metrics on %s:%d",
        settings.model,
        model.version,
        dev,
        model.n_alive,
        settings.metrics_addr,
        port,
    )
    return Runtime(service=service, metrics_port=port)
