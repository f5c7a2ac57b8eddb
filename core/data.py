"""Datasets: the embedded ``digits``, ``.npz`` dataset files, MNIST, SVHN and a synthetic generator.

Rows are L2-normalised and scaled by ``1 - 1e-6`` before the cast to float32, so every stored row
has norm <= 1 (docs/theory.md "Notation and objective"). Splits are fixed (public, independent
of the noise). Nothing is downloaded unless the caller asks for it (``download=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import InvalidInputError

SCALE = 1 - 1e-6
REQUIRED_KEYS = ("X_train", "y_train", "ids_train", "X_test", "y_test")


@dataclass
class Dataset:
    """Training and test rows. Shapes: X_* float32 (n, d), y_* int64 (n,); ids numpy arrays."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    ids_train: np.ndarray
    X_test: torch.Tensor
    y_test: torch.Tensor
    ids_test: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "dataset"))

    def fingerprint(self) -> str:
        """sha256 of the training rows, labels and ids (ties a model to its data); computed once
        (treat a Dataset's arrays as immutable)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_arrays(self.X_train, self.y_train, self.ids_train)
        return self._fingerprint

    def stored_form(self) -> Dataset:
        """This dataset in the dtypes a dataset file stores and loads (rows float32, labels
        int64, integer ids int64): itself when it is already, else a converted copy. Its
        :meth:`fingerprint` is then the one the file gives back at load."""
        if (
            self.X_train.dtype == torch.float32
            and self.y_train.dtype == torch.int64
            and self.X_test.dtype == torch.float32
            and self.y_test.dtype == torch.int64
            and np.asarray(self.ids_train).dtype == stored_ids(self.ids_train).dtype
        ):
            return self
        return Dataset(
            self.X_train.float(),
            self.y_train.long(),
            stored_ids(self.ids_train),
            self.X_test.float(),
            self.y_test.long(),
            self.ids_test,
            dict(self.meta),
        )


def stored_ids(ids: Any) -> np.ndarray:
    """Sample ids as a dataset file gives them back: integer ids as int64, others unchanged."""
    arr = np.asarray(ids)
    return arr.astype(np.int64, copy=False) if arr.dtype.kind in "iu" else arr


def fingerprint_arrays(X: torch.Tensor, y: torch.Tensor, ids: np.ndarray) -> str:
    """sha256 of the bytes of training rows, labels and ids, in that order (the
    :meth:`Dataset.fingerprint` of a dataset holding them). Hashes the buffers in place: about
    0.02 s for n = 100,000 float32 rows of d = 64."""
    h = hashlib.sha256()
    for arr in (X.detach().cpu().numpy(), y.detach().cpu().numpy(), np.asarray(ids)):
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def normalise_rows(X: np.ndarray) -> torch.Tensor:
    """L2-normalise rows in float64, scale by ``1 - 1e-6``, cast to float32 (zero rows stay 0)."""
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0) * SCALE
    return torch.from_numpy(X.astype(np.float32))


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    binary_classes: tuple[int, int] | None = None,
) -> Dataset:
    """Load a dataset by name: ``digits``, ``mnist``, ``svhn``, ``synthetic:...`` or a ``.npz`` path.

    ``binary_classes=(a, b)`` keeps two classes (the paper's MNIST 3-vs-8 is ``(3, 8)``).

    Raises:
        InvalidInputError: unknown name, missing files or a malformed dataset file.
    """
    if name.endswith(".npz") or (os.path.sep in name and Path(name).suffix == ".npz"):
        ds = load_npz(name)
    elif name == "digits":
        ds = _digits()
    elif name == "mnist":
        ds = _images_dataset("mnist", _need_dir(data_dir, "mnist", download), download)
    elif name == "svhn":
        ds = _images_dataset("svhn", _need_dir(data_dir, "svhn", download), download)
    elif name.startswith("synthetic"):
        ds = synthetic(**parse_synthetic(name))
    else:
        raise InvalidInputError(
            f"unknown dataset {name!r}: use digits, mnist, svhn, synthetic:n=..,d=..,classes=..,seed=.. "
            "or a path to a .npz dataset file"
        )
    return select_classes(ds, binary_classes) if binary_classes is not None else ds


def _need_dir(data_dir: Any, name: str, download: bool) -> Path:
    if data_dir is None:
        raise InvalidInputError(
            f"dataset {name!r} needs --data-dir (a folder with the original files)"
            + ("" if download else ", or --download on a machine with internet access")
        )
    return Path(data_dir)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(len(bunch.target))  # fixed, public split
    n_train = int(round(0.8 * len(perm)))
    tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    X = normalise_rows(bunch.data)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset(
        X[tr],
        y[tr],
        tr.astype(np.int64),
        X[te],
        y[te],
        te.astype(np.int64),
        meta={"name": "digits"},
    )


def _images_dataset(name: str, root: Path, download: bool) -> Dataset:
    """MNIST or SVHN pixels as rows (flattened, /255, L2-normalised); ids are source row numbers."""
    from core.images import load_image_split

    splits = []
    for train in (True, False):
        images, labels = load_image_split(name, root, train=train, download=download)
        X = normalise_rows(images.reshape(len(images), -1).numpy() / 255.0)
        splits.append((X, labels.long(), np.arange(len(labels), dtype=np.int64)))
    (Xtr, ytr, idtr), (Xte, yte, idte) = splits
    return Dataset(Xtr, ytr, idtr, Xte, yte, idte, meta={"name": name})


def select_classes(ds: Dataset, classes: tuple[int, int]) -> Dataset:
    """Keep the rows of two classes (labels unchanged; the larger one maps to +1 in training)."""
    a, b = classes
    keep_tr = ((ds.y_train == a) | (ds.y_train == b)).numpy()
    keep_te = ((ds.y_test == a) | (ds.y_test == b)).numpy()
    if not keep_tr.any():
        raise InvalidInputError(f"no training rows with labels {classes}")
    meta = dict(ds.meta, binary_classes=[a, b])
    return Dataset(
        ds.X_train[keep_tr],
        ds.y_train[keep_tr],
        ds.ids_train[keep_tr],
        ds.X_test[keep_te],
        ds.y_test[keep_te],
        None if ds.ids_test is None else ds.ids_test[keep_te],
        meta,
    )


_SYNTH = re.compile(r"^synthetic(?::(.*))?$")


def parse_synthetic(spec: str) -> dict[str, int]:
    """``synthetic:n=100000,d=64,classes=2,seed=0`` -> keyword arguments of :func:`synthetic`."""
    match = _SYNTH.match(spec)
    if not match:
        raise InvalidInputError(f"bad synthetic dataset spec {spec!r}")
    out = {"n": 10000, "d": 64, "classes": 2, "seed": 0}
    for part in filter(None, (match.group(1) or "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in out or not value.strip().lstrip("-").isdigit():
            raise InvalidInputError(f"bad synthetic option {part!r} (keys: n, d, classes, seed)")
        out[key.strip()] = int(value)
    if out["n"] < 2 or out["d"] < 1 or out["classes"] < 2:
        raise InvalidInputError(f"synthetic needs n >= 2, d >= 1, classes >= 2, got {out}")
    return out


def synthetic(*, n: int, d: int, classes: int, seed: int) -> Dataset:
    """Seeded Gaussian class clusters (overlapping), rows normalised; test set of ``min(n//5, 10000)``."""
    rng = np.random.default_rng(seed)
    n_test = max(1, min(n // 5, 10000))
    centres = rng.normal(size=(classes, d)) / np.sqrt(d) * 1.5

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, classes, size=m)
        X = centres[y] + rng.normal(size=(m, d)) / np.sqrt(d)
        return normalise_rows(X), torch.from_numpy(y.astype(np.int64))

    Xtr, ytr = draw(n)
    Xte, yte = draw(n_test)
    return Dataset(
        Xtr,
        ytr,
        np.arange(n, dtype=np.int64),
        Xte,
        yte,
        np.arange(n, n + n_test, dtype=np.int64),
        meta={"name": f"synthetic:n={n},d={d},classes={classes},seed={seed}"},
    )


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Read a dataset file (docs/design.md "Dataset file") with ``allow_pickle=False`` and
    validate it."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not a readable .npz dataset file: {exc}") from exc
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise InvalidInputError(f"{path} lacks the arrays {missing}")
    Xtr, Xte = arrays["X_train"], arrays["X_test"]
    if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
        raise InvalidInputError(f"{path}: X_train/X_test must be 2-D with the same width")
    for key in ("y_train", "y_test"):
        if arrays[key].dtype.kind not in "iu" or arrays[key].ndim != 1:
            raise InvalidInputError(f"{path}: {key} must be a 1-D integer array")
    ids = arrays["ids_train"]
    if ids.shape != (len(Xtr),) or ids.dtype.kind not in "iuU" or len(np.unique(ids)) != len(ids):
        raise InvalidInputError(f"{path}: ids_train must hold one unique int or string id per row")
    if len(arrays["y_train"]) != len(Xtr) or len(arrays["y_test"]) != len(Xte):
        raise InvalidInputError(f"{path}: label counts do not match row counts")
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}: meta is not a JSON string") from exc
    meta.setdefault("name", path.stem)
    ids_test = arrays.get("ids_test")
    return Dataset(
        torch.from_numpy(Xtr.astype(np.float32)),
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        ids.astype(np.int64) if ids.dtype.kind in "iu" else ids,
        torch.from_numpy(Xte.astype(np.float32)),
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        ids_test,
        meta,
    )


def save_dataset(path: str | os.PathLike[str], ds: Dataset) -> None:
    """Write a dataset file atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "X_train": ds.X_train.numpy().astype(np.float32),
        "y_train": ds.y_train.numpy().astype(np.int64),
        "ids_train": np.asarray(ds.ids_train),
        "X_test": ds.X_test.numpy().astype(np.float32),
        "y_test": ds.y_test.numpy().astype(np.int64),
        "meta": np.array(json.dumps(ds.meta)),
    }
    if ds.ids_test is not None:
        arrays["ids_test"] = np.asarray(ds.ids_test)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dataset_differences(
    X: torch.Tensor, y: torch.Tensor, ids: np.ndarray, dataset: Dataset
) -> list[str]:
    """What of ``dataset``'s training part differs from the training rows ``X`` (float32),
    labels ``y`` (int64) and ``ids`` (stored form), in that row order: a sublist of
    ``["rows", "labels", "ids"]``, empty when it is the same data (in whatever dtypes)."""
    out = []
    dX = dataset.X_train.detach().cpu()
    if tuple(dX.shape) != tuple(X.shape) or not torch.equal(dX.to(torch.float32), X):
        out.append("rows")
    dy = dataset.y_train.detach().cpu()
    same = tuple(dy.shape) == tuple(y.shape) and (
        torch.equal(dy.double(), y.double())
        if dy.is_floating_point()
        else torch.equal(dy.long(), y)
    )
    if not same:
        out.append("labels")
    other = stored_ids(dataset.ids_train)
    if not (
        other.shape == ids.shape
        and (other.dtype.kind in "iu") == (ids.dtype.kind in "iu")
        and bool(np.array_equal(other, ids))
    ):
        out.append("ids")
    return out


def check_training_data(
    ds: Dataset,
    fingerprint: str,
    training_data: Callable[[], tuple[torch.Tensor, torch.Tensor, np.ndarray]],
) -> None:
    """Refuse (:class:`InvalidInputError`) a dataset whose training part is not a model's own
    rows ``X``, labels ``y`` and ``ids`` (``training_data()``; fingerprint ``fingerprint``), in
    its row order: a saved budget is anchored on the dataset file at the next load, so other
    data would be served with a budget that bounds nothing. The fingerprints are the cheap
    test; the arrays are built and compared only when they differ."""
    if ds.fingerprint() == fingerprint:
        return
    X, y, ids = training_data()
    differs = dataset_differences(X, y, ids, ds)
    if differs:
        raise InvalidInputError(
            f"the dataset {ds.name!r} is not this model's training data: its {', '.join(differs)} "
            f"differ from the model's ({ds.X_train.shape[0]} rows of {ds.X_train.shape[1]} vs "
            f"{X.shape[0]} of {X.shape[1]}); save the model with its own dataset "
            "(or none: the one it was trained, loaded or saved with); nothing was written"
        )
