"""DP feature extractor: a small CNN trained with DP-SGD (Opacus), and its feature files.

The reference (facebookresearch/certified-removal, ``train_svhn.py``) trains two 5x5 conv layers
(64 filters, ReLU, 2x2 max-pool) and a linear classifier with its own per-example gradients, then
trains the removal-enabled linear head on the flattened conv output. We keep the architecture,
add GroupNorm after each conv (BatchNorm mixes examples, so DP-SGD cannot clip per example), and
train with Opacus' ``PrivacyEngine`` (Poisson sampling, ``BatchMemoryManager``).

Deviation: the reference's ``train_private(include_linear=False)`` privatises only the conv
layers while the classifier sees the data without noise, and the classifier's state then steers
the conv updates; here every parameter is trained with DP-SGD, so the extractor really is
``(eps_dp, delta_dp)``-DP for the accountant's figures.

The extractor's privacy then limits removals from the linear head: see ``core.group_privacy``.

Shapes:
    images ``(N, C, H, W)`` uint8 (``core.images``); features ``(N, F)`` float32, rows of L2 norm
    ``1 - 1e-6`` (docs/theory.md "Notation and objective").
"""

from __future__ import annotations

import json
import pickle
import secrets
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.errors import InvalidInputError

__all__ = [
    "ARCH",
    "ExtractorCNN",
    "ExtractorConfig",
    "TrainedExtractor",
    "check_dp_compatible",
    "config_for",
    "extract_dataset",
    "extract_features",
    "load_extractor",
    "save_extractor",
    "train_extractor",
    "write_feature_dataset",
]

ARCH = "certremove-cnn-groupnorm-v1"
NORM_SCALE = 1.0 - 1e-6  # rows end strictly inside the unit ball after the float32 cast
_IMAGE_SHAPES = {"mnist": (1, 28), "svhn": (3, 32)}


@dataclass(frozen=True)
class ExtractorConfig:
    """Architecture and provenance of an extractor; stored as JSON next to the weights."""

    dataset: str
    in_channels: int
    image_size: int
    num_filters: int = 64
    kernel_size: int = 5
    groups: int = 8
    num_classes: int = 10
    privacy: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        side = ((self.image_size - self.kernel_size + 1) // 2 - self.kernel_size + 1) // 2
        return self.num_filters * side * side


def config_for(dataset: str, *, num_filters: int = 64, groups: int = 8) -> ExtractorConfig:
    """The reference architecture for ``"mnist"`` (1x28x28) or ``"svhn"`` (3x32x32)."""
    name = dataset.lower()
    if name not in _IMAGE_SHAPES:
        raise InvalidInputError(f"dataset must be one of {sorted(_IMAGE_SHAPES)}, got {dataset!r}")
    if num_filters % groups:
        raise InvalidInputError(f"num_filters={num_filters} is not divisible by groups={groups}")
    channels, size = _IMAGE_SHAPES[name]
    return ExtractorConfig(name, channels, size, num_filters=num_filters, groups=groups)


class ExtractorCNN(nn.Module):
    """conv5x5 -> GroupNorm -> ReLU -> maxpool2, twice; flatten (the features); linear classifier.

    Input: uint8 images, scaled to ``x/255 - 0.5`` as the reference does.
    """

    def __init__(self, config: ExtractorConfig) -> None:
        super().__init__()
        c, k = config.num_filters, config.kernel_size
        self.conv1 = nn.Conv2d(config.in_channels, c, k)
        self.norm1 = nn.GroupNorm(config.groups, c)
        self.conv2 = nn.Conv2d(c, c, k)
        self.norm2 = nn.GroupNorm(config.groups, c)
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer: ``(N, C, H, W)`` images -> ``(N, F)`` raw (unnormalised) features."""
        x = x.float() / 255.0 - 0.5 if x.dtype == torch.uint8 else x
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class TrainedExtractor:
    """A trained extractor (hooks removed, eval mode) and what the accountant spent on it."""

    model: nn.Module
    config: ExtractorConfig
    epsilon: float
    delta: float
    noise_multiplier: float


def check_dp_compatible(model: nn.Module, *, fix: bool = False) -> nn.Module:
    """Reject (or, with ``fix``, repair) modules DP-SGD cannot train, BatchNorm first of all.

    Returns:
        ``model`` itself, or with ``fix=True`` a copy where ``ModuleValidator.fix`` swapped
        BatchNorm for GroupNorm (a warning says so). Build the optimizer after this call.

    Raises:
        InvalidInputError: the model is incompatible and ``fix`` is False, or the fix failed.
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # the validator also flags eval mode, which is not a defect of the module
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if not errors:
        return model
    listed = "; ".join(str(e) for e in errors)
    if not fix:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        why = "BatchNorm mixes the examples of a batch, so they cannot be clipped one by one; "
        raise InvalidInputError(
            f"the extractor cannot be trained with DP-SGD: {why if has_bn else ''}{listed}. Use "
            "GroupNorm, or pass fix=True (Opacus ModuleValidator.fix swaps BatchNorm for GroupNorm)"
        )
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise InvalidInputError(f"ModuleValidator.fix could not repair the model: {remaining}")
    warnings.warn(
        f"replaced modules DP-SGD cannot train (BatchNorm -> GroupNorm): {listed}", stacklevel=2
    )
    return fixed


def train_extractor(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: ExtractorConfig,
    *,
    delta: float,
    epochs: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    batch_size: int = 256,
    max_physical_batch_size: int = 256,
    lr: float = 1e-3,
    accountant: str = "prv",
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
    fix_batchnorm: bool = False,
    seed: int | None = None,
    progress: bool = True,
) -> TrainedExtractor:
    """Train the extractor with DP-SGD for a target epsilon or a fixed noise multiplier.

    Give exactly one of ``target_epsilon`` (``make_private_with_epsilon``) or
    ``noise_multiplier`` (``make_private``; the paper's SVHN setting is noise 6, clip 4,
    delta 1e-5). Poisson sampling with rate ``batch_size / N``; ``BatchMemoryManager`` splits
    logical batches into physical ones of at most ``max_physical_batch_size``.

    Args:
        images, labels: training split. ``model``: a custom module with a ``features`` method
            (default: ``ExtractorCNN(config)``). ``seed``: tests only (a known seed makes the
            DP noise public). ``device``: default CUDA when available, else CPU.

    Shapes:
        images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64.

    Returns:
        The trained extractor and the accountant's ``epsilon`` at ``delta``.
    """
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from tqdm.auto import tqdm

    if (target_epsilon is None) == (noise_multiplier is None):
        raise InvalidInputError("give exactly one of target_epsilon and noise_multiplier")
    if not 0 < delta < 1 or epochs < 1 or batch_size < 1 or max_grad_norm <= 0:
        raise InvalidInputError("need 0 < delta < 1, epochs >= 1, batch_size >= 1, clip > 0")
    if images.ndim != 4 or labels.shape != (images.shape[0],) or images.shape[0] < 2:
        raise InvalidInputError(f"bad shapes: images {tuple(images.shape)}, labels {labels.shape}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Deviation: no torchcsprng (Opacus secure_mode); the noise and Poisson-sampling generator is
    # seeded from the OS entropy source instead, as the head's noise is (docs/theory.md "Training").
    gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = model if model is not None else ExtractorCNN(config)
    net = check_dp_compatible(net, fix=fix_batchnorm).to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)  # after the fix: same parameters
    dataset = torch.utils.data.TensorDataset(images, labels.long())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), generator=gen
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant)
    common = dict(
        module=net, optimizer=optimizer, data_loader=loader, max_grad_norm=max_grad_norm,
        poisson_sampling=True, noise_generator=gen,
    )  # fmt: skip
    if target_epsilon is not None:
        private, optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=target_epsilon, target_delta=delta, epochs=epochs
        )
    else:
        private, optimizer, loader = engine.make_private(
            **common, noise_multiplier=noise_multiplier
        )
    private.train()
    with warnings.catch_warnings():  # inputs need no grad: the hook warning is noise
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(1, epochs + 1):
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=max_physical_batch_size,
                optimizer=optimizer,
            ) as batches:  # fmt: skip
                bar = tqdm(batches, desc=f"DP-SGD epoch {epoch}/{epochs}", disable=not progress)
                for x, y in bar:
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(private(x.to(dev)), y.to(dev))
                    loss.backward()
                    optimizer.step()
                    if len(y):
                        bar.set_postfix(loss=f"{loss.item():.3f}")
    epsilon = float(engine.get_epsilon(delta))
    private.remove_hooks()  # the plain module (net) is what we keep and save
    net.eval()
    noise = float(optimizer.noise_multiplier)
    privacy: dict[str, Any] = {
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": noise,
        "max_grad_norm": max_grad_norm,
        "sample_rate": float(loader.sample_rate),
        "epochs": epochs,
        "batch_size": batch_size,
        "n_train": len(dataset),
        "accountant": accountant,
        "target_epsilon": target_epsilon,
        "seeded": seed is not None,
    }
    cfg = ExtractorConfig(**{**asdict(config), "privacy": privacy})
    return TrainedExtractor(net, cfg, epsilon, delta, noise)


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
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
