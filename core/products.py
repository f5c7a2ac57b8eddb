"""Products with the data matrix X for the Newton solver and the removal step: thin products in
the layout measured fastest once per shape (:func:`keep_fastest`, which :mod:`core.blocked`'s
products by blocks of rows use too), and the relative costs that the removal step's solver
choice weighs (:func:`core.removal.choose_solver`).

The rounding margins of the certificate (:mod:`core.bounds`) hold for any summation order, so
any layout may compute a certified product.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.loss import xt_dot

#: cost of one multiply-add of the float32 weighted Gram matrix (from the problem's float32 X)
#: relative to one of a float64 matrix-vector product over X, per device type; CPU (2-vCPU VM):
#: 5.5 products at n = 100,000, d = 64, 37 at 11,982 x 784 (1/12 fits the close, narrow case)
GRAM_COST = {"cpu": 1 / 12, "cuda": 1 / 64}
#: cost of a float32 product of the removal step's CG relative to a float64 one: half the bytes
#: on the CPU (0.75 against 1.5 ms at 11,982 x 784); none assumed on CUDA (launch bound)
F32_PRODUCT_COST = {"cpu": 0.5, "cuda": 1.0}


def gram_cost(device: torch.device) -> float:
    """:data:`GRAM_COST` of ``device``'s type (the CPU's for an unknown type)."""
    return GRAM_COST.get(device.type, GRAM_COST["cpu"])


def f32_product_cost(device: torch.device) -> float:
    """:data:`F32_PRODUCT_COST` of ``device``'s type (the CPU's for an unknown type)."""
    return F32_PRODUCT_COST.get(device.type, F32_PRODUCT_COST["cpu"])


#: the widest product for which one matrix-vector product per column is considered (CPU)
THIN_COLUMNS = 4

#: (dtype, d, columns, transposed, one torch thread) -> the layout of :func:`thin_product`
#: measured fastest by :func:`_calibrate` (CPU only) on the first matrix of that shape: the row
#: views of later epochs (:mod:`core.rowview`, fewer rows) use it without measuring again (a
#: measurement is dozens of products: on a background fit it made the fit 3x slower)
_LAYOUT: dict[tuple[torch.dtype, int, int, bool, bool], str] = {}
_LAYOUT_LOCK = threading.Lock()


def thin_product(X: torch.Tensor, V: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``X @ V`` (or ``X^T @ V``) for a thin ``V``, reading row-major X once where it pays.

    With 1 to :data:`THIN_COLUMNS` columns on the CPU, the fastest layout is measured once per
    dtype, width and column count (:func:`_calibrate`, on the first such matrix): one GEMM
    (``X @ V``, ``(V^T X)^T``), ``"rows"`` (``X @ V`` as ``(V^T X^T)^T``), for ``X^T`` the
    blocked GEMM of :func:`core.loss.xt_dot` and ``"split"`` (:func:`_split_xt`), a
    matrix-vector product per
    column, or one GEMM on ``V`` padded with zero columns (:data:`PADDED`). On the Intel 2-vCPU
    VM (2 threads, float64, 11,982 x 784) 2 columns took 2.3 ms as a GEMM, 1.45 as ``"rows"``
    (one matrix-vector product: 1.45), and ``X^T`` 2.7 ms as a GEMM, 1.6 as ``"split"``; on an
    AMD VM the GEMMs took 2-5x two products, and padding to 4 columns halved ``X^T``. The
    rounding margins cover any summation order. Otherwise (wider ``V``, CUDA) one product."""
    cols = V.shape[1]
    if X.device.type != "cpu" or not 1 <= cols <= THIN_COLUMNS:
        return _product(X, V, transpose, "blocked" if transpose else "gemm")
    key = (X.dtype, X.shape[1], cols, transpose, torch.get_num_threads() == 1)
    layout = _LAYOUT.get(key)
    if layout is None:
        layout = _calibrate(X, V, transpose, key)
    return _product(X, V, transpose, layout)


def _product(X: torch.Tensor, V: torch.Tensor, transpose: bool, layout: str) -> torch.Tensor:
    """``X @ V`` or ``X^T @ V`` in ``layout`` (:func:`thin_product`)."""
    if layout in NUMPY_LAYOUTS:
        return _numpy_product(X, V, transpose, flip=layout == "numpy_t")
    if layout == "columns":
        A = X.T if transpose else X
        return torch.stack([torch.mv(A, V[:, j]) for j in range(V.shape[1])], dim=1)
    if layout in PADDED:
        return _padded(X, V, transpose, PADDED[layout])
    if not transpose:
        return (V.T.contiguous() @ X.T).T if layout == "rows" else X @ V
    if layout == "split":
        return _split_xt(X, V)
    return xt_dot(X, V) if layout == "blocked" else (V.T @ X).T


#: layouts that pad the thin factor with columns of zeros up to a width where the BLAS is
#: faster (one GEMM): on the AMD 2-vCPU VM (MKL, float64, n = 100,000, d = 64) ``X^T M`` took
#: 9.8 ms with 2 columns and 4.2 with 4, ``X v`` 6.7 ms with 1 column and 3.1 with 2
PADDED = {"pad2": 2, "pad4": 4}


def _padded(X: torch.Tensor, V: torch.Tensor, transpose: bool, width: int) -> torch.Tensor:
    """``X @ V`` or ``X^T @ V`` as one GEMM on ``V`` padded with zero columns to ``width``: the
    extra columns are exact zeros, the wanted ones the same sums (no padding from ``width``
    columns on)."""
    k = V.shape[1]
    width = max(width, k)
    if transpose:
        Mt = torch.zeros((width, X.shape[0]), dtype=V.dtype, device=V.device)
        Mt[:k] = V.T
        return (Mt @ X).T[:, :k]
    Vp = torch.zeros((X.shape[1], width), dtype=V.dtype, device=V.device)
    Vp[:, :k] = V
    return (X @ Vp)[:, :k]


#: layouts that hand the product to NumPy's BLAS (OpenBLAS in NumPy's wheels) on the same
#: memory, without a copy. torch's MKL picks slow kernels on some CPUs: on the AMD EPYC 2-vCPU
#: VM (one thread, 100,000 x 64) ``X v`` took 7.5 ms in float64 and 3.0 ms in float32 with
#: torch, 3.6 and 0.7 ms with NumPy; where MKL is the faster it is kept. Measured per shape
#: like every layout (:func:`_calibrate`), and only with one torch thread (the worker's on two
#: cores): with more, NumPy's thread pool spun beside torch's and slowed training 1.4-1.8x.
#: ``"numpy_t"``: the transposed form of the same product.
NUMPY_LAYOUTS = ("numpy", "numpy_t")


def _numpy_product(X: torch.Tensor, V: torch.Tensor, transpose: bool, flip: bool) -> torch.Tensor:
    """``X @ V`` or ``X^T @ V`` by NumPy's BLAS on the tensors' memory (CPU): as ``X V`` and
    ``X^T V``, or with ``flip`` as ``(V^T X^T)^T`` and ``(V^T X)^T`` (the BLAS reads X in the
    other order). NumPy releases the GIL inside the BLAS call."""
    if V.dtype != X.dtype:  # NumPy would promote (a float64 copy of a float32 X): never here
        raise TypeError(f"product of {X.dtype} X with {V.dtype} V")
    a, b = X.numpy(), V.numpy()
    if transpose:
        out = (b.T @ a).T if flip else a.T @ b
    else:
        out = (b.T @ a.T).T if flip else a @ b
    return torch.from_numpy(out)


def match_blas_threads() -> bool:
    """Give NumPy's own BLAS one thread (the layouts of :data:`NUMPY_LAYOUTS` are measured
    and used only with one torch thread; the certificate's and :func:`core.blocked.hvp`'s blocked NumPy
    layouts with any, each block's products on the calling thread), once per process, before
    its first product here:
    its thread count never changes under a running product. Other BLAS libraries in the
    process (SciPy's) are left as they are. Returns whether NumPy's BLAS was found (and now
    runs one thread); without it the NumPy layouts are not measured."""
    global _BLAS_ONE
    if _BLAS_ONE is not None:
        return _BLAS_ONE
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - scikit-learn's dependency

    site = Path(np.__file__).resolve().parent.parent
    found = False
    for pool in ThreadpoolController().select(user_api="blas").lib_controllers:
        path = Path(pool.filepath).resolve()
        if path.is_relative_to(site / "numpy.libs") or path.is_relative_to(site / "numpy"):
            pool.set_num_threads(1)
            found = True
    _BLAS_ONE = found
    return found


_BLAS_ONE: bool | None = None


def _split_xt(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X^T M`` as a batched product over equal row chunks (one per thread, at least 2), summed:
    each thread reads its own rows (a thin GEMM splits X's columns between the threads)."""
    n, d = X.shape
    chunks = max(2, torch.get_num_threads())
    rows = n // chunks
    if rows == 0:
        return (M.T @ X).T
    Mt = M.T.contiguous()  # (k, n)
    k, cut = Mt.shape[0], chunks * rows
    parts = torch.bmm(
        Mt[:, :cut].reshape(k, chunks, rows).transpose(0, 1), X[:cut].reshape(chunks, rows, d)
    )
    out = parts.sum(0)
    if cut < n:
        out = out + Mt[:, cut:] @ X[cut:]
    return out.T


def _calibrate(
    X: torch.Tensor,
    V: torch.Tensor,
    transpose: bool,
    key: tuple[torch.dtype, int, int, bool, bool],
    repeats: int = 5,
) -> str:
    """Time the layouts on ``X`` (interleaved, the best of ``repeats`` each, so that a burst of
    load on a shared machine hits all of them) and remember the fastest for ``key``."""
    base = ("gemm", "blocked", "split", "columns") if transpose else ("gemm", "rows", "columns")
    cols = V.shape[1]
    layouts = base + tuple(name for name, width in PADDED.items() if width > cols)
    if X.dtype in (torch.float32, torch.float64) and key[-1] and match_blas_threads():
        layouts += NUMPY_LAYOUTS
    return keep_fastest(
        _LAYOUT, key, layouts, lambda layout: _product(X, V, transpose, layout), repeats
    )


#: the clock the calibrations read (a test's own clock makes their choice deterministic)
_clock = time.perf_counter


def keep_fastest(
    table: dict[Any, str],
    key: Any,
    layouts: Sequence[str],
    run: Callable[[str], object],
    repeats: int,
) -> str:
    """Time ``run(layout)`` for each of ``layouts``, interleaved, the best of ``repeats`` each
    (so that a burst of load on a shared machine hits all of them), and keep the fastest in
    ``table`` under ``key`` unless another thread kept one first; returns the one kept. A
    measurement that raises keeps nothing."""
    best = dict.fromkeys(layouts, math.inf)
    for _ in range(repeats):
        for layout in layouts:
            start = _clock()
            run(layout)
            best[layout] = min(best[layout], _clock() - start)
    with _LAYOUT_LOCK:
        return table.setdefault(key, min(layouts, key=best.__getitem__))


def calibrate_products(X: torch.Tensor, columns: tuple[int, ...]) -> None:
    """Measure the layouts of :func:`thin_product` on ``X`` for these column counts ahead of
    the first request (both directions; a few products per count)."""
    for cols in columns:
        if X.device.type == "cpu" and 1 <= cols <= THIN_COLUMNS:
            V = torch.ones((X.shape[1], cols), dtype=X.dtype)
            M = torch.ones((X.shape[0], cols), dtype=X.dtype)
            thin_product(X, V, transpose=False)
            thin_product(X, M, transpose=True)


def x_times(X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``X @ V`` (n, K) for a thin ``V`` (d, K)."""
    return thin_product(X, V, transpose=False)


def xt_times(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X^T @ M`` (d, K) for a thin ``M`` (n, K)."""
    return thin_product(X, M, transpose=True)
