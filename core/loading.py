"""Reading a state directory's snapshots back (:mod:`core.persist` writes them): verified.

Loading verifies every checksum of the manifest before parsing anything, then the invariants of
the loaded state (:mod:`core.invariants`). Every failure is a :class:`core.errors.StateDamagedError`
that names the file and says what to do: a damaged state is refused, never served. Snapshots
written before manifests existed (``state.json`` format 1) load unverified, with a logged warning
(their invariants are still checked); the next save writes a verified snapshot.

This module deals in :class:`core.state.ModelState` and files; the directory's layout,
manifests and checksums are :mod:`core.snapshots`'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from core.data import Dataset, load_npz
from core.errors import StateDamagedError, StateError
from core.invariants import check_invariants
from core.snapshots import (
    DATA_NAME,
    JOURNAL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    READ_FORMATS,
    SNAP_NAME,
    STATE_FILE,
    SnapshotInfo,
    current_snapshot,
    damaged,
    read_bytes,
    read_manifest,
    snapshot_name,
    summary,
    verify_dataset,
    verify_snapshot_files,
)
from core.state import ModelState
from core.steplog import apply_records, read_log

__all__ = [
    "Loaded",
    "list_snapshots",
    "read_journal",
    "read_state",
]

log = logging.getLogger("certremove.core")


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A verified snapshot (:func:`read_state`): its state, its dataset, and ``damaged(what)``,
    the :class:`StateDamagedError` to raise when the caller finds it unusable after all."""

    name: str
    state: ModelState
    dataset: Dataset
    damaged: Callable[[str], StateDamagedError]


@dataclasses.dataclass
class _Snapshot:
    name: str
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    dataset: Dataset


# --------------------------------------------------------------------------- read and verify
def _read_snapshot(root: Path, name: str, cache: dict[str, Any]) -> _Snapshot:
    """Verify and parse one snapshot (checksums first, then the invariants).

    ``cache`` is shared between calls on one directory: datasets verified and loaded once."""
    snap = root / "snapshots" / name
    if not snap.is_dir():
        raise damaged(root, snap, "does not exist")
    manifest = read_manifest(root, snap)
    verified: set[str] = cache.setdefault("verified", set())
    if manifest is not None:
        blobs = verify_snapshot_files(root, snap, manifest)
        verify_dataset(root, snap, manifest["dataset"], verified)
    else:
        blobs = {MODEL_FILE: read_bytes(root, snap / MODEL_FILE)}
        blobs[STATE_FILE] = read_bytes(root, snap / STATE_FILE)
    state_path = snap / STATE_FILE
    state = _json_object(root, state_path, blobs[STATE_FILE])
    fmt = state.get("format")
    if fmt not in READ_FORMATS:
        raise damaged(root, state_path, f"has an unknown state format {fmt!r}")
    if manifest is None:
        if fmt != 1:
            raise damaged(root, snap / MANIFEST_FILE, "is missing")
        log.warning(
            "%s was written before snapshots carried checksums (format 1): loading it "
            "unverified; the next save writes a verified snapshot",
            snap,
        )
    data_name = state.get("dataset_file")
    if not isinstance(data_name, str) or not DATA_NAME.fullmatch(data_name):
        raise damaged(root, state_path, f"names a bad dataset file {data_name!r}")
    if manifest is not None and manifest["dataset"]["file"] != data_name:
        raise damaged(
            root,
            state_path,
            f"names {data_name}, its manifest.json {manifest['dataset']['file']}",
        )
    model_path = snap / MODEL_FILE
    try:
        tensors = load_tensors(blobs[MODEL_FILE])
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise damaged(root, model_path, f"is not a readable safetensors file ({exc})") from exc
    ds = _load_dataset(root, data_name, state, cache)
    check_invariants(root, snap, state, tensors, ds)
    return _Snapshot(name=name, state=state, tensors=tensors, dataset=ds)


def _with_log(root: Path, snap: _Snapshot) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state and tensors of a verified snapshot after the steps of its log
    (:mod:`core.steplog`), whose end state is checked like a snapshot's."""
    records = read_log(root, snap.name)
    if not records:
        return snap.state, snap.tensors
    state, tensors = apply_records(root, snap.name, snap.state, snap.tensors, records)
    check_invariants(root, root / "snapshots" / snap.name, state, tensors, snap.dataset)
    return state, tensors


def _load_dataset(
    root: Path, data_name: str, state: dict[str, Any], cache: dict[str, Any]
) -> Dataset:
    path = root / data_name
    datasets: dict[str, Any] = cache.setdefault("datasets", {})
    if data_name not in datasets:
        try:
            ds: Any = load_npz(path)
            ds.fingerprint()
        except Exception as exc:  # noqa: BLE001 - numpy and zipfile raise many types
            ds = exc
        datasets[data_name] = ds
    ds = datasets[data_name]
    if isinstance(ds, Exception):
        detail = str(ds).replace(str(path), "").strip(" :")
        raise damaged(root, path, f"is not a readable dataset file ({detail})") from ds
    if ds.fingerprint() != state.get("dataset_sha256"):
        raise damaged(root, path, "does not match the model's fingerprint in state.json")
    return ds


def read_state(directory: str | os.PathLike[str], snapshot: str | None = None) -> Loaded:
    """Verify and read the current snapshot (or the one named ``snapshot``): every checksum
    before anything is parsed, then the state's invariants (:mod:`core.invariants`); then the
    steps of its log (:mod:`core.steplog`), and the invariants of the state they end on.

    Raises:
        StateNotFoundError: no model in the directory (a new directory).
        StateDamagedError: a missing, damaged or inconsistent file (the message names it).
        InvalidInputError: a malformed ``snapshot`` name.
    """
    root = Path(directory)
    name = snapshot_name(root, snapshot)
    snap = _read_snapshot(root, name, {})
    path = root / "snapshots" / name
    state, tensors = _with_log(root, snap)
    return Loaded(
        name=name,
        state=ModelState(tensors=tensors, state=state, fingerprint=state["dataset_sha256"]),
        dataset=snap.dataset,
        damaged=lambda what: damaged(root, path, what),
    )


def read_journal(
    directory: str | os.PathLike[str], snapshot: str | None = None
) -> dict[str, Any] | None:
    """The ``journal`` saved with the current snapshot (or the one named), None when it has
    none; when its step log has records, the last record's. The snapshot's own files are
    verified against its manifest first (not its dataset).

    Raises:
        StateNotFoundError, StateDamagedError: as :func:`load_model`.
    """
    root = Path(directory)
    name = snapshot_name(root, snapshot)
    snap = root / "snapshots" / name
    if not snap.is_dir():
        raise damaged(root, snap, "does not exist")
    manifest = read_manifest(root, snap)
    path = snap / JOURNAL_FILE
    if manifest is None:
        try:
            fmt = json.loads(read_bytes(root, snap / STATE_FILE)).get("format")
        except (ValueError, AttributeError) as exc:
            raise damaged(root, snap / STATE_FILE, "is not a valid state file") from exc
        if fmt != 1:
            raise damaged(root, snap / MANIFEST_FILE, "is missing")
        if path.exists():
            raise damaged(root, path, "is not listed in a manifest (format-1 snapshot)")
        return None
    blobs = verify_snapshot_files(root, snap, manifest)
    records = read_log(root, name)
    if records:
        return records[-1].journal
    if JOURNAL_FILE not in blobs:
        return None
    return _json_object(root, path, blobs[JOURNAL_FILE])


def _json_object(root: Path, path: Path, blob: bytes) -> dict[str, Any]:
    """``blob`` (the bytes of ``path``, checksums verified) parsed as a JSON object.

    Raises:
        StateDamagedError: it is not valid JSON, or not an object.
    """
    try:
        value = json.loads(blob)
    except ValueError as exc:
        raise damaged(root, path, f"is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise damaged(root, path, "is not a JSON object")
    return value


def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot of a state directory, newest first, each verified as :func:`load_model`
    would (checksums, invariants, its step log; each dataset is read once). ``version``,
    ``saved_at`` and ``n_alive`` are the snapshot's own, before its step log."""
    root = Path(directory)
    try:
        names = [p.name for p in (root / "snapshots").iterdir() if SNAP_NAME.fullmatch(p.name)]
    except OSError:
        return []
    try:
        current: str | None = current_snapshot(root)
    except StateError:
        current = None
    cache: dict[str, Any] = {}
    out = []
    for name in sorted(names, key=int, reverse=True):
        problem: str | None = None
        try:
            _with_log(root, _read_snapshot(root, name, cache))  # a damaged log voids it too
        except StateError as exc:
            problem = str(exc).removeprefix(f"cannot load a model from {root}: ")
        version, saved_at, n_alive = summary(root / "snapshots" / name)
        out.append(
            SnapshotInfo(
                name=name,
                seq=int(name),
                version=version,
                saved_at=saved_at,
                n_alive=n_alive,
                valid=problem is None,
                problem=problem,
                current=name == current,
            )
        )
    return out
