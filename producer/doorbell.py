"""Ringing a model's doorbell: the one ``ring`` of producers and the worker.

``SET certremove:{model}:doorbell 1 NX PX DOORBELL_MS`` and, only when that succeeds, send
``certremove.drain`` by name: a drain that runs holds the bell, so rings during it are no-ops and
at most one drain message is in flight (docs/design.md "Request life cycle", step 2).
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from producer import schema

#: how long a ring holds the bell (ms) before the next ring may send another drain
DOORBELL_MS = 5000

SendTask = Callable[[str, str], None]
"""``send_task(task_name, queue)``: sends a Celery task by name."""


def ring(client: redis.Redis, model: str, send_task: SendTask) -> bool:
    """Send ``certremove.drain`` for ``model`` unless the bell is held; True when one was sent."""
    if not client.set(schema.doorbell_key(model), 1, nx=True, px=DOORBELL_MS):
        return False
    send_task(schema.TASK_DRAIN, schema.queue_name(model))
    return True
