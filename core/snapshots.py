"""The state directory's layout and file-level integrity: snapshot names, ``CURRENT``, manifests
and checksums, atomic writes, pruning. Knows files and bytes only, never a model (the contract is
docs/design.md "State directory"; :mod:`core.persist` writes the snapshots, :mod:`core.loading`
reads them)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from core.errors import InvalidInputError, StateDamagedError, StateError, StateNotFoundError

#: the ``state.json`` format written; 1 (no manifest) is still read, unverified
FORMAT = 2
READ_FORMATS = (1, 2)
DEFAULT_KEEP = 3
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
JOURNAL_FILE = "journal.json"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_FILES = (MODEL_FILE, STATE_FILE, JOURNAL_FILE)
SNAP_NAME = re.compile(r"[0-9]{1,20}")
#: a snapshot's step log is ``snapshots/<name>.log`` (:mod:`core.steplog`)
LOG_SUFFIX = ".log"
CURRENT_RE = re.compile(r"snapshots/([0-9]{1,20})")
DATA_NAME = re.compile(r"datasets/[A-Za-z0-9_-]{1,64}\.npz")
_SHA = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20

#: sha256 of dataset files this process wrote or verified, keyed by (path, device, inode, size,
#: mtime): a save then need not hash an unchanged (immutable) dataset file again
DATA_SHA: dict[tuple[str, int, int, int, int], str] = {}


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


def file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def stat_key(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a file's bytes (streamed)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def dataset_entry(root: Path, data_name: str, *, written: bool) -> dict[str, Any]:
    """The manifest entry of a state directory's dataset file: hashed when this save wrote it;
    else what this process verified or wrote (while the file is unchanged), else what a
    snapshot's manifest says (the bytes it must have: a file damaged since is never blessed),
    else (a directory of format-1 snapshots) hashed."""
    path = root / data_name
    key = stat_key(path)
    sha = None if written else DATA_SHA.get(key)
    if sha is not None:
        return {"sha256": sha, "size": key[3]}
    if not written:
        for snap in sorted(
            (p for p in (root / "snapshots").iterdir() if SNAP_NAME.fullmatch(p.name)),
            key=lambda p: int(p.name),
            reverse=True,
        ):
            try:
                entry = json.loads((snap / MANIFEST_FILE).read_bytes())["dataset"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(entry, dict) and entry.get("file") == data_name and good_entry(entry):
                return {"sha256": entry["sha256"], "size": entry["size"]}
    sha, size = hash_file(path)
    if key == stat_key(path):
        DATA_SHA[key] = sha
    return {"sha256": sha, "size": size}


def recover_hint(root: Path) -> str:
    return (
        f"run `certremove state recover --state {root}` to fall back to the latest valid snapshot"
    )


def damaged(root: Path, path: Path, what: str, hint: str | None = None) -> StateDamagedError:
    """A :class:`StateDamagedError` naming ``path``, with what to do."""
    if hint is None:
        if path.parent.name == "datasets":
            hint = (
                f"restore {path} from a backup (the snapshots on this dataset need it); "
                f"`certremove state verify --state {root}` lists what is intact"
            )
        else:
            hint = recover_hint(root)
    return StateDamagedError(f"cannot load a model from {root}: {path} {what}; {hint}", str(path))


def parse_current(raw: bytes) -> str | None:
    """The snapshot name a ``CURRENT`` file's bytes hold, or None when malformed."""
    try:
        match = CURRENT_RE.fullmatch(raw.decode("ascii").strip())
    except UnicodeDecodeError:
        return None
    return match.group(1) if match else None


def current_seq(root: Path) -> int | None:
    """The number of the snapshot ``CURRENT`` names (whether it exists or not), or None."""
    try:
        name = parse_current((root / "CURRENT").read_bytes())
    except OSError:
        return None
    return int(name) if name is not None else None


def prune(root: Path, keep: int, current: int | None, previous: int | None = None) -> None:
    """Delete all but the newest ``keep`` snapshots (and left-over temporary ones), then every
    dataset file no kept snapshot uses (all stay when a kept snapshot's is unknown).
    ``current``: the snapshot ``CURRENT`` names now; ``previous``: the one it named before."""
    snaps = root / "snapshots"
    entries = list(snaps.iterdir())
    named = sorted(
        (p for p in entries if SNAP_NAME.fullmatch(p.name) and p.is_dir()),
        key=lambda p: int(p.name),
        reverse=True,
    )
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
    for left in entries:
        if left.name.startswith(".tmp-"):
            shutil.rmtree(left, ignore_errors=True)
    kept = {p.name for p in named[:keep]}
    for log in entries:
        # a snapshot's step log (core.steplog) goes with it
        base = log.name.removesuffix(LOG_SUFFIX)
        if base != log.name and base not in kept and SNAP_NAME.fullmatch(base):
            log.unlink(missing_ok=True)
    data_files = list((root / "datasets").glob("*.npz"))
    if len(data_files) <= 1:
        return  # (the common case: one dataset, which the snapshot just written uses)
    used: set[str] = set()
    for snap in named[:keep]:
        data_name = dataset_name_of(snap)
        if data_name is None:
            return
        used.add(data_name)
    for old_data in data_files:
        if f"datasets/{old_data.name}" not in used:
            old_data.unlink(missing_ok=True)


def dataset_name_of(snap: Path) -> str | None:
    """The dataset file a snapshot uses (from its manifest, else its state.json), or None."""
    for fname, keys in ((MANIFEST_FILE, ("dataset", "file")), (STATE_FILE, ("dataset_file",))):
        try:
            value: Any = json.loads((snap / fname).read_bytes())
            for key in keys:
                value = value[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and DATA_NAME.fullmatch(value):
            return value
    return None


def current_dataset_name(root: Path) -> str | None:
    """The dataset file of the live snapshot, or None for a new state directory."""
    try:
        return dataset_name_of(root / "snapshots" / current_snapshot(root))
    except StateError:
        return None


def has_snapshots(root: Path) -> bool:
    try:
        return any(SNAP_NAME.fullmatch(p.name) for p in (root / "snapshots").iterdir())
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
        if has_snapshots(root):
            raise damaged(root, path, "is missing but snapshots exist") from None
        if any((root / "datasets").glob("*.npz")):
            raise damaged(
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
        raise damaged(root, path, f"cannot be read ({exc})") from exc
    name = parse_current(raw)
    if name is None:
        shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
        raise damaged(root, path, f"is damaged (holds {shown}, not snapshots/<seq>)")
    if not (root / "snapshots" / name).is_dir():
        raise damaged(root, path, f"names snapshots/{name}, which does not exist")
    return name


def snapshot_name(root: Path, snapshot: str | None) -> str:
    if snapshot is None:
        return current_snapshot(root)
    name = str(snapshot).strip().removeprefix("snapshots/").rstrip("/")
    if not SNAP_NAME.fullmatch(name):
        raise InvalidInputError(f"bad snapshot name {snapshot!r}: use its sequence number")
    return name


def read_bytes(root: Path, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise damaged(root, path, "is missing") from None
    except OSError as exc:
        raise damaged(root, path, f"cannot be read ({exc})") from exc


def check_entry(
    root: Path, path: Path, entry: dict[str, Any], sha: str, size: int, manifest: Path
) -> None:
    if size != entry["size"] or sha != entry["sha256"]:
        raise damaged(
            root,
            path,
            f"does not match its checksum in {manifest.relative_to(root)} ({size} bytes, sha256 "
            f"{sha[:12]}...; expected {entry['size']} bytes, sha256 {entry['sha256'][:12]}...)",
        )


def good_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _SHA.fullmatch(entry["sha256"]) is not None
        and is_int(entry.get("size"))
    )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def read_manifest(root: Path, snap: Path) -> dict[str, Any] | None:
    """The parsed, well-formed manifest of a snapshot, or None when it has none."""
    path = snap / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise damaged(root, path, f"cannot be read ({exc})") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise damaged(root, path, f"is not valid JSON ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    data = manifest.get("dataset") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or not isinstance(data, dict)
        or manifest.get("format") not in READ_FORMATS
        or not {MODEL_FILE, STATE_FILE} <= set(files)
        or not set(files) <= set(SNAPSHOT_FILES)
        or not isinstance(data.get("file"), str)
        or not DATA_NAME.fullmatch(data["file"])
        or not all(good_entry(e) for e in [data, *files.values()])
    ):
        raise damaged(root, path, "is malformed")
    return manifest


def verify_snapshot_files(root: Path, snap: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Check every snapshot file against the manifest; returns their bytes."""
    blobs: dict[str, bytes] = {}
    for fname, entry in manifest["files"].items():
        data = read_bytes(root, snap / fname)
        got = file_entry(data)
        check_entry(root, snap / fname, entry, got["sha256"], got["size"], snap / MANIFEST_FILE)
        blobs[fname] = data
    for extra in sorted(p.name for p in snap.iterdir()):
        if extra != MANIFEST_FILE and extra not in blobs:
            raise damaged(root, snap / extra, "is not listed in the snapshot's manifest.json")
    return blobs


def verify_dataset(root: Path, snap: Path, entry: dict[str, Any], verified: set[str]) -> None:
    path = root / entry["file"]
    if entry["file"] in verified:
        return
    if not path.is_file():
        raise damaged(root, path, "is missing")
    try:
        key = stat_key(path)
        sha, size = hash_file(path)
    except OSError as exc:
        raise damaged(root, path, f"cannot be read ({exc})") from exc
    check_entry(root, path, entry, sha, size, snap / MANIFEST_FILE)
    if key == stat_key(path):
        DATA_SHA[key] = sha
    verified.add(entry["file"])


def summary(snap: Path) -> tuple[int | None, float | None, int | None]:
    """(version, saved_at, n_alive) as a snapshot's state.json says, best effort."""
    try:
        state = json.loads((snap / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(state, dict):
        return None, None, None
    version, at, alive = state.get("version"), state.get("saved_at"), state.get("n_alive")
    return (
        version if is_int(version) else None,
        float(at) if isinstance(at, (int, float)) and is_number(at) else None,
        alive if is_int(alive) else None,
    )
