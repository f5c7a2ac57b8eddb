"""Writers of tiny MNIST IDX and SVHN ``.mat`` files for tests (no download, no MD5).

Usage: ``from tests.core.fixtures_images import write_mnist_idx, write_svhn_mat``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

__all__ = ["digit_images", "write_mnist_idx", "write_svhn_mat"]


def digit_images(
    n: int, *, size: int, channels: int, classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent synthetic images, so a tiny CNN can learn something in one epoch.

    Each class lights a different horizontal band of the image, plus uniform noise.

    Returns:
        ``(images, labels)``: uint8 ``(n, size, size, channels)`` and int64 ``(n,)`` in
        ``0..classes-1`` (every class present when ``n >= classes``).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels)).astype(np.int64)
    band = max(size // classes, 1)
    for k in range(classes):
        rows = slice((k * band) % size, (k * band) % size + band)
        images[labels == k, rows, :, :] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic ``0,0,0x08,ndim``, one big-endian uint32 per dimension, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist_idx(
    root: str | Path, *, n_train: int = 128, n_test: int = 64, seed: int = 0
) -> Path:
    """Write the four uncompressed MNIST IDX files under ``root/MNIST/raw``.

    Returns:
        ``root`` (what ``torchvision.datasets.MNIST(root=...)`` and ``--data-dir`` take).
    """
    root = Path(root)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = digit_images(n, size=28, channels=1, seed=s)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[..., 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


def write_svhn_mat(
    root: str | Path,
    *,
    splits: tuple[str, ...] = ("train", "test"),
    n: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``{split}_32x32.mat`` files: ``X`` uint8 ``(32,32,3,N)``, ``y`` ``(N,1)`` in 1..10.

    Digit 0 is stored as label 10, as in the real files.

    Returns:
        ``root`` (the directory passed as ``--data-dir``).
    """
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(splits):
        images, labels = digit_images(n, size=32, channels=3, seed=seed + i)
        stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        x = np.ascontiguousarray(np.transpose(images, (1, 2, 3, 0)))  # (N,H,W,C) -> (H,W,C,N)
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": stored})
    return root
