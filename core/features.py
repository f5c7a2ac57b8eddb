"""The DP feature extractor's files: its checkpoint (``torch.save`` of tensors and JSON, loaded
with ``weights_only=True``), feature extraction (rows scaled to L2 norm ``1 - 1e-6``) and the
feature datasets the linear head trains on."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import InvalidInputError
from core.extractor_net import ARCH, NORM_SCALE, ExtractorCNN, ExtractorConfig, TrainedExtractor
from core.problem import resolve_device


def save_extractor(path: str | Path, trained: TrainedExtractor) -> Path:
    """Write ``{"state_dict", "config"}`` with ``torch.save``: tensors and a JSON string only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}
    payload = {"arch": ARCH, "config": json.dumps(asdict(trained.config)), "state_dict": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_extractor(
    path: str | Path, *, device: str | torch.device | None = None
) -> TrainedExtractor:
    """Load what :func:`save_extractor` wrote, with ``weights_only=True`` (no pickle)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if payload.get("arch") != ARCH:
            raise ValueError(f"architecture {payload.get('arch')!r}, expected {ARCH!r}")
        config = ExtractorConfig(**json.loads(payload["config"]))
        model = ExtractorCNN(config)
        model.load_state_dict(payload["state_dict"])
    except (pickle.UnpicklingError, OSError, RuntimeError, ValueError, KeyError, TypeError,
            AttributeError, EOFError) as exc:  # fmt: skip
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidInputError(
            f"cannot load the extractor from {path}: {type(exc).__name__}: {first}"
        ) from exc
    dev = resolve_device(device or None)
    model.to(dev).eval()
    p = config.privacy
    return TrainedExtractor(model, config, p["epsilon"], p["delta"], p["noise_multiplier"])


@torch.no_grad()
def extract_features(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024
) -> torch.Tensor:
    """Penultimate features, each row L2-normalised then scaled by ``1 - 1e-6`` (docs/theory.md).

    Runs on the model's device; the normalisation is done in float64 before the float32 cast.

    Shapes:
        images ``(N, C, H, W)`` -> ``(N, F)`` float32 on the CPU.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features: Callable[[torch.Tensor], torch.Tensor] = model.features  # type: ignore[assignment]
    out = []
    for start in range(0, images.shape[0], batch_size):
        feats = features(images[start : start + batch_size].to(device)).double()
        norms = feats.norm(dim=1, keepdim=True)
        # An all-zero row (every ReLU dead) stays zero: it is inside the unit ball.
        feats = torch.where(norms > 0, feats / norms.clamp_min(1e-300), feats) * NORM_SCALE
        out.append(feats.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def write_feature_dataset(
    path: str | Path,
    *,
    X_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    ids_train: np.ndarray,
    X_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    ids_test: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write the ``.npz`` dataset file (docs/design.md "Dataset file"), loadable with
    ``allow_pickle=False``.

    ``meta`` is stored as a JSON string (a 0-d unicode array).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "X_train": np.asarray(X_train, dtype=np.float32),
        "y_train": np.asarray(y_train, dtype=np.int64),
        "ids_train": np.asarray(ids_train, dtype=np.int64),
        "X_test": np.asarray(X_test, dtype=np.float32),
        "y_test": np.asarray(y_test, dtype=np.int64),
        "ids_test": np.asarray(ids_test, dtype=np.int64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    for split in ("train", "test"):
        n = arrays[f"X_{split}"].shape[0]
        if arrays[f"y_{split}"].shape != (n,) or arrays[f"ids_{split}"].shape != (n,):
            raise InvalidInputError(f"X_{split}, y_{split}, ids_{split} differ in length")
    if len(np.unique(arrays["ids_train"])) != len(arrays["ids_train"]):
        raise InvalidInputError("ids_train must be unique")
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, allow_pickle=False, **arrays)
    tmp.replace(path)
    return path


def extract_dataset(
    trained: TrainedExtractor,
    dataset: str,
    data_dir: str | Path,
    *,
    binary_classes: tuple[int, int] | None = None,
    include_extra: bool = False,
    exclude_ids: np.ndarray | list[int] | None = None,
    download: bool = False,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Features of a dataset's train and test splits, as the arrays of a dataset file.

    Sample ids are row indices in the source split (SVHN with ``include_extra``: the extra file's
    rows follow the train file's), so they stay stable under ``binary_classes`` filtering.
    Labels keep their digit values (``core`` maps the larger of two labels to +1).
    ``exclude_ids`` drops removed training rows (a full-pipeline retrain).

    Returns:
        keyword arguments for :func:`write_feature_dataset` (``X_train`` ... ``meta``).
    """
    from core.images import load_split_with_ids

    parts = {}
    for split, train in (("train", True), ("test", False)):
        images, labels, ids = load_split_with_ids(
            dataset, data_dir, train=train, include_extra=include_extra,
            exclude_ids=exclude_ids if train else None, download=download,
        )  # fmt: skip
        if binary_classes is not None:
            keep = np.isin(labels.numpy(), np.asarray(binary_classes))
            mask = torch.from_numpy(keep)
            images, labels, ids = images[mask], labels[mask], ids[keep]
        if images.shape[0] == 0:
            raise InvalidInputError(f"no {split} images left for classes {binary_classes}")
        feats = extract_features(trained.model, images, batch_size=batch_size)
        parts.update(
            {f"X_{split}": feats.numpy(), f"y_{split}": labels.numpy(), f"ids_{split}": ids}
        )
    p = trained.config.privacy
    suffix = "" if binary_classes is None else "-{}v{}".format(*binary_classes)
    meta = {
        "name": f"{dataset.lower()}-dp-features{suffix}",
        "extractor": ARCH,
        "source": dataset.lower(),
        "dp_epsilon": float(trained.epsilon),
        "dp_delta": float(trained.delta),
        "noise_multiplier": float(trained.noise_multiplier),
        "max_grad_norm": p.get("max_grad_norm"),
        "accountant": p.get("accountant"),
        "epochs": p.get("epochs"),
        "sample_rate": p.get("sample_rate"),
        "extractor_n_train": p.get("n_train"),
        "feature_dim": int(parts["X_train"].shape[1]),
        "binary_classes": list(binary_classes) if binary_classes is not None else None,
        "include_extra": bool(include_extra),
        "excluded_train_rows": 0 if exclude_ids is None else len(exclude_ids),
        "ids": "row index in the source split (train ids: the rows the extractor trained on)",
        # what a full-pipeline retrain needs to train the same extractor again (core.pipeline)
        "extractor_config": {k: v for k, v in asdict(trained.config).items() if k != "privacy"},
        "extractor_training": dict(p),
        "excluded_ids": sorted(int(i) for i in (exclude_ids if exclude_ids is not None else [])),
    }
    return {**parts, "meta": meta}
