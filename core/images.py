"""Raw image loaders for MNIST and SVHN: uint8 tensors, no download unless asked.

These are the inputs of the DP feature extractor (``core.extractor``) and of the pixel-space
MNIST pipeline. They return images as stored (no normalisation) so that the caller decides the
preprocessing; labels are ``int64`` digits ``0..9``.

Shapes:
    MNIST images: ``(N, 1, 28, 28)`` uint8; SVHN images: ``(N, 3, 32, 32)`` uint8;
    labels: ``(N,)`` int64.

Deviation: SVHN is read with ``scipy.io.loadmat`` instead of ``torchvision.datasets.SVHN``,
because torchvision checks the files' MD5 sums and so refuses any file but the official ones
(tiny test files, or a re-packed copy). torchvision is still used to download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.errors import InvalidInputError

__all__ = [
    "SVHN_SPLITS",
    "load_image_split",
    "load_mnist_images",
    "load_split_with_ids",
    "load_svhn_images",
]

SVHN_SPLITS = ("train", "test", "extra")


def load_mnist_images(
    data_dir: str | Path, *, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the MNIST training or test split from ``data_dir/MNIST/raw``.

    Args:
        data_dir: root passed to ``torchvision.datasets.MNIST``; the four uncompressed IDX files
            must be in ``data_dir/MNIST/raw/`` (or use ``download=True``).
        train: the 60,000-image training split when True, else the 10,000-image test split.
        download: fetch the files with torchvision when they are missing (needs internet).

    Returns:
        ``(images, labels)``.

    Shapes:
        images ``(N, 1, 28, 28)`` uint8, labels ``(N,)`` int64.

    Raises:
        InvalidInputError: the files are missing or unreadable (the message says how to supply
            them).
    """
    from torchvision.datasets import MNIST  # lazy: torchvision is heavy to import

    root = Path(data_dir)
    try:
        dataset = MNIST(root=str(root), train=train, download=download)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InvalidInputError(
            f"MNIST not found or unreadable under {root / 'MNIST' / 'raw'} ({exc}); supply the "
            "four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) with --data-dir, or use --download"
        ) from exc
    images = torch.as_tensor(dataset.data, dtype=torch.uint8)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise InvalidInputError(
            f"MNIST files under {root} have images {tuple(images.shape)} and labels "
            f"{tuple(labels.shape)}; expected (N, 28, 28) and (N,)"
        )
    return images.unsqueeze(1).contiguous(), labels


def load_svhn_images(
    data_dir: str | Path, *, split: str, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an SVHN split from ``{data_dir}/{split}_32x32.mat`` (the cropped-digits format).

    Args:
        data_dir: directory holding ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``.
        split: ``"train"``, ``"test"`` or ``"extra"``.
        download: fetch a missing file with ``torchvision.datasets.SVHN`` (MD5-checked).

    Returns:
        ``(images, labels)``, with the file's label 10 (digit 0) mapped to 0.

    Shapes:
        images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64.

    Raises:
        InvalidInputError: unknown split, missing or malformed file.
    """
    if split not in SVHN_SPLITS:
        raise InvalidInputError(f"SVHN split must be one of {SVHN_SPLITS}, got {split!r}")
    root = Path(data_dir)
    path = root / f"{split}_32x32.mat"
    if not path.is_file() and download:
        from torchvision.datasets import SVHN

        try:
            SVHN(root=str(root), split=split, download=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise InvalidInputError(f"could not download SVHN {split!r} to {root}: {exc}") from exc
    if not path.is_file():
        raise InvalidInputError(
            f"SVHN file {path} not found; supply the directory holding {split}_32x32.mat with "
            "--data-dir, or use --download"
        )
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise InvalidInputError(f"SVHN file {path} is unreadable: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise InvalidInputError(f"SVHN file {path} lacks the variables X and y")
    x = np.asarray(mat["X"])
    y = np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape[0] != x.shape[3]:
        raise InvalidInputError(
            f"SVHN file {path} has X {x.shape} and y {np.asarray(mat['y']).shape}; "
            "expected (32, 32, 3, N) and (N, 1)"
        )
    if x.dtype != np.uint8:
        raise InvalidInputError(f"SVHN file {path} has X of dtype {x.dtype}; expected uint8")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise InvalidInputError(f"SVHN file {path} has labels outside 0..10")
    labels[labels == 10] = 0  # the file stores digit 0 as label 10
    # (H, W, C, N) -> (N, C, H, W), the layout torchvision uses.
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_image_split(
    dataset: str, data_dir: str | Path, *, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the training or test split of ``"mnist"`` or ``"svhn"`` (SVHN: train or test file).

    Shapes:
        as :func:`load_mnist_images` or :func:`load_svhn_images`.

    Raises:
        InvalidInputError: unknown dataset name or missing files.
    """
    name = dataset.lower()
    if name == "mnist":
        return load_mnist_images(data_dir, train=train, download=download)
    if name == "svhn":
        return load_svhn_images(data_dir, split="train" if train else "test", download=download)
    raise InvalidInputError(f"image dataset must be 'mnist' or 'svhn', got {dataset!r}")


def load_split_with_ids(
    dataset: str,
    data_dir: str | Path,
    *,
    train: bool,
    include_extra: bool = False,
    exclude_ids: np.ndarray | list[int] | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A split with its sample ids (row indices in the source split), minus ``exclude_ids``.

    For SVHN with ``include_extra`` the extra file's rows follow the train file's (ids
    ``len(train) ..``). ``exclude_ids`` drops removed rows, e.g. for a full-pipeline retrain
    of the extractor; unknown ids are ignored.

    Shapes:
        images ``(M, C, H, W)`` uint8, labels ``(M,)`` int64, ids ``(M,)`` int64.
    """
    images, labels = load_image_split(dataset, data_dir, train=train, download=download)
    if train and include_extra:
        if dataset.lower() != "svhn":
            raise InvalidInputError("include_extra applies to SVHN only")
        extra_images, extra_labels = load_svhn_images(data_dir, split="extra", download=download)
        images, labels = torch.cat([images, extra_images]), torch.cat([labels, extra_labels])
    ids = np.arange(images.shape[0], dtype=np.int64)
    if exclude_ids is not None and len(exclude_ids):
        keep = ~np.isin(ids, np.asarray(exclude_ids, dtype=np.int64))
        mask = torch.from_numpy(keep)
        images, labels, ids = images[mask], labels[mask], ids[keep]
    return images, labels, ids
