"""The Celery app of the worker: ``celery -A worker.app worker -P solo`` starts it.

JSON only, late acks, results ignored, one solo-pool process that owns the model. The model's
retrain queue is listed first and polled with ``queue_order_strategy="priority"``, so a retrain
waits at most one drain time slice. Celery messages are only wake-ups: the Redis Stream is the
durable record (docs/design.md "Doorbell"), so the visibility timeout can stay moderate.

Settings come from ``CERTREMOVE_*`` variables, read once here: this module is the entry point.
Give the service a Redis database of its own (kombu's ``unacked`` keys are shared by every Celery
app on a database).

Importing it is cheap (no ``core``, no torch: ``celery -A worker.app inspect ping`` answers in
about a second); the worker process loads the model in its service bootstep (``worker.tasks``).
Celery's logging goes through :func:`worker.logs.configure` (``CERTREMOVE_LOG_FORMAT``). Clients
route tasks with ``producer.routing`` (the same names and queues, without this module).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from kombu import Queue

from producer import routing
from worker import logs, tasks
from worker.settings import Settings


def create_app(settings: Settings) -> Celery:
    """A configured Celery app serving ``settings.model``."""
    app = Celery("certremove", broker=settings.broker_url, set_as_current=False)
    queue, retrain_queue = (
        routing.queue(settings.model),
        routing.retrain_queue(settings.model),
    )
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        # kombu waits forever by default: a Redis that stops answering without closing the
        # connection would hold a publish or an ack, and with it the event loop, for good. A
        # timeout is a connection error to Celery: it reconnects (broker_connection_max_retries).
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        # The event loop reads BRPOP's reply only once the socket is readable, so no socket
        # timeout fires there: kombu drops a BRPOP connection whose reply is overdue by this
        # interval, checked as often (a hung one goes within 1 + 2 x redis_timeout s, not 51 s).
        "health_check_interval": settings.redis_timeout,
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_pool="solo",
        worker_concurrency=1,
        task_queues=[Queue(retrain_queue), Queue(queue)],
        task_default_queue=queue,
        task_routes=routing.task_routes(settings.model),
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        # Bounded (Celery's default is 100 retries, about 50 min): past it the worker exits with
        # status 4 and its supervisor restarts it (worker.fatal).
        broker_connection_max_retries=settings.broker_max_retries,
        # Drops malformed broker messages instead of dying on them; ends the worker non-zero when
        # the broker connection is lost for good (worker.consumer).
        worker_consumer="worker.consumer:Consumer",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
    )
    if settings.tls_options():
        # rediss://: without options kombu would fall back to CERT_NONE (an unverified server),
        # and it takes the URL's ssl_* parameters instead of broker_use_ssl: merged options only.
        app.conf.broker_url = settings.celery_broker_url()
        app.conf.broker_use_ssl = settings.tls_options()
    app.conf.certremove_settings = settings
    tasks.register(app, settings)
    return app


def install_logging(settings: Settings) -> None:
    """Make Celery log through :func:`worker.logs.configure` in ``settings.log_format`` (its
    ``setup_logging`` signal: with a receiver, Celery configures no logging of its own)."""

    def setup(loglevel: Any = None, **_: Any) -> None:
        logs.configure(loglevel or "INFO", settings.log_format, model=settings.model)
        if settings.log_format == "json":
            logs.celery_prints_as_json(settings.model)

    signals.setup_logging.connect(setup, weak=False)


settings = Settings.from_env()
app = create_app(settings)
install_logging(settings)
