"""Label coding: binary {-1, +1} (larger label -> +1) or one-vs-rest columns.

See docs/theory.md "Notation and objective".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import InvalidInputError


@dataclass(frozen=True)
class LabelCoding:
    """``classes``: the two labels of a binary model, or 0..K-1 for one-vs-rest (K fixed)."""

    classes: tuple[int, ...]
    binary: bool

    @classmethod
    def fit(cls, y: torch.Tensor) -> LabelCoding:
        if y.is_floating_point():
            if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
                raise InvalidInputError("labels must be integers")
            y = y.long()
        values = sorted(int(v) for v in torch.unique(y).tolist())
        if len(values) < 2:
            raise InvalidInputError(f"need at least two classes, got labels {values}")
        if len(values) == 2:
            return cls(tuple(values), binary=True)
        if values[0] < 0:
            raise InvalidInputError(
                f"one-vs-rest labels must be 0..K-1, got negative labels {values[:5]}"
            )
        return cls(tuple(range(values[-1] + 1)), binary=False)

    @property
    def n_columns(self) -> int:
        return 1 if self.binary else len(self.classes)

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """(n,) labels -> (n, K) float64 in {-1, +1}."""
        y = y.long()
        if self.binary:
            known = (y == self.classes[0]) | (y == self.classes[1])
            if not bool(known.all()):
                raise InvalidInputError(f"labels outside the model's classes {self.classes}")
            return torch.where(y == self.classes[1], 1.0, -1.0).to(torch.float64)[:, None]
        if bool((y < 0).any()) or bool((y >= len(self.classes)).any()):
            raise InvalidInputError(f"labels outside 0..{len(self.classes) - 1}")
        cols = torch.arange(len(self.classes), device=y.device)
        return torch.where(y[:, None] == cols[None, :], 1.0, -1.0).to(torch.float64)

    def decode(self, scores: torch.Tensor) -> torch.Tensor:
        """(m, K) scores -> (m,) labels."""
        if self.binary:
            hi, lo = self.classes[1], self.classes[0]
            return torch.where(scores[:, 0] > 0, hi, lo).long()
        return scores.argmax(dim=1).long()
