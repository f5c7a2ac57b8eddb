"""The audit's vocabulary (see :mod:`worker.audit`): its defaults, its error, what it audits
(:class:`Target`) and the checks of its arguments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from core.problem import Hyper, Problem

#: the notice every output carries
NOTICE = (
    "INTERNAL ONLY: these figures depend on the secret noise draw (distances, removed rows' "
    "losses, residual and budget); never publish them"
)

#: the default level of the two-sample tests
LEVEL = 0.01

#: removed rows sampled for the membership test by default
DEFAULT_SAMPLE = 500

#: ``--out`` suffixes and what they write
FORMATS = {".json": "json", ".png": "png"}

#: retrains with independent draws (the spread, and the null of the across-draws test)
DEFAULT_DRAWS = 10

#: a distance passes within this many relative standard deviations of the spread
SPREAD_SDS = 3.0

#: the folder of a state directory that holds the releases
RELEASES = "releases"


class AuditError(ValueError):
    """The audit cannot run; ``code`` is the exit status (1: nothing to audit yet or a state the
    audit refuses, 2: bad arguments)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Target:
    """What is audited: released weights on a model's fixed problem, and which rows are gone."""

    #: ``state``, ``release`` or ``memory``
    source: str
    #: a short description (``snapshot 000000000004``, ``release 3``, ``model in memory``)
    label: str
    problem: Problem
    hyper: Hyper
    binary: bool
    classes: list[int]
    #: released weights (d, K) float64
    W: torch.Tensor
    #: rows alive in the released model (n,)
    alive: torch.Tensor
    #: rows the released model no longer holds (sorted)
    removed_rows: np.ndarray
    version: int | None
    budget_total: float
    budget_used: float | None
    certified: bool | None
    #: ``b`` (only for a model in memory)
    noise: torch.Tensor | None = None
    #: what the ledger said (counts only)
    ledger: dict[str, Any] = field(default_factory=dict)
    #: the residual's independent bound from an older snapshot of the same epoch
    epoch_check: dict[str, Any] | None = None
    #: held-out rows, for accuracies (float32 (m, d), int64 (m,)) or None
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- arguments


def check_outs(outs: Sequence[Path]) -> None:
    """Refuse ``--out`` paths that cannot be written, before any work.

    Raises:
        AuditError: a suffix other than .json or .png, a directory, a missing or unwritable
            folder (2).
    """
    for out in outs:
        out = Path(out)
        if out.suffix.lower() not in FORMATS:
            raise AuditError(f"--out {out}: name a {' or '.join(FORMATS)} file")
        folder = out.parent if str(out.parent) else Path(".")
        if out.is_dir():
            raise AuditError(f"--out {out} is a directory")
        if not folder.is_dir():
            raise AuditError(f"--out {out}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise AuditError(f"--out {out}: not writable")


def check_numbers(sample: int, draws: int, level: float) -> None:
    """Refuse a bad ``--sample``, ``--draws`` or ``--level``.

    Raises:
        AuditError: (2) what is wrong.
    """
    if sample < 1:
        raise AuditError(f"--sample must be >= 1, got {sample}")
    if draws < 3:
        raise AuditError(
            f"--draws must be >= 3 (two for the spread, the rest for the null), got {draws}"
        )
    if not 0 < level < 1:
        raise AuditError(f"--level must lie in (0, 1), got {level}")
