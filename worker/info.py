"""The model's overview hash ``certremove:{model}:info``, rewritten at every refresh of the
model (``worker.served.ServedModel.refresh_metrics``: at start, after every persisted step and
retrain) and read by ``certremove status`` without a request id (``producer/overview.py`` lists
the fields and their encoding).

**Operator only**: the budget figures depend on the secret noise draw (docs/design.md "Secrets
and limits"); the hash names no sample id. Writing it never fails a drain: a Redis error is
logged (once per failure streak) and ignored, and the next refresh writes every field again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis

from producer import schema
from producer.overview import encode_info
from worker.history import finite

if TYPE_CHECKING:
    from core.model import Model

log = logging.getLogger("certremove.worker")


def model_info(
    model: Model,
    *,
    accuracy: float | None,
    last_retrain_at: float | None,
    last_retrain_reason: str | None,
    consumer: str | None,
    now: float,
) -> dict[str, Any]:
    """The info fields of ``model`` (``producer.overview.INFO_FIELDS``)."""
    epsilon, delta = model.guarantee()
    return {
        "version": int(model.version),
        "accounting": str(model.hyper.accounting),
        "budget_used": finite(model.budget_used),
        "budget_limit": finite(model.budget_total),
        "removed_in_epoch": int(model.removed_in_epoch),
        "max_removals": None if model.max_removals is None else int(model.max_removals),
        "training_samples": int(model.n_alive),
        "test_accuracy": finite(accuracy),
        "epsilon": finite(epsilon),
        "delta": finite(delta),
        "certified": bool(model.certified),
        "device": str(model.device),
        "last_retrain_at": finite(last_retrain_at),
        "last_retrain_reason": last_retrain_reason or None,
        "updated_at": float(now),
        "consumer": consumer,
    }


class InfoPublisher:
    """Writes one model's info hash (see the module docstring).

    Args:
        client: redis-py client.
        model: the model name.
    """

    def __init__(self, client: redis.Redis, model: str) -> None:
        self.client = client
        self.key = schema.info_key(model)
        self._failing = False

    def publish(self, fields: dict[str, Any]) -> bool:
        """``HSET`` every field; returns False when Redis refused or did not answer (logged,
        never raised)."""
        try:
            self.client.hset(self.key, mapping=encode_info(fields))  # type: ignore[arg-type]
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                log.warning(
                    "cannot write the model overview %s (%s: %s); the next refresh retries",
                    self.key,
                    type(exc).__name__,
                    str(exc)[:200],
                )
            self._failing = True
            return False
        self._failing = False
        return True
