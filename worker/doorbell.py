"""The owned doorbell (docs/design.md "Request life cycle", step 2 "Doorbell").

Producers and the worker ring with the one ``producer.doorbell.ring`` (``SET doorbell 1 NX PX
DOORBELL_MS``, then ``certremove.drain`` only when that succeeds). A running drain holds the bell
(so rings during it are no-ops), and on exit releases it and looks at the stream once more,
ringing again if anything arrived: at most one drain message is in flight and no wake-up is lost.
"""

from __future__ import annotations

import redis

from producer import schema
from producer.doorbell import SendTask, ring

__all__ = ["Doorbell", "SendTask"]


class Doorbell:
    """The doorbell of one model.

    Args:
        client: redis-py client.
        model: the model name.
        send_task: how to send ``certremove.drain`` (no Celery import here).
    """

    def __init__(self, client: redis.Redis, model: str, send_task: SendTask) -> None:
        self.redis = client
        self.model = model
        self.key = schema.doorbell_key(model)
        self.queue = schema.queue_name(model)
        self.send_task = send_task

    def hold(self, ms: int) -> None:
        """Take (or keep) the bell for ``ms`` milliseconds, whoever rang it."""
        self.redis.set(self.key, 1, px=max(1, int(ms)))

    def release(self) -> None:
        """Let the next producer ring."""
        self.redis.delete(self.key)

    def ring(self) -> bool:
        """Send a drain unless the bell is already held; True when one was sent."""
        return ring(self.redis, self.model, self.send_task)

    def requeue(self, ms: int) -> None:
        """Keep holding the bell and send the next drain (the slice ended with work left)."""
        self.hold(ms)
        self.send_task(schema.TASK_DRAIN, self.queue)
