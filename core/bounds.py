"""Sound a-priori residual bounds for one Newton removal step (docs/theory.md, "The gradient
residual").

Per class k and committed step s_k, the gradient residual of the new weights grows by at most

    inc_k = ||H' s_k - Delta_k|| + (gamma/2) min( ||X||_2 sqrt(sum C (x_i.s_k)^4),
                                                  sum C (x_i.s_k)^2 ||x_i|| ) + margin

Deviations from Guo et al. (Cor. 1/2): the tight gamma = 1/(6 sqrt 3) instead of 1/4; the factor
1/2 of the integral form of the remainder (the paper's mean-value step does not hold for vector
maps); the smaller of the spectral and row forms; the exact float64 spectral norm of the full
training matrix instead of 20 power iterations (which under-estimate); the linear-solve residual
``||H's - Delta||`` added explicitly, so any SPD solve (float32, stale, jittered) is sound.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from core.loss import GAMMA

UNIT_ROUNDOFF = 2.0**-53

#: a float, or a 0-d float64 tensor left on the device (a removal step's certificate reads the
#: device once, at its end)
Scalar = TypeVar("Scalar", float, torch.Tensor)


def spectral_norm_upper(X: torch.Tensor) -> float:
    """An upper bound on ``||X||_2``, valid for every subset of X's rows.

    ``sqrt(eigvalsh(X^T X).max())`` in float64, plus a rounding margin on the eigenvalue
    (``(n + d) u trace(X^T X)``, trace >= the largest eigenvalue), times ``1 + 1e-9``. Subsets are
    covered because ``||X'v||^2 <= ||Xv||^2`` (Courant-Fischer).
    """
    X64 = X.double()
    gram = X64.T @ X64
    top = float(torch.linalg.eigvalsh(gram)[-1])
    n, d = X.shape
    margin = (n + d) * UNIT_ROUNDOFF * float(gram.diagonal().sum())
    return math.sqrt(max(top, 0.0) + margin) * (1 + 1e-9)


def remainder_from_sums(
    weighted_sq: torch.Tensor, weighted_rows: torch.Tensor, x_norm2: float
) -> torch.Tensor:
    """Bound on ``||R(s_k)||`` per class (K,): ``(gamma/2) * min(spectral form, row form)``
    from their two sums over the remaining rows, ``weighted_sq = sum_i (C_i (x_i.s_k)^2)^2``
    (the spectral form is ``||X||_2 sqrt`` of it; the subsampling weights enter squared) and
    ``weighted_rows = sum_i ||x_i|| C_i (x_i.s_k)^2`` (the row form), each ``x_i.s_k`` taken at
    an upper bound of its exact value. The removal step's certificate sums them with its
    products (:meth:`core.certificate_terms.LogisticTerms.bound_sums`)."""
    return (GAMMA / 2) * torch.minimum(x_norm2 * torch.sqrt(weighted_sq), weighted_rows)


def rounding_margin(
    n: int,
    d: int,
    abs_grad_terms: Scalar,
    lam: float,
    n_reg: Scalar,
    w_norm: Scalar,
    anchor_norm: Scalar,
) -> Scalar:
    """Summation margin ``(n + d) u (sum |l'_i| ||x_i|| + lam n ||w|| + ||g_a||)`` of a float64
    gradient: it makes a computed residual norm a rigorous upper bound (docs/theory.md, "Float32
    Hessians, float64 certificates"). Floats give a float, 0-d tensors a tensor (no device
    read)."""
    return (n + d) * UNIT_ROUNDOFF * (abs_grad_terms + lam * n_reg * w_norm + anchor_norm)


def product_error(d: int) -> float:
    """``gamma_d``: the computed float64 product ``fl(x . v)`` of two d-vectors differs from the
    exact one by at most ``gamma_d |x| . |v| <= gamma_d ||x|| ||v||`` (``d u / (1 - d u)``, taken
    as ``1.01 d u``: valid while ``d u < 0.0099``, that is for any ``d`` below ``8e13``)."""
    return 1.01 * d * UNIT_ROUNDOFF


def margins_rounding(d: int, weighted_sq_norms: torch.Tensor, V: torch.Tensor) -> float:
    """:func:`margins_rounding_tensor` as a float."""
    return float(margins_rounding_tensor(d, weighted_sq_norms, V))


def margins_rounding_tensor(
    d: int, weighted_sq_norms: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """Rounding of the products ``z_ik = x_i . v_k`` carried into a gradient-like sum
    ``sum_i C_ik f(z_ik) x_i`` through an ``f`` with Lipschitz constant at most 1/4 (``l'`` of the
    logistic loss, and ``l''`` with its smaller constant ``1/(6 sqrt 3)``):
    ``sum_k (gamma_d / 4) ||v_k|| sum_i C_ik ||x_i||^2``. The summation margin
    (:func:`rounding_margin`) covers the sum's own rounding, not its terms' inputs.

    ``weighted_sq_norms`` (K,): ``sum_i C_ik ||x_i||^2`` (or another weight per row, e.g. times
    ``|x_i . s_k|`` for the curvature's rounding); V (d, K)."""
    norms = torch.linalg.vector_norm(V, dim=0)
    return product_error(d) / 4 * (weighted_sq_norms * norms).sum()
