"""Model state on disk: ``safetensors`` + JSON, checksummed, replaced atomically; never ``b``.

The contract is docs/design.md "State directory".

Layout of a state directory::

    datasets/<sha256[:16]>.npz   training + test rows, written once per dataset (immutable)
    snapshots/<seq>/model.safetensors   float64 weights, alive mask, subsampling mask
    snapshots/<seq>/state.json          hyper-parameters, budget state, version, counters
    snapshots/<seq>/journal.json        optional: a caller's JSON record (``save_model(journal=)``)
    snapshots/<seq>/manifest.json       sha256 and size of every file above and of the dataset
                                        file the snapshot uses; written last
    CURRENT                      name of the live snapshot (replaced with os.replace)

A snapshot directory is written and fsynced under a temporary name (its ``manifest.json`` last),
renamed into place, then ``CURRENT`` is swapped; the newest ``keep`` snapshots (default 3) stay,
older ones are deleted, and so is every dataset file no kept snapshot uses. A crash at any point
leaves the previous or the new state, never a mix. ``b`` and ``g_a`` are never written: after
loading, the anchor is the loaded state and ``r0_a`` is the persisted budget used.

Loading verifies every checksum of the manifest before parsing anything, then the invariants of
the loaded state (finite weights of the right shape, an alive mask of the right length whose count
is ``state.json``'s ``n_alive``, a finite non-negative budget, a non-negative integer version, the
dataset's fingerprint). Every failure is a :class:`core.errors.StateDamagedError` that names the
file and says what to do: a damaged state is refused, never served. Snapshots written before
manifests existed (``state.json`` format 1) load unverified, with a logged warning (their
invariants are still checked); the next save writes a verified snapshot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from core.data import Dataset, load_npz, save_dataset
from core.errors import InvalidInputError, StateDamagedError, StateError, StateNotFoundError
from core.labels import LabelCoding
from core.model import Hyper, Model
from core.train import make_problem, resolve_device

#: the ``state.json`` format written; 1 (no manifest) is still read, unverified
FORMAT = 2
READ_FORMATS = (1, 2)
DEFAULT_KEEP = 3
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
JOURNAL_FILE = "journal.json"
MANIFEST_FILE = "manifest.json"
_SNAPSHOT_FILES = (MODEL_FILE, STATE_FILE, JOURNAL_FILE)
_SNAP_NAME = re.compile(r"[0-9]{1,20}")
_CURRENT = re.compile(r"snapshots/([0-9]{1,20})")
_DATA_NAME = re.compile(r"datasets/[A-Za-z0-9_-]{1,64}\.npz")
_SHA = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20

log = logging.getLogger("certremove.core")

#: sha256 of dataset files this process wrote or verified, keyed by (path, device, inode, size,
#: mtime): a save then need not hash an unchanged (immutable) dataset file again
_DATA_SHA: dict[tuple[str, int, int, int, int], str] = {}


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot of a state directory (:func:`list_snapshots`). ``version``, ``saved_at`` and
    ``n_alive`` are None when its ``state.json`` cannot be read; ``problem`` says why a snapshot
    is not ``valid`` (None when it is)."""

    name: str
    seq: int
    version: int | None
    saved_at: float | None
    n_alive: int | None
    valid: bool
    problem: str | None
    #: whether ``CURRENT`` names it
    current: bool = False


@dataclasses.dataclass
class _Snapshot:
    name: str
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    dataset: Dataset


# --------------------------------------------------------------------------- small helpers
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _stat_key(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hash_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a file's bytes (streamed)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _dataset_entry(root: Path, data_name: str, *, written: bool) -> dict[str, Any]:
    """The manifest entry of a state directory's dataset file: hashed when this save wrote it;
    else what this process verified or wrote (while the file is unchanged), else what a
    snapshot's manifest says (the bytes it must have: a file damaged since is never blessed),
    else (a directory of format-1 snapshots) hashed."""
    path = root / data_name
    key = _stat_key(path)
    sha = None if written else _DATA_SHA.get(key)
    if sha is not None:
        return {"sha256": sha, "size": key[3]}
    if not written:
        for snap in sorted(
            (p for p in (root / "snapshots").iterdir() if _SNAP_NAME.fullmatch(p.name)),
            key=lambda p: int(p.name),
            reverse=True,
        ):
            try:
                entry = json.loads((snap / MANIFEST_FILE).read_bytes())["dataset"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(entry, dict) and entry.get("file") == data_name and _good_entry(entry):
                return {"sha256": entry["sha256"], "size": entry["size"]}
    sha, size = _hash_file(path)
    if key == _stat_key(path):
        _DATA_SHA[key] = sha
    return {"sha256": sha, "size": size}


def _recover_hint(root: Path) -> str:
    return (
        f"run `certremove state recover --state {root}` to fall back to the latest valid snapshot"
    )


def _damaged(root: Path, path: Path, what: str, hint: str | None = None) -> StateDamagedError:
    """A :class:`StateDamagedError` naming ``path``, with what to do."""
    if hint is None:
        if path.parent.name == "datasets":
            hint = (
                f"restore {path} from a backup (the snapshots on this dataset need it); "
                f"`certremove state verify --state {root}` lists what is intact"
            )
        else:
            hint = _recover_hint(root)
    return StateDamagedError(f"cannot load a model from {root}: {path} {what}; {hint}", str(path))


# --------------------------------------------------------------------------- save
def save_model(
    model: Model,
    directory: str | os.PathLike[str],
    *,
    dataset: Dataset | None = None,
    replace_dataset: bool = False,
    journal: dict[str, Any] | None = None,
    keep: int = DEFAULT_KEEP,
) -> Path:
    """Persist ``model`` into the state directory atomically as a new snapshot (with its
    ``manifest.json`` of checksums); returns the snapshot path.

    ``journal``: a JSON-serialisable dict stored (checksummed) as the snapshot's
    ``journal.json`` (read it back with :func:`read_journal`). ``keep``: the newest snapshots
    kept (>= 1), so that a damaged one has something to fall back to; datasets a kept snapshot
    uses stay.

    Raises:
        InvalidInputError: ``keep`` < 1, a journal that is not a JSON-serialisable dict, or a
            dataset (given, or set on the model) whose training rows, labels or ids are not the
            model's own (the message names which); nothing is written.
        StateError: a different dataset without ``replace_dataset``, or a model whose weights or
            budget are not finite (it would be refused at load; nothing is written).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidInputError(f"keep must be an integer >= 1, got {keep!r}")
    journal_bytes = None
    if journal is not None:
        if not isinstance(journal, dict):
            raise InvalidInputError(f"journal must be a dict, got {type(journal).__name__}")
        try:
            journal_bytes = json.dumps(journal, allow_nan=False, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"journal is not JSON-serialisable: {exc}") from exc
    if not bool(torch.isfinite(model._W).all()):
        raise StateError("refusing to save a model with non-finite weights")
    if not (math.isfinite(model.budget_used) and math.isfinite(model.budget_total)):
        raise StateError("refusing to save a model with a non-finite budget")
    # the dtypes the file stores, so that the fingerprint recorded is the one the load finds
    ds = (dataset or model.dataset or _dataset_from_model(model)).stored_form()
    _check_training_data(model, ds)
    fingerprint = ds.fingerprint()
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    current = _current_dataset_name(root)
    data_name = f"datasets/{fingerprint[:16]}.npz"
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
        _fsync_dir(data_file.parent)
    model.dataset = ds
    snaps = root / "snapshots"
    snaps.mkdir(exist_ok=True)
    data_entry = _dataset_entry(root, data_name, written=written)
    # Never reuse a snapshot's name: continue after the highest sequence number present.
    taken = [int(p.name) for p in snaps.iterdir() if _SNAP_NAME.fullmatch(p.name)]
    previous = _current_seq(root)
    model._save_seq = max([model._save_seq, *taken]) + 1
    name = f"{model._save_seq:012d}"
    tmp = snaps / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    p = model._problem
    tensors = {
        "weights": model._W.detach().cpu().contiguous(),
        "alive": model._alive.detach().cpu().to(torch.uint8).contiguous(),
    }
    if model.hyper.subsample_ratio is not None:
        tensors["omega"] = p.omega.detach().cpu().to(torch.uint8).contiguous()
    state = _state_dict(model, fingerprint)
    state["dataset_file"] = data_name
    files = {
        MODEL_FILE: dump_tensors(tensors),
        STATE_FILE: json.dumps(state, indent=1, allow_nan=False).encode(),
    }
    if journal_bytes is not None:
        files[JOURNAL_FILE] = journal_bytes
    manifest = {
        "format": FORMAT,
        "snapshot": name,
        "files": {fname: _entry(data) for fname, data in files.items()},
        "dataset": {"file": data_name, **data_entry},
    }
    try:
        for fname, data in files.items():
            _write_file(tmp / fname, data)
        _write_file(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())  # last
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give the space back
        raise
    final = snaps / name
    os.replace(tmp, final)
    pointer = root / ".CURRENT.tmp"
    try:
        _fsync_dir(snaps)
        _write_file(pointer, f"snapshots/{name}\n".encode())
        os.replace(pointer, root / "CURRENT")
    except BaseException:
        # CURRENT still names the previous snapshot: this one would be an orphan that a retry
        # (under the next number) leaves behind, and that pruning would count as kept
        pointer.unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    _fsync_dir(root)
    _prune(root, keep, previous)
    return final


def _check_training_data(model: Model, ds: Dataset) -> None:
    """Refuse a dataset whose training part is not the model's own rows, labels and ids (in the
    model's row order): the persisted budget used is anchored on the dataset file at the next
    load, so other data would be served with a budget that bounds nothing. The cheap test is the
    fingerprint (the dataset's is computed once per Dataset, the model's once at train or load);
    the arrays are compared only when the fingerprints differ."""
    if ds.fingerprint() == model.data_fingerprint:
        return
    differs = model.dataset_differences(ds)
    if differs:
        raise InvalidInputError(
            f"the dataset {ds.name!r} is not this model's training data: its {', '.join(differs)} "
            f"differ from the model's ({ds.X_train.shape[0]} rows of {ds.X_train.shape[1]} vs "
            f"{model.n_rows} of {model._problem.X.shape[1]}); save the model with its own dataset "
            "(or none: the one it was trained, loaded or saved with); nothing was written"
        )


def _current_seq(root: Path) -> int | None:
    """The number of the snapshot ``CURRENT`` names, or None."""
    try:
        match = _CURRENT.fullmatch((root / "CURRENT").read_text().strip())
    except (OSError, ValueError):
        return None
    return int(match.group(1)) if match else None


def _prune(root: Path, keep: int, previous: int | None = None) -> None:
    """Delete all but the newest ``keep`` snapshots (and left-over temporary ones), then every
    dataset file no kept snapshot uses (all stay when a kept snapshot's is unknown)."""
    snaps = root / "snapshots"
    named = sorted(
        (p for p in snaps.iterdir() if _SNAP_NAME.fullmatch(p.name) and p.is_dir()),
        key=lambda p: int(p.name),
        reverse=True,
    )
    current = _current_seq(root)
    if current is not None:
        # Snapshots numbered between the one CURRENT named before this save and the one it
        # names now (or after it) never became current: a process died between the rename and
        # CURRENT. Orphans: deleted, never kept in place of real history.
        low = current if previous is None else previous
        orphans = [p for p in named if int(p.name) > current or low < int(p.name) < current]
        for orphan in orphans:
            shutil.rmtree(orphan, ignore_errors=True)
        named = [p for p in named if p not in orphans]
    for old in named[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for left in snaps.glob(".tmp-*"):
        shutil.rmtree(left, ignore_errors=True)
    used: set[str] = set()
    for snap in named[:keep]:
        data_name = _dataset_name_of(snap)
        if data_name is None:
            return
        used.add(data_name)
    for old_data in (root / "datasets").glob("*.npz"):
        if f"datasets/{old_data.name}" not in used:
            old_data.unlink(missing_ok=True)


def _dataset_name_of(snap: Path) -> str | None:
    """The dataset file a snapshot uses (from its manifest, else its state.json), or None."""
    for fname, keys in ((MANIFEST_FILE, ("dataset", "file")), (STATE_FILE, ("dataset_file",))):
        try:
            value: Any = json.loads((snap / fname).read_bytes())
            for key in keys:
                value = value[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and _DATA_NAME.fullmatch(value):
            return value
    return None


def _current_dataset_name(root: Path) -> str | None:
    """The dataset file of the live snapshot, or None for a new state directory."""
    try:
        return _dataset_name_of(root / "snapshots" / current_snapshot(root))
    except StateError:
        return None


def _state_dict(model: Model, fingerprint: str) -> dict[str, Any]:
    h = model.hyper
    return {
        "format": FORMAT,
        "seq": model._save_seq,
        "saved_at": time.time(),
        "version": model.version,
        "hyper": dataclasses.asdict(h),
        "extractor_removed": model.extractor_removed,
        "classes": list(model._coding.classes),
        "binary": model._coding.binary,
        "budget_total": model.budget_total,
        # the anchor of the next start-up: an upper bound on ||U|| of the stored weights
        "budget_used": model.budget_used,
        "removed_in_epoch": model.removed_in_epoch,
        "max_removals_resolved": model.max_removals,
        # (rows, value) of the last "auto" estimate: b-independent (shadow runs), kept so that a
        # restart scales it instead of running the shadow runs again
        "auto_basis": list(model._auto_basis) if model._auto_basis is not None else None,
        # the accounting its shadow runs charged (states without it: the exact residual, also
        # under "bound", where that is far too lax; _build drops such a basis)
        "auto_basis_accounting": model.hyper.accounting,
        "safety_retrains": model.safety_retrains,
        "certified": model.certified,
        "x_norm2": model._problem.x_norm2,
        "n_rows": model.n_rows,
        "n_alive": model.n_alive,
        "dataset_sha256": fingerprint,
        "extra": model.extra,
    }


def _dataset_from_model(model: Model) -> Dataset:
    p = model._problem
    X = p.X.detach().cpu().float()
    y = torch.from_numpy(np.asarray(model._coding.decode(p.Y.cpu()).numpy(), dtype=np.int64))
    return Dataset(X, y, model.ids, X[:0], y[:0], None, meta={"name": "in-memory"})


# --------------------------------------------------------------------------- read and verify
def _has_snapshots(root: Path) -> bool:
    try:
        return any(_SNAP_NAME.fullmatch(p.name) for p in (root / "snapshots").iterdir())
    except OSError:
        return False


def current_snapshot(directory: str | os.PathLike[str]) -> str:
    """The name of the snapshot ``CURRENT`` names (e.g. ``"000000000012"``).

    Raises:
        StateNotFoundError: no ``CURRENT``, no snapshot and no dataset file: a new directory.
        StateDamagedError: ``CURRENT`` missing while snapshots exist, unreadable, malformed or
            naming a snapshot that does not exist.
    """
    root = Path(directory)
    path = root / "CURRENT"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if _has_snapshots(root):
            raise _damaged(root, path, "is missing but snapshots exist") from None
        if any((root / "datasets").glob("*.npz")):
            raise _damaged(
                root,
                path,
                "is missing and no snapshot exists, but dataset files do",
                "the model's state is lost: restore the state directory from a backup (training "
                "a new model over it would bring removed rows back)",
            ) from None
        raise StateNotFoundError(
            f"cannot load a model from {root}: no model there (no CURRENT and no snapshot)"
        ) from None
    except OSError as exc:
        raise _damaged(root, path, f"cannot be read ({exc})") from exc
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    match = _CURRENT.fullmatch(text) if text else None
    if match is None:
        shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
        raise _damaged(root, path, f"is damaged (holds {shown}, not snapshots/<seq>)")
    name = match.group(1)
    if not (root / "snapshots" / name).is_dir():
        raise _damaged(root, path, f"names snapshots/{name}, which does not exist")
    return name


def _snapshot_name(root: Path, snapshot: str | None) -> str:
    if snapshot is None:
        return current_snapshot(root)
    name = str(snapshot).strip().removeprefix("snapshots/").rstrip("/")
    if not _SNAP_NAME.fullmatch(name):
        raise InvalidInputError(f"bad snapshot name {snapshot!r}: use its sequence number")
    return name


def _read_bytes(root: Path, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _damaged(root, path, "is missing") from None
    except OSError as exc:
        raise _damaged(root, path, f"cannot be read ({exc})") from exc


def _check_entry(
    root: Path, path: Path, entry: dict[str, Any], sha: str, size: int, manifest: Path
) -> None:
    if size != entry["size"] or sha != entry["sha256"]:
        raise _damaged(
            root,
            path,
            f"does not match its checksum in {manifest.relative_to(root)} ({size} bytes, sha256 "
            f"{sha[:12]}...; expected {entry['size']} bytes, sha256 {entry['sha256'][:12]}...)",
        )


def _good_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _SHA.fullmatch(entry["sha256"]) is not None
        and _is_int(entry.get("size"))
    )


def _read_manifest(root: Path, snap: Path) -> dict[str, Any] | None:
    """The parsed, well-formed manifest of a snapshot, or None when it has none."""
    path = snap / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _damaged(root, path, f"cannot be read ({exc})") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise _damaged(root, path, f"is not valid JSON ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    data = manifest.get("dataset") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or not isinstance(data, dict)
        or manifest.get("format") not in READ_FORMATS
        or not {MODEL_FILE, STATE_FILE} <= set(files)
        or not set(files) <= set(_SNAPSHOT_FILES)
        or not isinstance(data.get("file"), str)
        or not _DATA_NAME.fullmatch(data["file"])
        or not all(_good_entry(e) for e in [data, *files.values()])
    ):
        raise _damaged(root, path, "is malformed")
    return manifest


def _verify_snapshot_files(root: Path, snap: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Check every snapshot file against the manifest; returns their bytes."""
    blobs: dict[str, bytes] = {}
    for fname, entry in manifest["files"].items():
        data = _read_bytes(root, snap / fname)
        sha = hashlib.sha256(data).hexdigest()
        _check_entry(root, snap / fname, entry, sha, len(data), snap / MANIFEST_FILE)
        blobs[fname] = data
    for extra in sorted(p.name for p in snap.iterdir()):
        if extra != MANIFEST_FILE and extra not in blobs:
            raise _damaged(root, snap / extra, "is not listed in the snapshot's manifest.json")
    return blobs


def _verify_dataset(root: Path, snap: Path, entry: dict[str, Any], verified: set[str]) -> None:
    path = root / entry["file"]
    if entry["file"] in verified:
        return
    if not path.is_file():
        raise _damaged(root, path, "is missing")
    try:
        key = _stat_key(path)
        sha, size = _hash_file(path)
    except OSError as exc:
        raise _damaged(root, path, f"cannot be read ({exc})") from exc
    _check_entry(root, path, entry, sha, size, snap / MANIFEST_FILE)
    if key == _stat_key(path):
        _DATA_SHA[key] = sha
    verified.add(entry["file"])


def _read_snapshot(root: Path, name: str, cache: dict[str, Any]) -> _Snapshot:
    """Verify and parse one snapshot (checksums first, then the invariants).

    ``cache`` is shared between calls on one directory: datasets verified and loaded once."""
    snap = root / "snapshots" / name
    if not snap.is_dir():
        raise _damaged(root, snap, "does not exist")
    manifest = _read_manifest(root, snap)
    verified: set[str] = cache.setdefault("verified", set())
    if manifest is not None:
        blobs = _verify_snapshot_files(root, snap, manifest)
        _verify_dataset(root, snap, manifest["dataset"], verified)
    else:
        blobs = {MODEL_FILE: _read_bytes(root, snap / MODEL_FILE)}
        blobs[STATE_FILE] = _read_bytes(root, snap / STATE_FILE)
    state_path = snap / STATE_FILE
    try:
        state = json.loads(blobs[STATE_FILE])
    except ValueError as exc:
        raise _damaged(root, state_path, f"is not valid JSON ({exc})") from exc
    if not isinstance(state, dict):
        raise _damaged(root, state_path, "is not a JSON object")
    fmt = state.get("format")
    if fmt not in READ_FORMATS:
        raise _damaged(root, state_path, f"has an unknown state format {fmt!r}")
    if manifest is None:
        if fmt != 1:
            raise _damaged(root, snap / MANIFEST_FILE, "is missing")
        log.warning(
            "%s was written before snapshots carried checksums (format 1): loading it "
            "unverified; the next save writes a verified snapshot",
            snap,
        )
    data_name = state.get("dataset_file")
    if not isinstance(data_name, str) or not _DATA_NAME.fullmatch(data_name):
        raise _damaged(root, state_path, f"names a bad dataset file {data_name!r}")
    if manifest is not None and manifest["dataset"]["file"] != data_name:
        raise _damaged(
            root,
            state_path,
            f"names {data_name}, its manifest.json {manifest['dataset']['file']}",
        )
    model_path = snap / MODEL_FILE
    try:
        tensors = load_tensors(blobs[MODEL_FILE])
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise _damaged(root, model_path, f"is not a readable safetensors file ({exc})") from exc
    ds = _load_dataset(root, data_name, state, cache)
    _check_invariants(root, snap, state, tensors, ds)
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
        raise _damaged(root, path, f"is not a readable dataset file ({detail})") from ds
    if ds.fingerprint() != state.get("dataset_sha256"):
        raise _damaged(root, path, "does not match the model's fingerprint in state.json")
    return ds


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _check_invariants(
    root: Path,
    snap: Path,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    ds: Dataset,
) -> None:
    """The loaded state must be one the code could have written."""
    sp, mp = snap / STATE_FILE, snap / MODEL_FILE

    def bad_state(what: str) -> StateDamagedError:
        return _damaged(root, sp, what)

    def bad_model(what: str) -> StateDamagedError:
        return _damaged(root, mp, what)

    for key in ("version", "seq", "n_alive", "n_rows", "removed_in_epoch", "safety_retrains"):
        if not _is_int(state.get(key)) or state[key] < 0:
            raise bad_state(f"has a bad {key} {state.get(key)!r} (a non-negative integer)")
    for key in ("budget_total", "budget_used", "x_norm2"):
        if not _is_number(state.get(key)) or state[key] < 0:
            raise bad_state(f"has a bad {key} {state.get(key)!r} (finite and non-negative)")
    if state["budget_total"] <= 0:
        raise bad_state(f"has a bad budget_total {state['budget_total']!r} (positive)")
    classes, binary = state.get("classes"), state.get("binary")
    if (
        not isinstance(binary, bool)
        or not isinstance(classes, list)
        or not all(_is_int(c) for c in classes)
        or len(classes) < 2
        or (binary and len(classes) != 2)
    ):
        raise bad_state(f"has bad classes {classes!r} (binary={binary!r})")
    hyper = state.get("hyper")
    try:
        h = Hyper(**hyper) if isinstance(hyper, dict) else None
    except TypeError:
        h = None
    if h is None or not _is_number(h.lam) or h.lam <= 0:
        raise bad_state("has bad hyper-parameters")
    if not isinstance(state.get("certified"), bool):
        raise bad_state(f"has a bad certified {state.get('certified')!r}")
    basis = state.get("auto_basis")
    if basis is not None and not (
        isinstance(basis, list) and len(basis) == 2 and all(_is_int(v) for v in basis)
    ):
        raise bad_state(f"has a bad auto_basis {basis!r}")
    mr = state.get("max_removals_resolved")
    if mr is not None and (not _is_int(mr) or mr < 0):
        raise bad_state(f"has a bad max_removals_resolved {mr!r}")
    if not isinstance(state.get("extra", {}) or {}, dict):
        raise bad_state("has a bad extra (a JSON object)")
    if not _is_int(state.get("extractor_removed", 0)) or state.get("extractor_removed", 0) < 0:
        raise bad_state("has a bad extractor_removed")

    n, d = ds.X_train.shape[0], ds.X_train.shape[1]
    k = 1 if binary else len(classes)
    if state["n_rows"] != n:
        raise bad_state(f"says n_rows={state['n_rows']}, the dataset holds {n} rows")
    expected = {"weights", "alive"} | ({"omega"} if h.subsample_ratio is not None else set())
    if set(tensors) != expected:
        raise bad_model(f"holds the tensors {sorted(tensors)}, expected {sorted(expected)}")
    W, alive = tensors["weights"], tensors["alive"]
    if W.dtype != torch.float64 or tuple(W.shape) != (d, k):
        raise bad_model(
            f"holds weights of shape {tuple(W.shape)} {W.dtype}, expected ({d}, {k}) float64"
        )
    if not bool(torch.isfinite(W).all()):
        raise bad_model("holds non-finite weights")
    if alive.dtype != torch.uint8 or tuple(alive.shape) != (n,) or bool((alive > 1).any()):
        raise bad_model(
            f"holds a bad alive mask (shape {tuple(alive.shape)} {alive.dtype}; expected ({n},) "
            "of 0/1 bytes)"
        )
    count = int(alive.sum())
    if count != state["n_alive"]:
        raise bad_model(
            f"holds an alive mask with {count} rows alive but state.json says "
            f"n_alive={state['n_alive']}"
        )
    if "omega" in tensors:
        omega = tensors["omega"]
        if omega.dtype != torch.uint8 or tuple(omega.shape) != (n, k) or bool((omega > 1).any()):
            raise bad_model(f"holds a bad subsampling mask (shape {tuple(omega.shape)})")
    try:
        LabelCoding(tuple(classes), binary).encode(ds.y_train)
    except InvalidInputError as exc:
        raise bad_state(f"has classes that do not fit the dataset's labels ({exc})") from exc


def _build(root: Path, snap: _Snapshot, device: str | torch.device | None) -> Model:
    state, tensors, ds = snap.state, snap.tensors, snap.dataset
    dev = resolve_device(device)
    coding = LabelCoding(tuple(state["classes"]), bool(state["binary"]))
    Y = coding.encode(ds.y_train).to(dev)
    omega = tensors["omega"].to(dev, torch.float64) if "omega" in tensors else torch.ones_like(Y)
    h = state["hyper"]
    problem = make_problem(ds.X_train, Y, omega, h["lam"], dev)
    problem = type(problem)(
        **{**problem.__dict__, "x_norm2": max(problem.x_norm2, state["x_norm2"])}
    )
    model = Model(
        problem=problem,
        coding=coding,
        hyper=Hyper(**h),
        ids=ds.ids_train,
        alive=tensors["alive"].to(dev).bool(),
        W=tensors["weights"].to(dev, torch.float64),
        budget_total=float(state["budget_total"]),
        certified=bool(state["certified"]),
        data_fingerprint=ds.fingerprint(),  # verified against state.json: no second hash
    )
    model.version = int(state["version"])
    model.removed_in_epoch = int(state["removed_in_epoch"])
    model.max_removals = state["max_removals_resolved"]
    basis = state.get("auto_basis")  # absent in states written before it was kept
    if model.hyper.accounting != "exact" and state.get("auto_basis_accounting") != (
        model.hyper.accounting
    ):
        basis = None  # estimated on the exact residual: the next retrain estimates it again
    model._auto_basis = (int(basis[0]), int(basis[1])) if basis else None
    model.safety_retrains = int(state["safety_retrains"])
    model.extractor_removed = int(state.get("extractor_removed", 0))
    model.extra = dict(state.get("extra") or {})
    model._save_seq = int(state["seq"])
    model._set_anchor(r0=float(state["budget_used"]))
    model.dataset = ds
    if not math.isfinite(model.budget_used):
        raise _damaged(root, root / "snapshots" / snap.name, "gives a non-finite budget used")
    return model


def load_model(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    snapshot: str | None = None,
) -> Model:
    """Load the current model of a state directory written by ``save``, ``certremove train`` or
    the worker (or the snapshot named ``snapshot``, e.g. ``"000000000012"``; see
    :func:`list_snapshots`). Every checksum is verified before anything is parsed, then the
    state's invariants. The loaded state is the new accounting anchor (``b`` is not on disk).

    Raises:
        StateNotFoundError: no model in the directory (a new directory).
        StateDamagedError: a missing, damaged or inconsistent file (the message names it).
        InvalidInputError: a malformed ``snapshot`` name.
    """
    root = Path(directory)
    return _build(root, _read_snapshot(root, _snapshot_name(root, snapshot), {}), device)


def read_journal(
    directory: str | os.PathLike[str], snapshot: str | None = None
) -> dict[str, Any] | None:
    """The ``journal`` saved with the current snapshot (or the one named), None when it has
    none. The snapshot's own files are verified against its manifest first (not its dataset).

    Raises:
        StateNotFoundError, StateDamagedError: as :func:`load_model`.
    """
    root = Path(directory)
    name = _snapshot_name(root, snapshot)
    snap = root / "snapshots" / name
    if not snap.is_dir():
        raise _damaged(root, snap, "does not exist")
    manifest = _read_manifest(root, snap)
    path = snap / JOURNAL_FILE
    if manifest is None:
        try:
            fmt = json.loads(_read_bytes(root, snap / STATE_FILE)).get("format")
        except (ValueError, AttributeError) as exc:
            raise _damaged(root, snap / STATE_FILE, "is not a valid state file") from exc
        if fmt != 1:
            raise _damaged(root, snap / MANIFEST_FILE, "is missing")
        if path.exists():
            raise _damaged(root, path, "is not listed in a manifest (format-1 snapshot)")
        return None
    blobs = _verify_snapshot_files(root, snap, manifest)
    if JOURNAL_FILE not in blobs:
        return None
    try:
        journal = json.loads(blobs[JOURNAL_FILE])
    except ValueError as exc:
        raise _damaged(root, path, f"is not valid JSON ({exc})") from exc
    if not isinstance(journal, dict):
        raise _damaged(root, path, "is not a JSON object")
    return journal


def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot of a state directory, newest first, each verified as :func:`load_model`
    would (checksums, invariants; each dataset is read once)."""
    root = Path(directory)
    try:
        names = [p.name for p in (root / "snapshots").iterdir() if _SNAP_NAME.fullmatch(p.name)]
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
        version, saved_at, n_alive = _summary(root / "snapshots" / name)
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


def _summary(snap: Path) -> tuple[int | None, float | None, int | None]:
    """(version, saved_at, n_alive) as a snapshot's state.json says, best effort."""
    try:
        state = json.loads((snap / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(state, dict):
        return None, None, None
    version, at, alive = state.get("version"), state.get("saved_at"), state.get("n_alive")
    return (
        version if _is_int(version) else None,
        float(at) if isinstance(at, (int, float)) and _is_number(at) else None,
        alive if _is_int(alive) else None,
    )
