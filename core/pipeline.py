"""Full-pipeline retrain: DP extractor, features and head, without the removed rows.

When the rows removed since the DP extractor was trained reach what its group privacy covers
(``core.group_privacy``), a head retrain is not enough: the extractor itself saw those rows. This
retrains the extractor with DP-SGD (same architecture, noise multiplier, clipping, epochs and
sampling rate as recorded in the feature file's ``meta``) on the source images minus every row
removed so far, extracts new features and trains a new head with the same hyper-parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data import Dataset
from core.errors import InvalidInputError
from core.model import Model
from core.train import train


def removed_source_ids(model: Model, pending_rows: list[int] | tuple[int, ...] = ()) -> np.ndarray:
    """Source sample ids removed so far: rows dead in ``model``, ``pending_rows``, and the ids
    excluded by earlier pipeline retrains (kept in the dataset's meta)."""
    dead = ~model.alive.cpu().numpy()
    if pending_rows:
        dead[np.asarray(pending_rows, dtype=np.int64)] = True
    earlier = (model.dataset.meta.get("excluded_ids") if model.dataset is not None else None) or []
    ids = np.asarray(model.ids)[dead]
    if ids.dtype.kind not in "iu":
        raise InvalidInputError("a full-pipeline retrain needs integer source ids")
    return np.union1d(ids.astype(np.int64), np.asarray(earlier, dtype=np.int64))


def retrain_pipeline(
    model: Model,
    *,
    data_dir: str | os.PathLike[str],
    pending_rows: list[int] | tuple[int, ...] = (),
    device: str | torch.device | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> tuple[Dataset, Model]:
    """Retrain extractor, features and head without every removed row; returns the new pair.

    The new model starts at version ``model.version + 1`` with a fresh extractor count. Save it
    with ``new_model.save(state_dir, replace_dataset=True)``.

    Raises:
        InvalidInputError: the dataset's meta does not describe a DP extractor, or the source
            images are missing from ``data_dir``.
    """
    from core.extractor import ExtractorConfig, extract_dataset, train_extractor
    from core.images import load_split_with_ids

    meta: dict[str, Any] = dict(model.dataset.meta) if model.dataset is not None else {}
    if "extractor_config" not in meta or "extractor_training" not in meta:
        raise InvalidInputError(
            "this model's dataset does not record how its DP extractor was trained "
            "(meta extractor_config/extractor_training): retrain the pipeline by hand"
        )
    data_dir = Path(data_dir)
    cfg = ExtractorConfig(**meta["extractor_config"])
    tr = meta["extractor_training"]
    source = str(meta["source"])
    include_extra = bool(meta.get("include_extra", False))
    excluded = removed_source_ids(model, pending_rows)
    images, labels, _ = load_split_with_ids(
        source, data_dir, train=True, include_extra=include_extra, exclude_ids=excluded
    )
    batch_size = max(1, round(float(tr["sample_rate"]) * len(labels)))
    trained = train_extractor(
        images, labels, cfg, delta=float(tr["delta"]), epochs=int(tr["epochs"]),
        noise_multiplier=float(tr["noise_multiplier"]), max_grad_norm=float(tr["max_grad_norm"]),
        batch_size=batch_size, max_physical_batch_size=min(batch_size, 512),
        accountant=str(tr.get("accountant", "prv")), device=device, progress=progress, seed=seed,
    )  # fmt: skip
    del images, labels
    binary = meta.get("binary_classes")
    arrays = extract_dataset(
        trained, source, data_dir, binary_classes=tuple(binary) if binary else None,
        include_extra=include_extra, exclude_ids=excluded,
    )  # fmt: skip
    ds = Dataset(
        torch.from_numpy(arrays["X_train"]), torch.from_numpy(arrays["y_train"]),
        arrays["ids_train"], torch.from_numpy(arrays["X_test"]), torch.from_numpy(arrays["y_test"]),
        arrays["ids_test"], arrays["meta"],
    )  # fmt: skip
    h = model.hyper
    new = train(
        ds.X_train, ds.y_train, lam=h.lam, sigma=h.sigma, epsilon=h.epsilon, delta=h.delta,
        seed=seed, device=device if device is not None else model.device,
        accounting=h.accounting, max_removals=h.max_removals, calibration=h.calibration,
        subsample_ratio=h.subsample_ratio, ids=ds.ids_train,
        extractor_dp=(float(ds.meta["dp_epsilon"]), float(ds.meta["dp_delta"])),
        extractor_limit=h.extractor_limit,
    )  # fmt: skip
    new.version = model.version + 1
    new.dataset = ds
    return ds, new
