"""Which state directory served a model last (docs/operations.md): each state directory's id
(``STATE_DIR/state-id``) and current snapshot number, checked when a worker takes the model's
lease against the record Redis keeps of the model's latest (``certremove:{model}:state``, written
under the lease by ``worker.lease.Lease.mark_state``), and the operator's override that forgets
that record (``certremove owner reset``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import redis

from producer import schema

STATE_ID_FILE = "state-id"


class StateBehindError(RuntimeError):
    """This state directory is not the one that persisted the model last, or is behind it."""


def state_id(state_dir: Path) -> str:
    """The state directory's id (made once, kept in ``STATE_DIR/state-id``)."""
    path = Path(state_dir) / STATE_ID_FILE
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex
    tmp = path.with_name(f".{STATE_ID_FILE}.tmp")
    tmp.write_text(value + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return value


def snapshot_seq(state_dir: Path) -> int:
    """The sequence number of the state directory's newest persisted state: the last whole
    record of the current snapshot's step log (``core.steplog``), else the snapshot's (0 when
    unreadable)."""
    try:
        name = (Path(state_dir) / "CURRENT").read_text().strip().rsplit("/", 1)[-1]
        seq = int(name)
    except (OSError, ValueError):
        return 0
    # (imported here: the Celery app imports this module and must not load torch)
    from core.errors import StateError  # noqa: PLC0415
    from core.steplog import read_log  # noqa: PLC0415

    try:
        records = read_log(Path(state_dir), name)
    except StateError:
        return seq  # (a damaged log: loading refuses the directory anyway)
    return records[-1].seq if records else seq


def check_state(client: redis.Redis, model: str, state_dir: Path, directory_id: str) -> None:
    """Refuse a state directory (``state_dir``, whose id is ``directory_id``) that is not the
    model's latest.

    Raises:
        StateBehindError: see :meth:`worker.lease.Lease.acquire`.
    """
    key = schema.state_marker_key(model)
    marker = {as_text(k): as_text(v) for k, v in (client.hgetall(key) or {}).items()}
    if not marker:
        return  # never served (or Redis lost it): this directory starts the record
    seq = snapshot_seq(state_dir)
    if marker.get("state_id") != directory_id:
        raise StateBehindError(
            f"model {model!r} was last persisted from another state directory (id "
            f"{marker.get('state_id')}, snapshot {marker.get('seq')}, by "
            f"{marker.get('consumer')!r}); serving {state_dir} (id {directory_id}) "
            "would bring back the rows removed there. Serve the model from that directory; "
            f"if it is lost for good, `certremove owner reset --model {model}` accepts "
            "this one (requests applied only there must then be sent again)"
        )
    if seq < int(marker.get("seq", "0") or 0):
        raise StateBehindError(
            f"{state_dir} is behind the model's history: its current snapshot is {seq} "
            f"but snapshot {marker.get('seq')} was persisted (restored from an old backup?). "
            f"Restore the latest state, or run `certremove state recover --state "
            f"{state_dir}` if its newer snapshots are damaged"
        )


def reset_owner(client: redis.Redis, model: str) -> dict[str, Any]:
    """Forget which state directory served ``model`` last (the operator's override); returns
    what was recorded."""
    key = schema.state_marker_key(model)
    old = {as_text(k): as_text(v) for k, v in (client.hgetall(key) or {}).items()}
    client.delete(key)
    return old


def as_text(value: Any) -> str:
    """A Redis reply's value as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
