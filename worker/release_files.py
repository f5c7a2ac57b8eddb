"""The on-disk format of releases: ``<release_dir>/<model>/<release:08d>/weights.safetensors`` +
``manifest.json``, written into a temporary directory, fsynced and renamed into place, then
``<release_dir>/<model>/LATEST`` (the release number) replaced atomically (``worker/releases.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from producer import schema
from producer.release_client import (
    LATEST_NAME,
    MANIFEST_NAME,
    WEIGHT_TENSOR,
    WEIGHTS_NAME,
    manifest_body,
    manifest_digest,
)
from worker.receipts import ReceiptSigner
from worker.release_policy import ReleasePolicy

if TYPE_CHECKING:
    from core.model import Model

log = logging.getLogger("certremove.worker")

MANIFEST_FORMAT = 1


def model_release_dir(release_dir: Path, model: str) -> Path:
    return Path(release_dir) / schema.check_model_name(model)


def release_path(release_dir: Path, model: str, number: int) -> Path:
    return model_release_dir(release_dir, model) / f"{int(number):08d}"


def read_latest(release_dir: Path, model: str) -> int | None:
    """The number in ``LATEST`` (None: no release yet)."""
    try:
        text = (model_release_dir(release_dir, model) / LATEST_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def release_numbers(release_dir: Path, model: str) -> list[int]:
    """The numbers of the release directories there, ascending."""
    root = model_release_dir(release_dir, model)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def noise_epoch_id(model: str, state_id: str, version: int) -> str:
    """An opaque id of a noise draw: equal for every version that shares ``b`` (a model version
    is one noise epoch), never derived from ``b``."""
    text = f"certremove-noise-epoch\0{model}\0{state_id}\0{int(version)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_release(
    release_dir: Path,
    model: str,
    number: int,
    weights: np.ndarray,
    manifest: dict[str, Any],
    signer: ReceiptSigner | None = None,
) -> dict[str, Any]:
    """Write release ``number`` atomically and point ``LATEST`` at it; returns the manifest
    written (with ``content_sha256``, ``manifest_sha256`` and, with a signer, ``key_id`` and
    ``signature``).

    Raises:
        FileExistsError: release ``number`` exists already.
        OSError: the disk refused (nothing is published: a temporary directory may stay).
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    root = model_release_dir(release_dir, model)
    root.mkdir(parents=True, exist_ok=True)
    final = release_path(release_dir, model, number)
    if final.exists():
        raise FileExistsError(f"release {final} exists already")
    tmp = root / f".tmp-{int(number):08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({WEIGHT_TENSOR: np.ascontiguousarray(weights)}, str(tmp / WEIGHTS_NAME))
        fsync_file(tmp / WEIGHTS_NAME)
        content = hashlib.sha256((tmp / WEIGHTS_NAME).read_bytes()).hexdigest()
        manifest = {**manifest, "content_sha256": content}
        if signer is not None:
            manifest["key_id"] = signer.key_id
        manifest["manifest_sha256"] = manifest_digest(manifest)
        if signer is not None:
            manifest["signature"] = signer.sign_bytes(manifest_body(manifest))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        fsync_file(tmp / MANIFEST_NAME)
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    write_latest(release_dir, model, number)
    return manifest


def write_latest(release_dir: Path, model: str, number: int) -> None:
    """Point ``LATEST`` at release ``number`` (replaced atomically)."""
    root = model_release_dir(release_dir, model)
    latest_tmp = root / f".{LATEST_NAME}.tmp"
    latest_tmp.write_text(f"{int(number)}\n")
    fsync_file(latest_tmp)
    os.replace(latest_tmp, root / LATEST_NAME)
    fsync_dir(root)


def list_releases(release_dir: Path, model: str) -> list[dict[str, Any]]:
    """The manifests of a model's releases, oldest first (a manifest that does not parse is
    listed with ``error``)."""
    out = []
    for number in release_numbers(release_dir, model):
        path = release_path(release_dir, model, number) / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            manifest = {"release": number, "error": f"{path}: {exc}"}
        manifest.setdefault("path", str(path.parent))
        out.append(manifest)
    return out


def next_release_number(release_dir: Path, model: str, recorded: int) -> int:
    """The number of a model's next release: after ``recorded`` (the release record's last),
    the newest release directory and ``LATEST``."""
    taken = [recorded, *release_numbers(release_dir, model)[-1:]]
    latest = read_latest(release_dir, model)
    if latest is not None:
        taken.append(latest)
    return max(taken) + 1


def manifest_record(path: Path, number: int) -> dict[str, Any] | None:
    """The release record's fields read from the manifest of release ``number`` at ``path``
    (a release on disk that the record lacks); None (logged) when it cannot be read."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        return {
            "release": number,
            "model_version": int(manifest["model_version"]),
            "snapshot": int(manifest["snapshot"]),
            "noise_epoch": str(manifest["noise_epoch"]),
            "created_at": float(manifest["created_at"]),
            "content_sha256": str(manifest["content_sha256"]),
            "epsilon": float(manifest["epsilon"]),
            "delta": float(manifest["delta"]),
            "policy": str(manifest.get("policy")),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("release %s has no readable manifest (%s): ignored", path, exc)
        return None


def input_description(model: Model) -> dict[str, Any]:
    """What a client does to raw inputs before ``X @ weight`` (``core.Model.predict`` applies
    nothing: it scores the rows as given), and what the training rows were."""
    ds = model.dataset
    meta = ds.meta if ds is not None else {}
    extractor = model.hyper.extractor_dp is not None or meta.get("dp_epsilon") is not None
    features: dict[str, Any] = {"kind": "raw"}
    if extractor:
        features = {
            "kind": "dp-extractor",
            "note": (
                "the release is the linear head over the DP feature extractor's features: "
                "inputs are the extractor's feature rows (L2-normalised as at training), not "
                "raw images; the extractor is not part of the release"
            ),
        }
        if meta.get("extractor_config") is not None:
            features["extractor_config"] = meta.get("extractor_config")
    return {
        "normalisation": "none",
        "training_rows": "L2-normalised rows scaled by 1 - 1e-6 (core/data.py): give rows "
        "prepared the same way",
        "features": features,
    }


def build_manifest(
    model: Model,
    *,
    model_name: str,
    number: int,
    noise_epoch: str,
    policy: ReleasePolicy,
    created_at: float,
) -> dict[str, Any]:
    """The manifest of a release of ``model`` (before its hashes and signature)."""
    epsilon, delta = model.guarantee()
    W = model.weights
    return {
        "format": MANIFEST_FORMAT,
        "model": model_name,
        "release": int(number),
        "model_version": int(model.version),
        "snapshot": int(model.save_seq),
        "noise_epoch": noise_epoch,
        "classes": [int(c) for c in model.classes],
        "binary": W.dim() == 1,
        "feature_dim": int(W.shape[0]),
        "weights": {
            "file": WEIGHTS_NAME,
            "tensor": WEIGHT_TENSOR,
            "dtype": "float64",
            "shape": [int(s) for s in W.shape],
        },
        "prediction": {
            "scores": "X @ weight (X float64, one row per input)",
            "binary": "classes[1] where the score is > 0, else classes[0]; "
            "P(classes[1]) = sigmoid(score)",
            "one_vs_rest": "classes[argmax of the K scores]; probabilities: sigmoid of each "
            "score, normalised to sum 1",
        },
        "input": input_description(model),
        "epsilon": float(epsilon),
        "delta": float(delta),
        "certified": bool(model.certified),
        "rows_removed_since_training": int(model.removed_in_epoch),
        "created_at": float(created_at),
        "policy": str(policy),
    }
