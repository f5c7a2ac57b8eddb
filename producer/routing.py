"""Celery routing for clients of the service: task names, queues per model, and a config dict.

A Celery client that does not use :class:`producer.Client` sends ``certremove.remove`` to the
model's queue. This module needs neither torch, ``core`` nor the worker::

    from celery import Celery
    from producer import routing

    app = Celery(broker="redis://redis:6379/0")
    app.conf.update(routing.celery_config("digits"))
    result = app.send_task(routing.TASK_REMOVE, kwargs={"sample_ids": [17, 42]})
    # no request_id given: the task id is the request id; the status is the hash
    # certremove:digits:status:<result.id> (producer.Client("...", model="digits").status(...))

There is **no result backend**: ``result.get()`` never returns. The outcome of a request lives in
its status hash ``certremove:{model}:status:{request_id}`` (``producer.schema.status_key``).

Task signatures (keyword arguments; JSON only):

- ``certremove.remove(request_id=None, sample_ids=[...], requested_at=None)`` on queue
  ``certremove.{model}``: append one request (1 to 10,000 integer or string sample ids) to the
  model's stream; ``request_id`` defaults to the Celery task id, ``requested_at`` (Unix seconds)
  to the time the worker takes the task.
- ``certremove.drain()`` on ``certremove.{model}``: a wake-up (the worker sends these itself).
- ``certremove.retrain()`` on ``certremove.{model}.retrain``: sent by the worker only.
"""

from __future__ import annotations

from typing import Any

from producer import schema

TASK_REMOVE = schema.TASK_REMOVE
TASK_DRAIN = schema.TASK_DRAIN
TASK_RETRAIN = schema.TASK_RETRAIN
#: the keyword arguments of each task (see the module docstring)
TASK_KWARGS: dict[str, tuple[str, ...]] = {
    TASK_REMOVE: ("request_id", "sample_ids", "requested_at"),
    TASK_DRAIN: (),
    TASK_RETRAIN: (),
}


def queue(model: str) -> str:
    """The queue of ``certremove.remove`` and ``certremove.drain`` for ``model``."""
    return schema.queue_name(schema.check_model_name(model))


def retrain_queue(model: str) -> str:
    """The queue of ``certremove.retrain`` for ``model`` (the worker consumes it first)."""
    return schema.retrain_queue_name(schema.check_model_name(model))


def task_routes(model: str) -> dict[str, dict[str, str]]:
    """Celery ``task_routes`` sending each ``certremove.*`` task to ``model``'s queue."""
    return {
        TASK_REMOVE: {"queue": queue(model)},
        TASK_DRAIN: {"queue": queue(model)},
        TASK_RETRAIN: {"queue": retrain_queue(model)},
    }


def celery_config(model: str) -> dict[str, Any]:
    """What a client app needs (``app.conf.update(celery_config(model))``): JSON messages, the
    routes of :func:`task_routes`, and results ignored (the service has no result backend)."""
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_routes": task_routes(model),
    }
