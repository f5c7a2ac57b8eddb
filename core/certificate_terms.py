"""The removal step's certificate terms (:class:`LogisticTerms`: the terms of ``X^T``'s argument
and the sums over the rows that the step's bounds take) and the fused kernel that computes them
with the certificate's products in one pass over X (:func:`fused_certificate`,
:mod:`core.fused`), for :mod:`core.blocked`'s ``"fused"`` layouts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from core import fused


class LogisticTerms:
    """The removal step's certificate terms (``terms_of`` of :func:`certificate_products`) for
    ``k`` classes: on rows ``start:end`` of ``P = X [W_new, S]``, ``C l'(z_new) y`` with
    ``z_new = y P[:, :k]`` (``l'(z) = -sigmoid(-z)``, so ``neg_cy * sigmoid(-z_new)``) and
    ``C l''(z) x.s`` (``curvature * P[:, k:]``), written as the rows of ``out`` (2k, rows).
    The fused layouts compute the same terms in their kernel (:mod:`core.fused`), and with
    them the sums of :meth:`bound_sums`.

    Args:
        Y: (n, k) labels +-1, float64.
        neg_cy: (n, k) ``-(C * Y)``.
        curvature: (n, k) ``C l''(z)`` at the step's starting weights.
        bound_inputs: the row weights ``C`` (n, k), the row norms (n,), their squares (n,) and
            ``s_err`` (k,), for :meth:`bound_sums` (None: zeros)."""

    def __init__(
        self,
        Y: torch.Tensor,
        neg_cy: torch.Tensor,
        curvature: torch.Tensor,
        bound_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.Y, self.neg_cy, self.curvature = Y, neg_cy, curvature
        self.k = Y.shape[1]
        self.bound_inputs = bound_inputs
        #: the fused kernel's :data:`core.fused.SUMS` (6, k), when it computed the terms
        self.sums: torch.Tensor | None = None

    def __call__(self, P: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
        k = self.k
        z = self.Y[start:end] * P[:, :k]
        torch.sigmoid(z.neg_(), out=z)
        torch.mul(self.neg_cy[start:end].T, z.T, out=out[:k])
        torch.mul(self.curvature[start:end].T, P[:, k:].T, out=out[k:])

    def bound_sums(self, P: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """The sums of :data:`core.fused.SUMS` (6, k) over the rows, from ``P`` and the terms
        ``T`` that :func:`certificate_products` returned: the fused kernel's where it ran,
        else computed here (``|t| ||x||`` per half of the terms, ``C ||x||^2``,
        ``C ||x||^2 |x.s|``, and with ``u = |x.s| + s_err ||x||`` (an upper bound of the exact
        ``|x.s|``) ``(C u^2)^2`` and ``||x|| C u^2``)."""
        if self.sums is not None:
            return self.sums
        assert self.bound_inputs is not None
        C, norms, norms_sq, s_err = self.bound_inputs
        k = self.k
        abs_terms = T.abs() @ norms
        xs = P[:, k:].abs()
        u = xs + norms[:, None] * s_err
        wu = C * (u * u)
        return torch.stack(
            (
                abs_terms[:k],
                abs_terms[k:],
                norms_sq @ C,
                norms_sq @ (C * xs),
                (wu * wu).sum(0),
                norms @ wu,
            )
        )


def fused_applies(X: torch.Tensor) -> bool:
    """Whether a :mod:`core.fused` kernel can read ``X`` in place (a contiguous float32 or
    float64 CPU tensor that NumPy can view)."""
    return (
        X.device.type == "cpu"
        and X.is_contiguous()
        and X.dtype in (torch.float32, torch.float64)
        and not X.requires_grad
    )


def fused_certificate(
    X: torch.Tensor,
    read: torch.Tensor,
    V: torch.Tensor,
    terms_of: Callable[[torch.Tensor, torch.Tensor, int, int], None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(P, T, Q)`` of :func:`core.blocked.certificate_products` by the fused kernel, reading
    ``read`` (X, or its float32 copy that widens back to X exactly), with the bounds' sums left
    on ``terms_of``; None where the kernel does not apply (other terms, a column count that is
    not theirs, an X or ``V`` it cannot read, no Numba)."""
    if not (
        isinstance(terms_of, LogisticTerms)
        and 2 * terms_of.k == V.shape[1]
        and fused_applies(X)
        and V.dtype == X.dtype == torch.float64
        and fused.available()
    ):
        return None
    bounds = terms_of.bound_inputs
    arrays: Any = None if bounds is None else tuple(t.numpy() for t in bounds)
    P, T, Q, sums = fused.certificate_rows(
        read.numpy(),
        V.numpy(),
        terms_of.Y.numpy(),
        terms_of.neg_cy.numpy(),
        terms_of.curvature.numpy(),
        arrays,
    )
    if bounds is not None:
        terms_of.sums = torch.from_numpy(sums)
    return torch.from_numpy(P), torch.from_numpy(T), torch.from_numpy(Q).T
