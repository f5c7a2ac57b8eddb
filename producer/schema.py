"""The wire contract between producers and the worker (docs/design.md "Contracts").

Everything a producer needs to talk to the service lives here: Redis key names, Celery task and
queue names, stream entry fields, the request status schema and the request size limit. The worker
imports these names too, so both sides spell them once.
"""

from __future__ import annotations

import json
import re
from typing import Any

DEFAULT_MODEL = "default"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
MAX_IDS_PER_REQUEST = 10_000

TASK_DRAIN = "certremove.drain"
TASK_RETRAIN = "certremove.retrain"
TASK_REMOVE = "certremove.remove"

# Stream entry fields.
FIELD_REQUEST_ID = "request_id"
FIELD_SAMPLE_IDS = "sample_ids"
FIELD_REQUESTED_AT = "requested_at"
#: set on an entry an operator replayed from the dead-letter stream (the dead letter's entry id):
#: the worker serves it as new even though its request id was answered (dead-lettered) before
FIELD_REPLAY_OF = "replay_of"

# Request status values and fields.
STATUS_QUEUED = "queued"
STATUS_APPLIED = "applied"
STATUS_REJECTED = "rejected"
METHOD_NEWTON = "newton"
METHOD_RETRAIN = "retrain"
#: the fields of a request's answer (written in one script with the XACK, ``worker/status_script.py``)
ANSWER_FIELDS = (
    "status",
    "method",
    "model_version",
    "unknown_ids",
    "already_removed_ids",
    "reason",
    "requested_at",
    "applied_at",
)
#: every status field: the answer's, then the release that first contained the removal (set
#: once that release is out, ``worker/releases.py``)
STATUS_FIELDS = (*ANSWER_FIELDS, "released_version", "released_at")
_JSON_FIELDS = {"unknown_ids", "already_removed_ids"}
_FLOAT_FIELDS = {"requested_at", "applied_at", "released_at"}
_INT_FIELDS = {"model_version", "released_version"}

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_model_name(model: str) -> str:
    """Return ``model`` if it is a valid model name (letters, digits, ``_ . -``), else raise.

    Raises:
        ValueError: the name is empty, too long or has other characters.
    """
    if not isinstance(model, str) or not _MODEL_NAME.match(model) or not model.strip("."):
        raise ValueError(
            f"invalid model name {model!r}: use 1-64 letters, digits, '_', '.' or '-' (not only "
            "dots: the name is a directory of the release directory)"
        )
    return model


def stream_key(model: str) -> str:
    """The request log of ``model``: ``certremove:{model}:requests``."""
    return f"certremove:{model}:requests"


def dead_letter_key(model: str) -> str:
    """Entries that failed because of their own content, or unreadable, end here with the
    reason."""
    return f"certremove:{model}:deadletter"


def lease_key(model: str) -> str:
    """The model's ownership lease: the token of the one worker that may serve it."""
    return f"certremove:{model}:lease"


def lease_counter_key(model: str) -> str:
    """The lease tokens handed out so far (``INCR``: a fencing token grows with each owner)."""
    return f"certremove:{model}:lease:token"


def state_marker_key(model: str) -> str:
    """Which state directory last persisted the model, and its last snapshot (a hash)."""
    return f"certremove:{model}:state"


def failures_key(model: str) -> str:
    """The worker's own count of processing failures per stream entry id (a hash)."""
    return f"certremove:{model}:failures"


def doorbell_key(model: str) -> str:
    """The drain doorbell: held by the running drain, rung (``SET NX``) by producers."""
    return f"certremove:{model}:doorbell"


def status_key(model: str, request_id: str) -> str:
    """The status hash of one request."""
    return f"certremove:{model}:status:{request_id}"


def info_key(model: str) -> str:
    """The model's overview, written by its worker at every refresh (a hash; operator only:
    ``producer/overview.py`` lists its fields)."""
    return f"certremove:{model}:info"


def releases_key(model: str) -> str:
    """The releases of ``model`` (a stream: one entry per release, ``worker/releases.py``)."""
    return f"certremove:{model}:releases"


def release_request_key(model: str) -> str:
    """Set by ``certremove release``: the worker releases its model at its next drain or
    periodic check, then deletes it."""
    return f"certremove:{model}:release:request"


def group_name(model: str) -> str:
    """The consumer group of the workers of ``model``."""
    return f"certremove.{model}"


def queue_name(model: str) -> str:
    """Celery queue of ``certremove.drain`` and ``certremove.remove``."""
    return f"certremove.{model}"


def retrain_queue_name(model: str) -> str:
    """Celery queue of ``certremove.retrain`` (consumed first)."""
    return f"certremove.{model}.retrain"


def decode_status(raw: dict[Any, Any]) -> dict[str, Any]:
    """Turn a status hash as read from Redis into typed Python values.

    Returns an empty dict for a request nobody has seen. JSON lists come back as lists, times as
    floats, the model version as an int; absent fields are left out.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        text = value.decode() if isinstance(value, bytes) else str(value)
        if name in _JSON_FIELDS:
            try:
                out[name] = json.loads(text) if text else []
            except json.JSONDecodeError:
                out[name] = text
        elif name in _FLOAT_FIELDS:
            out[name] = float(text) if text else None
        elif name in _INT_FIELDS:
            out[name] = int(text) if text.lstrip("-").isdigit() else text
        else:
            out[name] = text
    return out
