"""Model state on disk (DESIGN.md §3): ``safetensors`` + JSON, replaced atomically; never ``b``.

Layout of a state directory::

    datasets/<sha256[:16]>.npz   training + test rows, written once per dataset (immutable)
    snapshots/<seq>/model.safetensors   float64 weights, alive mask, subsampling mask
    snapshots/<seq>/state.json          hyper-parameters, budget state, version, counters
    CURRENT                      name of the live snapshot (replaced with os.replace)

A state directory normally keeps one dataset; a full-pipeline retrain (new DP features) saves a
model on a new dataset with ``replace_dataset=True``, and the old file goes once no snapshot uses it.
A snapshot directory is written and fsynced under a temporary name, renamed into place, then
``CURRENT`` is swapped; older snapshots are deleted afterwards. A crash at any point leaves the
previous or the new state, never a mix. ``b`` and ``g_a`` are never written: after loading, the
anchor is the loaded state and ``r0_a`` is the persisted budget used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.data import Dataset, load_npz, save_dataset
from core.errors import InvalidInputError, StateError
from core.labels import LabelCoding
from core.model import Hyper, Model
from core.train import make_problem, resolve_device

FORMAT = 1


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


def save_model(
    model: Model,
    directory: str | os.PathLike[str],
    *,
    dataset: Dataset | None = None,
    replace_dataset: bool = False,
) -> Path:
    """Persist ``model`` into the state directory atomically; returns the snapshot path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ds = dataset or model.dataset or _dataset_from_model(model)
    fingerprint = ds.fingerprint()
    current = _current_dataset_name(root)
    data_name = f"datasets/{fingerprint[:16]}.npz"
    if current is not None and current != data_name and not replace_dataset:
        raise StateError(
            f"{root} already holds a model on a different dataset ({current}); use a new state "
            "directory (or replace_dataset=True for a full-pipeline retrain)"
        )
    data_file = root / data_name
    if not data_file.exists():
        data_file.parent.mkdir(exist_ok=True)
        save_dataset(data_file, ds)
        _fsync_dir(data_file.parent)
    model.dataset = ds
    snaps = root / "snapshots"
    snaps.mkdir(exist_ok=True)
    # Never reuse a live snapshot's name: continue after the highest sequence number present.
    taken = [int(p.name) for p in snaps.iterdir() if p.name.isdigit()]
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
    save_file(tensors, str(tmp / "model.safetensors"))
    with open(tmp / "model.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    state = _state_dict(model, fingerprint)
    state["dataset_file"] = data_name
    _write_file(tmp / "state.json", json.dumps(state, indent=1).encode())
    _fsync_dir(tmp)
    final = snaps / name
    os.replace(tmp, final)
    _fsync_dir(snaps)
    pointer = root / ".CURRENT.tmp"
    _write_file(pointer, f"snapshots/{name}\n".encode())
    os.replace(pointer, root / "CURRENT")
    _fsync_dir(root)
    for old in snaps.iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for old_data in (root / "datasets").glob("*.npz"):
        if f"datasets/{old_data.name}" != data_name:
            old_data.unlink(missing_ok=True)
    return final


def _current_dataset_name(root: Path) -> str | None:
    """The dataset file of the live snapshot, or None for a new state directory."""
    try:
        snap = root / (root / "CURRENT").read_text().strip()
        return str(json.loads((snap / "state.json").read_text())["dataset_file"])
    except (OSError, ValueError, KeyError):
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


def load_model(
    directory: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> Model:
    """Load the current model of a state directory written by ``save``, ``certremove train`` or
    the worker. The loaded state is the new accounting anchor (``b`` is not on disk).

    Raises:
        StateError: missing or inconsistent files.
    """
    root = Path(directory)
    try:
        snap = root / (root / "CURRENT").read_text().strip()
        state = json.loads((snap / "state.json").read_text())
        tensors = load_file(str(snap / "model.safetensors"))
        ds = load_npz(root / state["dataset_file"])
    except (OSError, ValueError, KeyError, InvalidInputError) as exc:
        raise StateError(f"cannot load a model from {root}: {exc}") from exc
    if state.get("format") != FORMAT:
        raise StateError(f"{snap}: unknown state format {state.get('format')!r}")
    if ds.fingerprint() != state["dataset_sha256"]:
        raise StateError(f"{root / state['dataset_file']} does not match the model's fingerprint")
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
    )
    model.version = int(state["version"])
    model.removed_in_epoch = int(state["removed_in_epoch"])
    model.max_removals = state["max_removals_resolved"]
    basis = state.get("auto_basis")  # absent in states written before it was kept
    model._auto_basis = (int(basis[0]), int(basis[1])) if basis else None
    model.safety_retrains = int(state["safety_retrains"])
    model.extractor_removed = int(state.get("extractor_removed", 0))
    model.extra = dict(state.get("extra") or {})
    model._save_seq = int(state["seq"])
    model._set_anchor(r0=float(state["budget_used"]))
    model.dataset = ds
    return model
