"""A model at a glance (``certremove status`` without a request id): what its worker published
in the hash ``certremove:{model}:info``, the backlog of its stream and its dead letters.

The worker writes the hash at every refresh of the model (at start, after every persisted step
and retrain: ``worker/info.py``), all fields at once (``HSET``); an empty value means "none"
(no count trigger, no test split, no retrain since the history began). Its fields:

| field | value |
| --- | --- |
| ``version`` | model version (the noise epoch: +1 at every retrain) |
| ``accounting`` | ``exact`` or ``bound`` |
| ``budget_used``, ``budget_limit`` | budget used by this epoch and its limit (``budget_total``) |
| ``removed_in_epoch``, ``max_removals`` | rows removed in this epoch, and its count trigger |
| ``training_samples`` | training rows left |
| ``test_accuracy`` | test accuracy of this version (latest measurement) |
| ``epsilon``, ``delta`` | ``model.guarantee()`` (the head's, plus a DP extractor's share) |
| ``certified`` | ``1`` when the noise certifies (no seed), else ``0`` |
| ``device`` | where the model lives (``cpu``, ``cuda:0``) |
| ``last_retrain_at``, ``last_retrain_reason`` | the last retrain the state directory's history knows |
| ``updated_at`` | when the worker wrote the hash (an idle worker does not rewrite it: its age says nothing about liveness, ``certremove health`` does) |
| ``consumer`` | the worker's consumer name |

**Operator only.** The budget figures depend on the secret noise draw, like the metrics endpoint
(docs/design.md "Secrets and limits"): give this Redis database to the service and its operators
only. Nothing here names a sample id.

A model no worker has published yet has no hash: :func:`read_overview` still reads the backlog
(requests may wait for a worker that never started), with ``published`` False and every model
field None; ``certremove status`` then exits 1 (and with ``--json`` still prints that object).
"""

from __future__ import annotations

import time
from typing import Any

import redis
from rich.markup import escape
from rich.table import Table

from producer import schema
from producer.backlog import read_backlog

#: the hash's fields, in the order ``certremove status`` shows them
INFO_FIELDS = (
    "version",
    "accounting",
    "budget_used",
    "budget_limit",
    "removed_in_epoch",
    "max_removals",
    "training_samples",
    "test_accuracy",
    "epsilon",
    "delta",
    "certified",
    "device",
    "last_retrain_at",
    "last_retrain_reason",
    "updated_at",
    "consumer",
)
_INT = {"version", "removed_in_epoch", "max_removals", "training_samples"}
_FLOAT = {"budget_used", "budget_limit", "test_accuracy", "epsilon", "delta"}
_TIME = {"last_retrain_at", "updated_at"}
_BACKLOG = ("stream_length", "undelivered", "pending", "oldest_age_seconds", "waiting")


def encode_info(fields: dict[str, Any]) -> dict[str, str]:
    """Hash values of the info fields (None -> ``""``, bools -> ``1``/``0``, floats by repr)."""
    out: dict[str, str] = {}
    for name in INFO_FIELDS:
        value = fields.get(name)
        if value is None:
            out[name] = ""
        elif isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, float):
            out[name] = repr(value)
        else:
            out[name] = str(value)
    return out


def decode_info(raw: dict[Any, Any]) -> dict[str, Any]:
    """The typed fields of an info hash as read from Redis (empty dict: no hash). Fields the hash
    lacks, empty or unreadable values are None."""
    text = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }
    if not text:
        return {}
    out: dict[str, Any] = {}
    for name in INFO_FIELDS:
        value = text.get(name, "")
        if value == "":
            out[name] = None
        elif name in _INT:
            out[name] = int(value) if value.lstrip("-").isdigit() else None
        elif name in _FLOAT or name in _TIME:
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = None
        elif name == "certified":
            out[name] = value == "1"
        else:
            out[name] = value
    return out


def read_overview(client: redis.Redis, model: str, now: float) -> dict[str, Any]:
    """The overview of ``model`` at wall time ``now`` (the ``certremove status --json`` object):
    ``model``, ``published``, ``version``, ``accounting``, ``budget_used``, ``budget_limit``,
    ``budget_used_ratio``, ``removed_in_epoch``, ``max_removals``, ``backlog`` (stream_length,
    undelivered, pending, oldest_age_seconds, waiting), ``dead_letters``, ``last_retrain_at``,
    ``last_retrain_reason``, ``guarantee`` (epsilon, delta), ``certified``, ``test_accuracy``,
    ``training_samples``, ``device``, ``updated_at``, ``age_seconds`` (since ``updated_at``)
    and ``worker`` (the consumer name).

    Raises:
        redis.RedisError: Redis does not answer.
    """
    info = decode_info(client.hgetall(schema.info_key(model)))
    backlog = read_backlog(client, model, now).to_json()
    used, limit = info.get("budget_used"), info.get("budget_limit")
    updated = info.get("updated_at")
    return {
        "model": model,
        "published": bool(info),
        "version": info.get("version"),
        "accounting": info.get("accounting"),
        "budget_used": used,
        "budget_limit": limit,
        "budget_used_ratio": (used / limit if used is not None and limit else None),
        "removed_in_epoch": info.get("removed_in_epoch"),
        "max_removals": info.get("max_removals"),
        "training_samples": info.get("training_samples"),
        "test_accuracy": info.get("test_accuracy"),
        "backlog": {k: backlog[k] for k in _BACKLOG},
        "dead_letters": backlog["dead_letters"],
        "last_retrain_at": info.get("last_retrain_at"),
        "last_retrain_reason": info.get("last_retrain_reason"),
        "guarantee": {"epsilon": info.get("epsilon"), "delta": info.get("delta")},
        "certified": info.get("certified"),
        "device": info.get("device"),
        "updated_at": updated,
        "age_seconds": None if updated is None else max(0.0, now - updated),
        "worker": info.get("consumer"),
    }


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f"{stamp} ({_ago(now - at)})"


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


def overview_rows(ov: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """The ``(what, value)`` rows of the human overview of :func:`read_overview`'s object."""
    ratio = ov["budget_used_ratio"]
    budget = f"{_num(ov['budget_used'])} / {_num(ov['budget_limit'])}"
    if ratio is not None:
        budget += f" ({ratio:.0%})"
    epoch = str(_num(ov["removed_in_epoch"], "{}"))
    epoch += " (no count trigger)" if ov["max_removals"] is None else f" / {ov['max_removals']}"
    g = ov["guarantee"]
    guarantee = f"(epsilon, delta) = ({_num(g['epsilon'])}, {_num(g['delta'])})"
    if ov["certified"] is False:
        guarantee += ", NOT certified (seeded noise: tests only)"
    b = ov["backlog"]
    backlog = f"{b['waiting']} waiting ({b['undelivered']} undelivered, {b['pending']} pending)"
    if b["waiting"]:
        backlog += f", oldest {_num(b['oldest_age_seconds'], '{:.1f}')} s"
    backlog += f"; stream length {b['stream_length']}"
    retrain = _when(ov["last_retrain_at"], now)
    if ov["last_retrain_reason"]:
        retrain += f", reason {ov['last_retrain_reason']}"
    return [
        ("version", _num(ov["version"], "{}")),
        ("accounting", ov["accounting"] or "-"),
        ("budget used / limit", budget),
        ("epoch removals", epoch),
        ("training rows", _num(ov["training_samples"], "{:,}")),
        ("test accuracy", _num(ov["test_accuracy"], "{:.4f}")),
        ("guarantee", guarantee),
        ("backlog", backlog),
        ("dead letters", str(ov["dead_letters"])),
        ("last retrain", retrain),
        ("worker", f"{ov['worker'] or '-'} on {ov['device'] or '-'}"),
        ("updated", _when(ov["updated_at"], now)),
    ]


def overview_table(ov: dict[str, Any], now: float) -> Table:
    """A rich table of :func:`read_overview`'s object."""
    table = Table(title=f"certremove model {ov['model']} (operator view)")
    table.add_column("")
    table.add_column("value")
    for name, value in overview_rows(ov, now):
        table.add_row(name, escape(value))
    return table
