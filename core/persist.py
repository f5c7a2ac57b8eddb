"""Model state on disk: ``safetensors`` + JSON, checksummed, replaced atomically; never ``b``.

The contract is docs/design.md "State directory".

Layout of a state directory::

    datasets/<sha256[:16]>.npz   training + test rows, written once per dataset (immutable)
    snapshots/<seq>/model.safetensors   float64 weights, alive mask, subsampling mask
    snapshots/<seq>/state.json          hyper-parameters, budget state, version, counters
    snapshots/<seq>/journal.json        optional: a caller's JSON record (``save(journal=)``)
    snapshots/<seq>/manifest.json       sha256 and size of every file above and of the dataset
                                        file the snapshot uses; written last
    CURRENT                      name of the live snapshot (replaced with os.replace)

A snapshot directory is written and fsynced under a temporary name (its ``manifest.json`` last),
renamed into place, then ``CURRENT`` is swapped; the newest ``keep`` snapshots (default 3) stay,
older ones are deleted, and so is every dataset file no kept snapshot uses. A crash at any point
leaves the previous or the new state, never a mix. ``b`` and ``g_a`` are never written: after
loading, the anchor is the loaded state and ``r0_a`` is the persisted budget used.

Loading verifies every checksum of the manifest before parsing anything, then the invariants of
the loaded state (:mod:`core.invariants`). Every failure is a :class:`core.errors.StateDamagedError`
that names the file and says what to do: a damaged state is refused, never served. Snapshots
written before manifests existed (``state.json`` format 1) load unverified, with a logged warning
(their invariants are still checked); the next save writes a verified snapshot.

This module deals in :class:`ModelState` (tensors, a JSON-able dict, a fingerprint) and files;
:meth:`core.model.Model.to_state` / :meth:`~core.model.Model.from_state` convert. The directory's
layout, manifests, checksums and pruning are :mod:`core.snapshots`'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from core.data import Dataset, load_npz, save_dataset
from core.durable import fsync_dir, fsync_together, write_file
from core.errors import InvalidInputError, StateDamagedError, StateError
from core.invariants import check_invariants
from core.snapshots import (
    DATA_NAME,
    DEFAULT_KEEP,
    FORMAT,
    JOURNAL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    READ_FORMATS,
    SNAP_NAME,
    STATE_FILE,
    SnapshotInfo,
    current_dataset_name,
    current_seq,
    current_snapshot,
    damaged,
    dataset_entry,
    file_entry,
    prune,
    read_bytes,
    read_manifest,
    snapshot_name,
    summary,
    verify_dataset,
    verify_snapshot_files,
)
from core.state import ModelState

__all__ = [
    "DEFAULT_KEEP",
    "DatasetFile",
    "FORMAT",
    "Loaded",
    "ModelState",
    "SnapshotInfo",
    "check_save_options",
    "current_snapshot",
    "list_snapshots",
    "next_seq",
    "read_journal",
    "read_state",
    "store_dataset",
    "write_snapshot",
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


# --------------------------------------------------------------------------- save
def check_save_options(journal: dict[str, Any] | None, keep: int) -> bytes | None:
    """Validate a save's ``keep`` (an int >= 1) and ``journal`` (a JSON-serialisable dict);
    returns the journal's bytes (None without one). Raises :class:`InvalidInputError`."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidInputError(f"keep must be an integer >= 1, got {keep!r}")
    if journal is None:
        return None
    if not isinstance(journal, dict):
        raise InvalidInputError(f"journal must be a dict, got {type(journal).__name__}")
    try:
        # compact and in the caller's key order: a worker's journal holds every answer of a
        # batch, and sorting its keys was most of a persist's encoding time
        return json.dumps(journal, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"journal is not JSON-serialisable: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class DatasetFile:
    """A state directory's dataset file (:func:`store_dataset`): its name and manifest entry."""

    name: str
    entry: dict[str, Any]


def store_dataset(
    directory: str | os.PathLike[str], ds: Dataset, *, replace_dataset: bool = False
) -> DatasetFile:
    """Make sure the state directory holds ``ds`` (in its stored form) as its dataset file:
    written once (immutable), fsynced. Raises :class:`StateError` when the live snapshot uses a
    different dataset and ``replace_dataset`` is False (nothing is written)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    current = current_dataset_name(root)
    data_name = f"datasets/{ds.fingerprint()[:16]}.npz"
    if current is not None and current != data_name and not replace_dataset:
        raise StateError(
            f"{root} already holds a model on a different dataset ({current}); use a new state "
            "directory (or replace_dataset=True for a full-pipeline retrain)"
        )
    data_file = root / data_name
    written = not data_file.exists()
    if written:
        data_file.parent.mkdir(exist_ok=True)
        save_dataset(data_file, ds)
        fsync_dir(data_file.parent)
    (root / "snapshots").mkdir(exist_ok=True)
    return DatasetFile(data_name, dataset_entry(root, data_name, written=written))


def next_seq(directory: str | os.PathLike[str], last: int) -> int:
    """The number of the next snapshot: after ``last`` (the caller's) and after every snapshot
    present; a snapshot's name is never reused."""
    snaps = Path(directory) / "snapshots"
    taken = [int(p.name) for p in snaps.iterdir() if SNAP_NAME.fullmatch(p.name)]
    return max([last, *taken]) + 1


def write_snapshot(
    directory: str | os.PathLike[str],
    state: ModelState,
    data: DatasetFile,
    *,
    journal: bytes | None = None,
    keep: int = DEFAULT_KEEP,
) -> Path:
    """Write ``state`` (whose ``state["seq"]`` names it, see :func:`next_seq`) as a new snapshot
    on the dataset file ``data``, with its ``manifest.json``, then point ``CURRENT`` at it and
    prune to the newest ``keep``; returns the snapshot path. A failure leaves ``CURRENT`` on
    the previous snapshot and removes what this call wrote."""
    root = Path(directory)
    snaps = root / "snapshots"
    previous = current_seq(root)
    name = f"{state.state['seq']:012d}"
    tmp = snaps / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state_json = {
        "format": FORMAT,
        "saved_at": time.time(),
        **state.state,
        "dataset_sha256": state.fingerprint,
        "dataset_file": data.name,
    }
    files = {
        MODEL_FILE: dump_tensors(state.tensors),
        STATE_FILE: json.dumps(state_json, indent=1, allow_nan=False).encode(),
    }
    if journal is not None:
        files[JOURNAL_FILE] = journal
    manifest = {
        "format": FORMAT,
        "snapshot": name,
        "files": {fname: file_entry(blob) for fname, blob in files.items()},
        "dataset": {"file": data.name, **data.entry},
    }
    try:
        for fname, blob in files.items():
            write_file(tmp / fname, blob, fsync=False)
        write_file(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode(), fsync=False)
        # every file and the directory durable before the rename publishes them (in any order
        # among themselves: together, they share the file system's journal commits)
        fsync_together([tmp / fname for fname in [*files, MANIFEST_FILE]], [tmp])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give the space back
        raise
    final = snaps / name
    os.replace(tmp, final)
    pointer = root / ".CURRENT.tmp"
    try:
        # the rename and the new pointer both durable before CURRENT names the snapshot
        write_file(pointer, f"snapshots/{name}\n".encode(), fsync=False)
        fsync_together([pointer], [snaps])
        os.replace(pointer, root / "CURRENT")
    except BaseException:
        # CURRENT still names the previous snapshot: this one would be an orphan that a retry
        # (under the next number) leaves behind, and that pruning would count as kept
        pointer.unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    fsync_dir(root)
    prune(root, keep, int(name), previous)
    return final


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
    try:
        state = json.loads(blobs[STATE_FILE])
    except ValueError as exc:
        raise damaged(root, state_path, f"is not valid JSON ({exc})") from exc
    if not isinstance(state, dict):
        raise damaged(root, state_path, "is not a JSON object")
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
    before anything is parsed, then the state's invariants (:mod:`core.invariants`).

    Raises:
        StateNotFoundError: no model in the directory (a new directory).
        StateDamagedError: a missing, damaged or inconsistent file (the message names it).
        InvalidInputError: a malformed ``snapshot`` name.
    """
    root = Path(directory)
    name = snapshot_name(root, snapshot)
    snap = _read_snapshot(root, name, {})
    path = root / "snapshots" / name
    return Loaded(
        name=name,
        state=ModelState(
            tensors=snap.tensors, state=snap.state, fingerprint=snap.state["dataset_sha256"]
        ),
        dataset=snap.dataset,
        damaged=lambda what: damaged(root, path, what),
    )


def read_journal(
    directory: str | os.PathLike[str], snapshot: str | None = None
) -> dict[str, Any] | None:
    """The ``journal`` saved with the current snapshot (or the one named), None when it has
    none. The snapshot's own files are verified against its manifest first (not its dataset).

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
    if JOURNAL_FILE not in blobs:
        return None
    try:
        journal = json.loads(blobs[JOURNAL_FILE])
    except ValueError as exc:
        raise damaged(root, path, f"is not valid JSON ({exc})") from exc
    if not isinstance(journal, dict):
        raise damaged(root, path, "is not a JSON object")
    return journal


def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot of a state directory, newest first, each verified as :func:`load_model`
    would (checksums, invariants; each dataset is read once)."""
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
            _read_snapshot(root, name, cache)
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
