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

This module writes snapshots; :mod:`core.loading` reads and verifies them. Both deal in
:class:`ModelState` (tensors, a JSON-able dict, a fingerprint) and files;
:meth:`core.stored.StoredModel.to_state` / :meth:`~core.stored.StoredModel.from_state` convert.
The directory's layout, manifests, checksums and pruning are :mod:`core.snapshots`'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save as dump_tensors

from core import compact_json
from core.data import Dataset, save_dataset
from core.durable import fsync_dir, fsync_together, write_file
from core.errors import InvalidInputError, StateError
from core.snapshots import (
    DEFAULT_KEEP,
    FORMAT,
    JOURNAL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SNAP_NAME,
    STATE_FILE,
    current_dataset_name,
    current_seq,
    dataset_entry,
    file_entry,
    prune,
)
from core.state import ModelState
from core.steplog import max_seq

__all__ = [
    "DEFAULT_KEEP",
    "DatasetFile",
    "FORMAT",
    "ModelState",
    "check_save_options",
    "next_seq",
    "store_dataset",
    "write_snapshot",
]


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
        # batch, and sorting its keys was most of a persist's encoding time (core.compact_json)
        return compact_json.dumps(journal)
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
    # past the step logs' records too (core.steplog): a model that did not write them (a new
    # one, a recovered one) must not take one of their numbers
    return max([last, *taken, max_seq(Path(directory))]) + 1


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
