"""The DP feature extractor's network: its configuration, the CNN (two 5x5 conv layers with
GroupNorm, a linear classifier), a trained extractor, and the Opacus compatibility check.
Training is :mod:`core.extractor`'s, checkpoints and feature files :mod:`core.features`'."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import InvalidInputError

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
