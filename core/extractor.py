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

This module trains; the network is :mod:`core.extractor_net`, the checkpoint and feature files
:mod:`core.features` (their names are re-exported here).
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import InvalidInputError
from core.extractor_net import (
    ARCH,
    NORM_SCALE,
    ExtractorCNN,
    ExtractorConfig,
    TrainedExtractor,
    check_dp_compatible,
    config_for,
)
from core.features import (
    extract_dataset,
    extract_features,
    load_extractor,
    save_extractor,
    write_feature_dataset,
)
from core.problem import resolve_device

__all__ = [
    "ARCH",
    "NORM_SCALE",
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
    dev = resolve_device(device or None)
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
