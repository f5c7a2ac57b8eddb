"""The accounting state of a noise epoch: an immutable :class:`Accountant` over the pure maths of
:mod:`core.bounds` (rounding margins) and :mod:`core.budget` (the budget itself).

The budget used is an upper bound on ``||U||_F``, where the current weights exactly minimise
``L_{b-U}`` on the remaining rows (docs/theory.md "Accounting: exact and bound"):

- ``"exact"``: ``r0_a + ||grad L_0(W; D') - g_a||_F`` (plus its rounding margin) from an anchor
  ``a`` (the last training, or the state loaded at start-up); ``g_a`` is as secret as ``b``.
- ``"bound"``: ``r0_a + sqrt(sum_k beta_k^2)``, ``beta_k`` the summed a-priori increments.

Both are tracked; ``accounting`` picks the one that decides. Every operation returns a new
:class:`Accountant`: a discarded step or a rollback changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from core.bounds import margins_rounding, rounding_margin
from core.loss import gradient, margins
from core.problem import ACCOUNTINGS, Problem
from core.removal import Step


@dataclass(frozen=True)
class Accountant:
    """Anchor ``(g_a, r0_a)`` and what the steps since it used."""

    accounting: str
    #: ``g_a``: the gradient of ``L_0`` at the anchor (in memory only, never persisted)
    anchor_grad: torch.Tensor
    #: ``r0_a``: the residual bound at the anchor, its rounding margin included
    r0: float
    #: ``||grad L_0(W; D') - g_a||_F`` after the last committed step, and its rounding margin
    distance: float = 0.0
    margin: float = 0.0
    #: (K,) the summed a-priori increments per class (float64, CPU)
    beta: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {self.accounting!r}")
        if self.beta is None:
            # on the CPU, like the steps' increments: the accounting never waits for a device
            beta = torch.zeros(self.anchor_grad.shape[1], dtype=torch.float64)
            object.__setattr__(self, "beta", beta)

    @property
    def _beta(self) -> torch.Tensor:
        assert self.beta is not None
        return self.beta

    @property
    def exact_used(self) -> float:
        """``r0_a + ||grad L_0(W; D') - g_a||_F`` plus its rounding margin."""
        return self.r0 + self.distance + self.margin

    @property
    def bound_used(self) -> float:
        """``r0_a + sqrt(sum_k beta_k^2)``: the a-priori accounting."""
        return self.r0 + float(torch.linalg.vector_norm(self._beta))

    @property
    def used(self) -> float:
        """The budget used in the accounting that decides."""
        return self.exact_used if self.accounting == "exact" else self.bound_used

    def used_after(self, step: Step) -> float:
        """The budget used if ``step`` were committed."""
        if self.accounting == "exact":
            return self.r0 + step.anchor_distance + step.margin
        return self.r0 + float(torch.linalg.vector_norm(self._beta + step.increments))

    def fits(self, step: Step, budget_total: float) -> bool:
        """Whether ``step`` keeps the budget used within ``budget_total`` (the safety net)."""
        return self.used_after(step) <= budget_total

    def commit(self, step: Step) -> Accountant:
        """The accounting after ``step``."""
        return dataclasses.replace(
            self,
            distance=step.anchor_distance,
            margin=step.margin,
            beta=self._beta + step.increments,
        )

    def restart(self, anchor_grad: torch.Tensor, r0: float) -> Accountant:
        """A new anchor ``(g_a, r0_a)``: nothing used beyond it yet."""
        return Accountant(self.accounting, anchor_grad, r0)


def anchor_at(
    problem: Problem, W: torch.Tensor, alive: torch.Tensor, *, r0: float
) -> tuple[torch.Tensor, float]:
    """The anchor gradient ``g_a`` at ``W`` on ``alive`` and ``r0`` plus the rounding margin of
    the float64 ``g_a``."""
    p = problem
    n_reg = float(alive.sum())
    C = p.weights(alive)
    Z = margins(p.X, p.Y, W)
    anchor_grad = gradient(p.X, p.Y, C, W, p.lam, n_reg, Z=Z)
    abs_terms = float((C * torch.sigmoid(-Z) * p.row_norms[:, None]).sum())
    r0_anchor = r0 + rounding_margin(
        p.X.shape[0], p.X.shape[1], abs_terms, p.lam, n_reg,
        float(torch.linalg.vector_norm(W)), float(torch.linalg.vector_norm(anchor_grad)),
    ) + margins_rounding(p.X.shape[1], p.row_norms_sq @ C, W)  # fmt: skip
    return anchor_grad, r0_anchor


def anchored(
    accounting: str, problem: Problem, W: torch.Tensor, alive: torch.Tensor, *, r0: float
) -> Accountant:
    """An accountant anchored at ``(W, alive)`` with residual bound ``r0``."""
    return Accountant(accounting, *anchor_at(problem, W, alive, r0=r0))
