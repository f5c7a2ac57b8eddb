"""A snapshot's step log: the removal steps persisted after it, appended to one file.

A snapshot costs a directory, four files, three fsync rounds and the deletion of the oldest one
(5-8 ms on a 2-vCPU VM, 4 ms of it CPU); a step appended here costs one write and one
``fdatasync`` (benchmarks/README.md, "What would move the steady p99"). The log of snapshot
``snapshots/<name>`` is ``snapshots/<name>.log``. Each record holds what a step changed: the rows
it removed, the weights after it, the whole JSON state a snapshot would hold (budget used,
counters, its sequence number) and the journal of answers a snapshot would hold. Loading a
snapshot applies its log's records in order (:func:`apply_records`); the state it ends on is
checked like a snapshot (:mod:`core.invariants`).

A record on disk::

    b"CRSL" | payload length (u64 LE) | its complement (u64 LE) | sha256 of the payload (32 bytes)
    | payload
    payload = header length (u32 LE) | header (JSON, UTF-8) | rows (i64 LE) | weights (f64 LE)

Written with one ``write`` and an ``fdatasync`` (the file's creation also fsyncs the directory).
A crash mid-append leaves a torn last record: fewer bytes than its prefix, zeros, a whole prefix
whose payload runs past the end of the file, or a whole record with a bad checksum and nothing
after it. It was never acknowledged (a step is answered once its record is durable), so reading
drops it. Anything else is damage (:class:`StateDamagedError`): a length that does not match its
complement (so a damaged length is never taken for a tear, which would drop the records after
it), a bad checksum with records after it, a record of another snapshot or out of order. A
damaged *last* record reads like a torn one; had it been answered, the state record in Redis
(which names it) and the removal ledger (whose rows it removed) both refuse the directory at
start. A writer never appends after a torn record: a process appends only to a log it started
itself on a snapshot it wrote (``core.stored.StoredModel.log_step``), and a restart begins a
snapshot. Records are numbered from the snapshots' sequence: ``base + 1``, ``base + 2``, ...
(:func:`max_seq` lets a new snapshot's number pass them).

Never ``b``: a record holds what a snapshot holds, no more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import compact_json
from core.durable import fsync_dir
from core.errors import StateDamagedError
from core.snapshots import LOG_SUFFIX, damaged

__all__ = [
    "LOG_SUFFIX",
    "StepRecord",
    "append_record",
    "apply_records",
    "log_path",
    "max_seq",
    "read_log",
]

MAGIC = b"CRSL"
#: the record format written (``"format"`` in each header)
RECORD_FORMAT = 1
_PREFIX = struct.Struct("<4sQQ32s")  # magic, payload length, its complement, sha256
_MASK = (1 << 64) - 1
_HEADER_LEN = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One step of a log: its header (``base``, ``seq``, ``state``, ``journal``), the rows it
    removed and the weights after it."""

    header: dict[str, Any]
    rows: np.ndarray
    weights: np.ndarray

    @property
    def seq(self) -> int:
        return int(self.header["seq"])

    @property
    def journal(self) -> dict[str, Any] | None:
        value = self.header.get("journal")
        return value if isinstance(value, dict) else None


def log_path(root: Path, name: str) -> Path:
    """The step log of snapshot ``name`` of the state directory ``root``."""
    return Path(root) / "snapshots" / f"{name}{LOG_SUFFIX}"


def encode_record(
    *,
    base: str,
    state: dict[str, Any],
    rows: np.ndarray,
    weights: np.ndarray,
    journal: dict[str, Any] | None,
) -> bytes:
    """The bytes of one record (see the module docstring)."""
    header = {
        "format": RECORD_FORMAT,
        "base": base,
        "seq": int(state["seq"]),
        "rows": int(rows.size),
        "shape": list(weights.shape),
        "state": state,
        "journal": journal,
    }
    # compact and strict (no NaN); the journal, every answer of the step, is most of it
    head = compact_json.dumps(header)
    payload = b"".join(
        (
            _HEADER_LEN.pack(len(head)),
            head,
            np.ascontiguousarray(rows, dtype="<i8").tobytes(),
            np.ascontiguousarray(weights, dtype="<f8").tobytes(),
        )
    )
    digest = hashlib.sha256(payload).digest()
    return _PREFIX.pack(MAGIC, len(payload), ~len(payload) & _MASK, digest) + payload


def append_record(path: Path, record: bytes) -> None:
    """Append ``record`` to the log at ``path`` and make it durable (``fdatasync``; a new file's
    directory entry is fsynced too). A write that fails part-way is cut back, as a ledger line
    is; when the cut fails too the log ends on a torn record, which no reader counts."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def read_log(root: Path, name: str) -> list[StepRecord]:
    """The whole records of snapshot ``name``'s log, in order (none without a log); a torn last
    record is dropped.

    Raises:
        StateDamagedError: a record that is not the torn last one does not parse or fails its
            checksum, or a record belongs to another snapshot or is out of order.
    """
    path = log_path(root, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise damaged(root, path, f"cannot be read ({exc})") from exc
    out: list[StepRecord] = []
    pos, size = 0, len(data)
    while pos < size:
        if size - pos < _PREFIX.size:
            break  # a torn last record (short)
        magic, length, check, digest = _PREFIX.unpack_from(data, pos)
        if magic != MAGIC:
            if not any(memoryview(data)[pos:]):
                break  # a torn last record: zeros where a crash grew the file
            raise damaged(root, path, f"has no record at byte {pos}")
        if check != ~length & _MASK:
            raise damaged(root, path, f"has a record at byte {pos} whose length is damaged")
        start, end = pos + _PREFIX.size, pos + _PREFIX.size + length
        if end > size:
            break  # a torn last record (its length intact: its payload is not all there)
        payload = data[start:end]
        if hashlib.sha256(payload).digest() != digest:
            if end == size:
                break  # a torn last record (its length written, not all its bytes)
            raise damaged(root, path, f"has a record at byte {pos} that fails its checksum")
        out.append(_parse(root, path, pos, payload))
        pos = end
    last = int(name)
    for rec in out:
        if rec.header.get("base") != name:
            raise damaged(root, path, f"holds a record of snapshot {rec.header.get('base')!r}")
        if rec.seq <= last:
            raise damaged(root, path, f"has record {rec.seq} after {last}: out of order")
        last = rec.seq
    return out


def max_seq(root: Path) -> int:
    """An upper bound on the numbers of the records in the state directory's step logs (0 when
    there are none): a log on snapshot ``base`` numbers its records ``base + 1``, ``base + 2``,
    ..., so ``base`` plus the records it holds, torn or not (their prefixes walked, nothing
    hashed). A new snapshot numbered past it never takes a number a record has."""
    top = 0
    try:
        logs = [p for p in (Path(root) / "snapshots").iterdir() if p.name.endswith(LOG_SUFFIX)]
    except OSError:
        return 0
    for log in logs:
        base = log.name.removesuffix(LOG_SUFFIX)
        if not base.isdigit():
            continue
        count, pos = 0, 0
        try:
            with open(log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                while pos < size:
                    f.seek(pos)
                    prefix = f.read(_PREFIX.size)
                    count += 1
                    if len(prefix) < _PREFIX.size or prefix[:4] != MAGIC:
                        break
                    pos += _PREFIX.size + _PREFIX.unpack(prefix)[1]
        except OSError:
            count += 256  # unreadable: as many as a log may hold
        top = max(top, int(base) + count)
    return top


def _parse(root: Path, path: Path, pos: int, payload: bytes) -> StepRecord:
    def bad(what: str) -> StateDamagedError:
        return damaged(root, path, f"has a bad record at byte {pos}: {what}")

    try:
        (head_len,) = _HEADER_LEN.unpack_from(payload, 0)
        header = json.loads(payload[4 : 4 + head_len])
    except (struct.error, ValueError) as exc:
        raise bad(f"its header does not parse ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != RECORD_FORMAT:
        raise bad(f"unknown format {header.get('format') if isinstance(header, dict) else None!r}")
    n_rows, shape, state = header.get("rows"), header.get("shape"), header.get("state")
    if (
        not isinstance(n_rows, int)
        or n_rows < 0
        or not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(v, int) and v > 0 for v in shape)
        or not isinstance(state, dict)
        or not isinstance(header.get("seq"), int)
        or state.get("seq") != header["seq"]
    ):
        raise bad("its header is malformed")
    body = payload[4 + head_len :]
    n_weights = shape[0] * shape[1]
    if len(body) != 8 * (n_rows + n_weights):
        raise bad("its length does not match its header")
    rows = np.frombuffer(body, dtype="<i8", count=n_rows).astype(np.int64)
    weights = np.frombuffer(body, dtype="<f8", offset=8 * n_rows).reshape(shape).copy()
    return StepRecord(header=header, rows=rows, weights=weights)


def apply_records(
    root: Path,
    name: str,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    records: list[StepRecord],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state and tensors of snapshot ``name`` after its log's ``records``: each removes its
    rows (alive until then) and sets the weights and the JSON state. What a step cannot change
    (the dataset, the hyper-parameters, the classes, the budget) must be the snapshot's.

    Raises:
        StateDamagedError: a record that could not follow the state before it.
    """
    if not records:
        return state, tensors
    path = log_path(root, name)
    alive = tensors["alive"].clone()
    weights = tensors["weights"]
    fixed = ("hyper", "classes", "binary", "budget_total", "n_rows", "dataset_sha256")
    for rec in records:
        new = rec.header["state"]
        for key in fixed:
            if key in state and key in new and new[key] != state[key]:
                raise damaged(root, path, f"record {rec.seq} changes {key}")
        if list(rec.weights.shape) != list(weights.shape):
            raise damaged(root, path, f"record {rec.seq} has weights of another shape")
        rows = torch.from_numpy(rec.rows)
        if rows.numel() and (
            int(rows.min()) < 0 or int(rows.max()) >= alive.numel() or not bool(alive[rows].all())
        ):
            raise damaged(root, path, f"record {rec.seq} removes a row that is not alive")
        alive[rows] = 0
    # the JSON state and the weights are whole in each record: the last one's hold
    weights = torch.from_numpy(records[-1].weights).to(weights.dtype)
    return {**state, **records[-1].header["state"]}, {**tensors, "alive": alive, "weights": weights}
