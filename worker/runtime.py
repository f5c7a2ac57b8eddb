"""Build the one :class:`~worker.service.RemovalService` of a worker process.

Called once when the Celery worker starts (``worker.tasks.ServiceStep``): loads the model from the
state directory (on CUDA when available, unless ``CERTREMOVE_DEVICE`` says otherwise), connects
to Redis, starts the operator metrics endpoint (with the build info, the ``process_*`` metrics and
the backlog read from Redis at each scrape, ``worker.metrics``) and wires the collaborators
together. Before it serves (before its metrics endpoint answers), the model computes two removal
steps and throws them away (:func:`warm_up`): the first steps of a process paid for lazy set-up,
a latency spike of up to several hundred ms for the first requests.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry

from producer.client import redis_py_url
from worker.doorbell import Doorbell, SendTask
from worker.errors import StateDamagedError, StateLockedError, StateMissingError
from worker.integrity import no_model_message, state_contents, verify_against_ledger
from worker.lease import Lease
from worker.ledger import LEDGER_NAME, Ledger, LedgerDamagedError
from worker.metrics import ServiceMetrics
from worker.release_gate import ReleaseOptions
from worker.retrain import PipelineRetrain
from worker.service import RemovalService
from worker.settings import Settings, SettingsError
from worker.stream import RequestStream

if TYPE_CHECKING:
    from core.data import Dataset
    from core.model import Model

log = logging.getLogger("certremove.worker")


@dataclass
class Runtime:
    """What a worker process holds: the service and where its metrics are served."""

    service: RemovalService
    metrics_port: int


def load_model(
    settings: Settings, ledger: Ledger | None = None, *, check_ledger: bool = True
) -> Model:
    """The current model of ``settings.state_dir``, verified (checksums and invariants, by
    ``core.load_model``) and checked against the removal ledger: every sample id the ledger says
    was removed must be removed in it (the ids ``ledger`` holds in memory, else read from the
    ledger files).

    Raises:
        StateMissingError: no model there (run ``certremove train`` first, in a new directory).
        StateDamagedError: a damaged CURRENT or snapshot, or rows alive that the ledger says were
            removed (the message says to run ``certremove state recover``).
    """
    import torch  # noqa: PLC0415 - torch is loaded only in the worker process, never by producers

    import core  # noqa: PLC0415

    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))

    state_dir = settings.state_dir
    if not (state_dir / "CURRENT").exists():
        error = StateDamagedError if state_contents(state_dir) else StateMissingError
        raise error(no_model_message(state_dir))
    try:
        model = core.load_model(state_dir, device=settings.device)
    except core.errors.StateError as exc:
        raise StateDamagedError(str(exc)) from exc
    if check_ledger:
        verify_against_ledger(model, state_dir, None if ledger is None else ledger.removed_ids)
    model.solve_options = dataclasses.replace(
        model.solve_options,
        hessian=settings.hessian,
        defer_refactor=settings.background_refactor,
    )
    return model


def warm_up(model: Model) -> None:
    """Removal steps computed and thrown away (``core.Model.warm_up``: the model is
    unchanged). A failure is logged and start-up goes on: the first batch then pays the set-up,
    and meets the error itself if it is real."""
    t0 = time.perf_counter()
    try:
        model.warm_up()
    except Exception as exc:  # noqa: BLE001 - an optimisation: never fails the start
        log.warning("warm-up step failed (%s: %s)", type(exc).__name__, str(exc)[:200])
        return
    log.info("warm-up step: %.2f s", time.perf_counter() - t0)


def pipeline_retrainer(settings: Settings) -> PipelineRetrain | None:
    """The full-pipeline retrain (``core.pipeline``) when enabled and the source data is known."""
    if not settings.pipeline_retrain or settings.data_dir is None:
        return None
    data_dir, device = settings.data_dir, settings.device

    def run(model: Model, pending_rows: list[int]) -> tuple[Dataset, Model]:
        from core.pipeline import retrain_pipeline  # noqa: PLC0415

        return retrain_pipeline(model, data_dir=data_dir, pending_rows=pending_rows, device=device)

    return run


def _pipeline_off_reason(settings: Settings) -> str:
    if not settings.pipeline_retrain:
        return "the operator disabled full-pipeline retrains (CERTREMOVE_PIPELINE_RETRAIN=0)"
    return "no source data for a full-pipeline retrain is configured (CERTREMOVE_DATA_DIR)"


def release_options(settings: Settings) -> ReleaseOptions:
    """Where and when to release, and the receipt signer (``CERTREMOVE_RECEIPT_KEY``; unset:
    no receipts, one warning line).

    Raises:
        SettingsError: the receipt key cannot be read or is not an Ed25519 private key.
    """
    from worker.receipts import ReceiptKeyError, ReceiptSigner  # noqa: PLC0415
    from worker.releases import ReleasePolicy  # noqa: PLC0415

    signer = None
    if settings.receipt_key is None:
        log.warning(
            "CERTREMOVE_RECEIPT_KEY is not set: no removal receipts are signed "
            "('certremove keys init --out DIR' makes a key pair)"
        )
    else:
        try:
            signer = ReceiptSigner(settings.receipt_key)
        except ReceiptKeyError as exc:
            raise SettingsError(f"CERTREMOVE_RECEIPT_KEY: {exc}") from exc
    return ReleaseOptions(
        release_dir=settings.releases_dir,
        policy=ReleasePolicy.parse(settings.release_policy),
        signer=signer,
    )


#: socket timeouts (seconds) of the client that reads the backlog at scrape time
BACKLOG_TIMEOUT_S = 1.0


def package_version() -> str:
    """The installed ``certremove`` version (``unknown`` when run from a bare checkout)."""
    try:
        return importlib.metadata.version("certremove")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_metrics(settings: Settings, model: Model) -> ServiceMetrics:
    """The worker's metrics on a registry of their own: the service's, ``process_*``, the build
    info, and the backlog read at scrape time by a Redis client of their own (short timeouts: a
    scrape never hangs on Redis)."""
    import torch  # noqa: PLC0415 - loaded already with the model

    metrics = ServiceMetrics(CollectorRegistry(), process=True)
    metrics.set_build_info(
        version=package_version(),
        torch=str(torch.__version__),
        device=str(model.device),
        model=settings.model,
    )
    backlog_client = redis.Redis.from_url(
        redis_py_url(settings.broker_url),
        socket_timeout=BACKLOG_TIMEOUT_S,
        socket_connect_timeout=BACKLOG_TIMEOUT_S,
        **settings.tls_options(),
    )
    metrics.watch_backlog(backlog_client, settings.model)
    return metrics


def redis_client(settings: Settings) -> redis.Redis:
    """The worker's redis-py client (stream, ledger, statuses, lease, doorbell, releases).

    Every connect and every reply waits at most ``settings.redis_timeout`` seconds: without a
    timeout a Redis that stops answering but keeps the connection open (a partition, a half-open
    connection after a failover) would hold the drain, the lease renewal and the read-ahead
    thread forever; with it the call fails with ``redis.TimeoutError``, an infrastructure fault
    (``worker.faults``: backoff, then a fresh connection). One try per command (redis-py's
    default for a client built from a URL): no retry multiplies the timeout.
    """
    return redis.Redis.from_url(
        redis_py_url(settings.broker_url),
        health_check_interval=30,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        **settings.tls_options(),
    )


#: state directories this process holds the worker lock of (path -> open lock file)
_HELD: dict[Path, Any] = {}
LOCK_NAME = ".worker.lock"


def holds_state_lock(state_dir: Path) -> bool:
    """Whether this process holds the worker lock of ``state_dir`` (it is the worker)."""
    return Path(state_dir).resolve() in _HELD


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
        StateMissingError: no model there, or a damaged ledger.
        worker.lease.LeaseHeldError: another worker (any host) serves the model.
        worker.state_marker.StateBehindError: another state directory served the model last.
    """
    releases = release_options(settings)  # a bad receipt key is a configuration error
    model = load_model(settings, check_ledger=False)  # checked below, once the ledger is read
    lock_state_dir(settings.state_dir)
    client = redis_client(settings)
    # One owner per model across hosts: refused here while another worker holds the lease, or
    # when another state directory (or a later snapshot of this one) served the model last.
    lease = Lease(
        client, settings.model, settings.consumer, settings.state_dir, ttl_ms=settings.lease_ttl_ms
    )
    lease.acquire()
    try:
        ledger = Ledger(
            client,
            settings.model,
            settings.state_dir / LEDGER_NAME,
            status_ttl=settings.status_ttl,
            rotate_bytes=int(settings.ledger_rotate_mb * 2**20),
            fence=lease.fence_token,
            lease_ttl_ms=settings.lease_ttl_ms,
        )
        # the ledger read once, for the service and for this check
        verify_against_ledger(model, settings.state_dir, ledger.removed_ids)
    except LedgerDamagedError as exc:
        lease.release()
        raise StateMissingError(str(exc)) from exc
    except StateMissingError:
        lease.release()
        raise
    # the lease is renewed from here on: the warm-up (two Newton steps, a Hessian on a large
    # model) must not let it lapse while another worker waits for it
    lease.start()
    try:
        warm_up(model)  # before the metrics endpoint answers: launchers wait for it
        metrics = build_metrics(settings, model)
    except BaseException:
        lease.release()
        raise
    service = RemovalService(
        model=model,
        state_dir=settings.state_dir,
        stream=RequestStream(
            client, settings.model, settings.consumer, claim_idle_ms=settings.claim_idle_ms
        ),
        ledger=ledger,
        metrics=metrics,
        doorbell=Doorbell(client, settings.model, send_task),
        send_task=send_task,
        max_batch=settings.max_batch,
        slice_seconds=settings.slice_seconds,
        max_failures=settings.max_failures,
        reload=lambda: load_model(settings, ledger),
        pipeline=pipeline_retrainer(settings),
        pipeline_off_reason=_pipeline_off_reason(settings),
        retrain_lead=settings.retrain_lead,
        lease=lease,
        stream_retention=settings.stream_retention,
        max_backoff=settings.max_backoff,
        keep_snapshots=settings.keep_snapshots,
        releases=releases,
    )
    # The model, its data and the id index live as long as the process: keep them out of the
    # cyclic collector's generations (full collections were a visible share of each batch).
    gc.freeze()
    metrics.beat()  # serving from now on: the event loop beats next (worker.tasks)
    # the endpoint answers once the service is built and has beaten: a launcher that waits for
    # it (worker.launcher.wait_ready) never reads a page without a heartbeat
    port = 0
    if serve_metrics:
        try:
            port = metrics.serve(settings.metrics_port, settings.metrics_addr)
        except BaseException:
            lease.release()
            raise
    dev = model.device
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
