"""Loss-perturbed L2 logistic regression in sum form, for K one-vs-rest columns at once.

Shapes: ``X`` (n, d) rows with ``||x_i|| <= 1``; ``Y`` (n, K) labels in {-1, +1} (K = 1 for a
binary model); ``C`` (n, K) per-row, per-class weights ``alive_i * omega_ik`` (``omega`` is the
optional negative-subsampling mask, 1 when unused; removed rows have weight 0); ``W``, ``B`` (d, K).

Objective of class k (docs/theory.md "Notation and objective"), with ``n_reg`` the number of
rows still in the model (every class regularises with all remaining rows, also when its negatives are subsampled):

    L_b(w_k) = sum_i C_ik l(z_ik) + (lam * n_reg / 2) ||w_k||^2 + b_k . w_k,   z_ik = Y_ik w_k . x_i
    grad     = X^T (C * l'(Z) * Y) + lam * n_reg * W + B
    Hessian  = X^T diag(C_k * l''(Z_k)) X + lam * n_reg * I        (one (d, d) block per class)

with ``l(z) = log(1 + e^-z)``, ``l'(z) = sigmoid(z) - 1``, ``l''(z) = sigmoid(z) sigmoid(-z)``.
The Hessian is SPD because lam * n_reg > 0. Every function takes device and dtype from its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.errors import NumericalError

#: max |l'''| of the logistic loss, 1/(6 sqrt 3) = 0.096225044864..., rounded up
#: (docs/theory.md "The gradient residual").
#: Deviation: the paper and its code use 1/4.
GAMMA = 0.09622505


#: rows per block in :func:`weighted_gram` (keeps the weighted copy of X in cache)
GRAM_BLOCK = 8192
#: the most elements of the weighted copy of a block in the batched :func:`weighted_gram` (GPU)
GRAM_BATCH_ELEMENTS = 1 << 26
#: rows per block in :func:`xt_dot` with several columns
XT_BLOCK = 4096


def xt_dot(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X^T M`` for a thin ``M`` (n, K), as ``(M^T X)^T``: the same sum, but a row-major pass
    over X (3x faster than the transposed GEMM on CPU). With K > 1 columns it goes over blocks
    of ``XT_BLOCK`` rows, so each block of X is read once for all of them (a single product
    read X once per column: 14 against 9.4 ms for K = 2, n = 100,000, d = 64). Any summation
    order is covered by the rounding margins. On CUDA, one product. Shapes: X (n, d), M (n, K)
    -> (d, K)."""
    n, k = M.shape
    if k == 1 or n <= XT_BLOCK or X.device.type != "cpu":
        return (M.T @ X).T
    out = torch.zeros((k, X.shape[1]), dtype=torch.promote_types(M.dtype, X.dtype), device=X.device)
    for start in range(0, n, XT_BLOCK):
        out.addmm_(M[start : start + XT_BLOCK].T, X[start : start + XT_BLOCK])
    return out.T


def margins(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Z = Y * (X W)``. Shapes: X (n, d), Y (n, K), W (d, K) -> (n, K)."""
    return Y * (X @ W)


def loss_derivatives(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``l'(Z)`` and ``l''(Z)`` of the logistic loss, elementwise and overflow-free."""
    sig_neg = torch.sigmoid(-Z)
    return -sig_neg, torch.sigmoid(Z) * sig_neg


def objective(
    X: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    W: torch.Tensor,
    lam: float,
    n_reg: float,
    B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class objective ``L_b(w_k)`` (shape (K,)); ``B=None`` gives ``L_0``."""
    Z = margins(X, Y, W)
    value = (C * F.softplus(-Z)).sum(0) + 0.5 * lam * n_reg * (W * W).sum(0)
    if B is not None:
        value = value + (B * W).sum(0)
    return value


def gradient(
    X: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    W: torch.Tensor,
    lam: float,
    n_reg: float,
    B: torch.Tensor | None = None,
    Z: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad L_b(W)`` (d, K); ``B=None`` gives ``grad L_0``. ``Z`` may be passed if known."""
    if Z is None:
        Z = margins(X, Y, W)
    d1, _ = loss_derivatives(Z)
    g = xt_dot(X, C * d1 * Y) + (lam * n_reg) * W
    if B is not None:
        g = g + B
    return g


def hessians(
    X: torch.Tensor,
    C: torch.Tensor,
    Z: torch.Tensor,
    lam: float,
    n_reg: float,
    dtype: torch.dtype | None = None,
    X32: torch.Tensor | None = None,
) -> torch.Tensor:
    """The K Hessian blocks ``X^T diag(C_k l''(Z_k)) X + lam n_reg I`` as a (K, d, d) tensor.

    ``dtype`` selects the precision of the product (float32, the default, is allowed: every mismatch is
    paid for by the float64 certificate, docs/theory.md "Float32 Hessians"); ``X32`` as in
    :func:`weighted_gram`.
    """
    _, d2 = loss_derivatives(Z)
    return weighted_gram(X, C * d2, lam * n_reg, dtype=dtype, X32=X32)


def batched_gram(device: torch.device) -> bool:
    """Whether :func:`weighted_gram` forms the K classes' Grams in one batched product (not on
    the CPU, where a product per class was as fast or faster)."""
    return device.type != "cpu"


def weighted_gram(
    X: torch.Tensor,
    weights: torch.Tensor,
    ridge: float | torch.Tensor,
    dtype: torch.dtype | None = None,
    X32: torch.Tensor | None = None,
) -> torch.Tensor:
    """``X^T diag(weights_k) X + ridge I`` for each column k of ``weights`` (n, K) -> (K, d, d).

    ``dtype`` bfloat16 (the removal step's ``hessian="bfloat16"``): products of bfloat16
    copies of the blocks (from ``X32``), summed in float32, and H in float32; a preconditioner,
    whose step the removal refines to its tolerance in float64.

    ``X32``: a float32 copy of X (the problem's, :attr:`core.problem.Problem.X32`), read instead
    of converting every block of X at every call when ``dtype`` is float32 (half the bytes, and
    no conversion: 5 against 10 ms for n = 100,000, d = 64 on the 2-vCPU VM). Accumulated over
    blocks of rows, so the weighted copy of a block stays in cache; on the CPU one product per
    class (a batched product was as fast for d = 64 and 2x slower for d = 784, K = 1), elsewhere
    the K classes in one batched product (:data:`GRAM_BATCH_ELEMENTS` bounds its weighted copy).
    """
    dtype = dtype or X.dtype
    low = dtype == torch.bfloat16  # bfloat16 products, float32 sums: H is float32
    source = X32 if X32 is not None and dtype in (torch.float32, torch.bfloat16) else X
    n, d = X.shape
    k = weights.shape[1]
    H = torch.zeros((k, d, d), dtype=torch.float32 if low else dtype, device=X.device)
    batched = k > 1 and batched_gram(X.device)
    block = max(1, min(GRAM_BLOCK, GRAM_BATCH_ELEMENTS // (k * d))) if batched else GRAM_BLOCK
    for start in range(0, n, block):
        Xb = source[start : start + block].to(dtype)
        wb = weights[start : start + block].to(dtype)
        if batched:
            # (K, d, b) @ (K, b, d): the K weighted Grams of the block in one product
            A, B = Xb.T.expand(k, d, Xb.shape[0]), Xb[None] * wb.T[:, :, None]
            if low:
                H += _bmm_float32(A, B)
            else:
                H.baddbmm_(A, B)
            continue
        for j in range(k):
            if low:
                H[j] += _bmm_float32(Xb.T[None], (Xb * wb[:, j : j + 1])[None])[0]
            else:
                H[j].addmm_(Xb.T, Xb * wb[:, j : j + 1])
    H.diagonal(dim1=1, dim2=2).add_(ridge)
    return H


def _bmm_float32(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` of bfloat16 batches as float32: on CUDA the product's float32 sums are kept
    (``out_dtype``); elsewhere (tests on the CPU) the bfloat16 result is widened."""
    if A.device.type == "cuda":
        return torch.bmm(A, B, out_dtype=torch.float32)
    return torch.bmm(A, B).to(torch.float32)


def hessian_vector_product(
    X: torch.Tensor, C: torch.Tensor, Z: torch.Tensor, S: torch.Tensor, lam: float, n_reg: float
) -> torch.Tensor:
    """``H S`` per class without forming H: ``X^T (C l''(Z) (X S)) + lam n_reg S``. (d, K)."""
    _, d2 = loss_derivatives(Z)
    return xt_dot(X, C * d2 * (X @ S)) + (lam * n_reg) * S


def cholesky_factor(H: torch.Tensor, lam: float) -> torch.Tensor:
    """Lower Cholesky factors of the (K, d, d) blocks.

    Raises:
        NumericalError: the factorisation failed (names lambda and the matrix size).
    """
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):
        raise NumericalError(
            f"Cholesky factorisation of the {H.shape[-1]}x{H.shape[-1]} Hessian failed "
            f"(lam={lam:g}, dtype={H.dtype}); the matrix should be SPD since lam*n > 0, so "
            "its entries are probably non-finite"
        )
    return L


def solve_factored(L: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve with the factors of :func:`cholesky_factor`. Shapes: L (K, d, d), rhs (d, K).

    Two triangular solves: the same arithmetic as ``torch.cholesky_solve``, which took 6-15 ms
    instead of 0.2 ms for d = 784 with 2 threads on the loaded 2-vCPU VM."""
    b = rhs.T.unsqueeze(-1).to(L.dtype)
    y = torch.linalg.solve_triangular(L, b, upper=False)
    sol = torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1).T
    return sol.to(rhs.dtype)


def frobenius(T: torch.Tensor) -> float:
    """Frobenius norm as a Python float (float64 reduction)."""
    return math.sqrt(float((T.double() ** 2).sum()))
