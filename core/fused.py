"""Row-by-row kernels compiled by Numba (CPU): the removal step's two products fused into one
pass over X, each row read once for everything done with it.

:mod:`core.blocked` offers them as the layouts ``"fused"`` of the certificate and of the
Hessian-vector product, measured beside the BLAS layouts on each machine like those
(:func:`core.products.keep_fastest`): where BLAS is the faster (wide X, many classes), it is kept.

- :func:`certificate_rows`: per row ``x_i`` (float64, or the float32 copy widened as it is read),
  ``p = x_i V`` (the ``2K`` products of the certificate), its terms ``t`` (``-C y`` times the
  logistic ``sigmoid(-y p_k)`` and ``C l'' p_{K+k}``, the certificate's terms,
  :class:`core.certificate_terms.LogisticTerms`) and ``Q += t x_i``, all in float64, and with them the
  sums over the rows that the step's bounds take (:data:`SUMS`). BLAS made the same sums as two
  thin products per block of rows with a float64 buffer between them (on a 2-vCPU AMD EPYC VM
  with slow memory, n = 100,000, d = 64: 16-24 ms for the step's certificate; this kernel
  6.0-7.0 ms).
- :func:`hvp_rows`: ``X^T (c * (X V))`` per row, in X's dtype (float32 for the steps' CG, as
  BLAS computes it), the sum of each block of :data:`HVP_FLUSH_ROWS` rows added into a float64
  total (BLAS adds its blocks' sums in float32).

The rounding margins of the certificate (:mod:`core.bounds`) hold for any summation order, so
the kernels may sum in any order: they are compiled with reassociation and fused multiply-adds
allowed (``fastmath={"reassoc", "contract"}``, which vectorises a row's dot products) and
nothing else of fast math (NaN and infinities propagate as in IEEE arithmetic, no approximate
functions or reciprocals). Each runs without the GIL. Numba compiles them on first use and keeps
the machine code in ``__pycache__`` (seconds once, then about a second to load per process);
without Numba (:func:`available` false) the blocked layouts stay the only ones.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np

#: rows whose float32 sums :func:`hvp_rows` adds into its float64 total at a time
HVP_FLUSH_ROWS = 256

_lock = threading.Lock()
_kernels: dict[str, Any] | None = None
_failed = False


def available() -> bool:
    """Whether Numba imports and the kernels compiled (compiles them on the first call; False
    for good after a failure)."""
    return _compiled() is not None


def _compiled() -> dict[str, Any] | None:
    global _kernels, _failed
    with _lock:
        if _kernels is None and not _failed:
            try:
                _kernels = _compile()
            except Exception:  # noqa: BLE001 - no Numba, or it cannot compile here: BLAS only
                _failed = True
        return _kernels


def _compile() -> dict[str, Any]:
    import numba  # noqa: PLC0415 - only where a fused layout is measured

    def jit(kernel: Any) -> Any:
        return numba.njit(
            nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"}
        )(kernel)

    with warnings.catch_warnings():  # a read-only __pycache__: compiled, not cached
        warnings.simplefilter("ignore", numba.NumbaWarning)
        cert = jit(_certificate_kernel)
        hvp = jit(_hvp_kernel)
        for dtype in (np.float32, np.float64):  # each signature the layouts use, now
            X = np.ones((3, 2), dtype=dtype)
            ones, row = np.ones((3, 1)), np.ones(3)
            cert(X, np.ones((2, 2)), ones, ones, ones, ones, row, row, np.ones(1),
                 np.empty((3, 2)), np.empty((2, 3)), np.zeros((2, 2)), np.zeros((6, 1)))  # fmt: skip
            hvp(X, np.ones((3, 1), dtype=dtype), np.ones((1, 2), dtype=dtype), np.zeros((1, 2)))
    return {"certificate": cert, "hvp": hvp}


#: the rows of :func:`certificate_rows`' sums (each (K,)): ``sum_i |t_i| ||x_i||`` of each half of
#: the terms, ``sum_i C_i ||x_i||^2``, ``sum_i C_i ||x_i||^2 |x_i.s|`` and, with ``u_i = |x_i.s|
#: + s_err ||x_i||``, ``sum_i (C_i u_i^2)^2`` and ``sum_i ||x_i|| C_i u_i^2``
SUMS = ("abs_gradient_terms", "abs_curvature_terms", "alive_sq", "curvature_sq",
        "remainder_sq", "remainder_rows")  # fmt: skip


def certificate_rows(
    X: np.ndarray,
    V: np.ndarray,
    Y: np.ndarray,
    neg_cy: np.ndarray,
    curvature: np.ndarray,
    bound_inputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The certificate's products in one pass: ``P = X V`` (n, 2K), its terms ``T`` (2K, n:
    ``neg_cy * sigmoid(-Y P[:, :K])`` and ``curvature * P[:, K:]``) and ``Q = T X`` (2K, d), all
    float64, and the sums the step's bounds take from them (6, K; :data:`SUMS`, zeros without
    ``bound_inputs``). ``X`` (n, d) float32 or float64; ``V`` (d, 2K); ``Y``, ``neg_cy``,
    ``curvature`` (n, K) float64; ``bound_inputs``: the row weights ``C`` (n, K), the row norms
    (n,), their squares (n,) and ``s_err`` (K,).

    Raises:
        RuntimeError: Numba is not available (:func:`available`)."""
    kernels = _compiled()
    if kernels is None:
        raise RuntimeError("the fused kernels need Numba, which is not available")
    n, d = X.shape
    cols = V.shape[1]
    k = cols // 2
    P = np.empty((n, cols))
    T = np.empty((cols, n))
    Q = np.zeros((cols, d))
    sums = np.zeros((len(SUMS), k))
    if bound_inputs is None:
        bound_inputs = (np.zeros((n, k)), np.zeros(n), np.zeros(n), np.zeros(k))
    weights, norms, norms_sq, s_err = (
        np.ascontiguousarray(a, dtype=np.float64) for a in bound_inputs
    )
    kernels["certificate"](
        np.ascontiguousarray(X),
        np.ascontiguousarray(V.T, dtype=np.float64),
        *(np.ascontiguousarray(a, dtype=np.float64) for a in (Y, neg_cy, curvature)),
        weights,
        norms,
        norms_sq,
        s_err,
        P,
        T,
        Q,
        sums,
    )
    return P, T, Q, sums


def hvp_rows(X: np.ndarray, curvature: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``X^T (curvature * (X V))`` (d, k) float64, the products in X's dtype (float32 or
    float64; ``curvature`` (n, k) and ``V`` (d, k) are taken in it).

    Raises:
        RuntimeError: Numba is not available (:func:`available`)."""
    kernels = _compiled()
    if kernels is None:
        raise RuntimeError("the fused kernels need Numba, which is not available")
    Q = np.zeros((V.shape[1], X.shape[1]))
    kernels["hvp"](
        np.ascontiguousarray(X),
        np.ascontiguousarray(curvature, dtype=X.dtype),
        np.ascontiguousarray(V.T, dtype=X.dtype),
        Q,
    )
    return Q.T


def _certificate_kernel(X, Vt, Y, neg_cy, curvature, C, norms, norms_sq, s_err, P, T, Q, sums):  # type: ignore[no-untyped-def] # noqa: ANN001, ANN202, E501
    n, d = X.shape
    k = Vt.shape[0] // 2
    row = np.empty(d)
    q = np.zeros(Q.shape)
    for i in range(n):
        xi = X[i]
        for j in range(d):
            row[j] = xi[j]  # widened to float64 (exactly)
        r = norms[i]
        r2 = norms_sq[i]
        # class c's two columns together (one loop over the row for both products, one for
        # both sums: twice as fast as a loop per column)
        for c in range(k):
            va = Vt[c]
            vb = Vt[k + c]
            a = 0.0
            b = 0.0
            for j in range(d):
                a += row[j] * va[j]
                b += row[j] * vb[j]
            P[i, c] = a
            P[i, k + c] = b
            z = -(Y[i, c] * a)
            if z >= 0.0:
                s = 1.0 / (1.0 + math.exp(-z))
            else:
                e = math.exp(z)
                s = e / (1.0 + e)
            ta = neg_cy[i, c] * s
            tb = curvature[i, c] * b
            T[c, i] = ta
            T[k + c, i] = tb
            qa = q[c]
            qb = q[k + c]
            for j in range(d):
                qa[j] += ta * row[j]
                qb[j] += tb * row[j]
            # the bounds' sums (SUMS)
            w = C[i, c]
            xs = abs(b)
            u = xs + s_err[c] * r
            wu = w * u * u
            sums[0, c] += abs(ta) * r
            sums[1, c] += abs(tb) * r
            sums[2, c] += w * r2
            sums[3, c] += r2 * (w * xs)
            sums[4, c] += wu * wu
            sums[5, c] += r * wu
    for c in range(2 * k):
        for j in range(d):
            Q[c, j] += q[c, j]


def _hvp_kernel(X, curvature, Vt, Q):  # type: ignore[no-untyped-def] # noqa: ANN001, ANN202
    n, d = X.shape
    cols = Vt.shape[0]
    part = np.zeros((cols, d), dtype=X.dtype)
    zero = part[0, 0] * 0  # (X's dtype)
    for start in range(0, n, HVP_FLUSH_ROWS):
        for i in range(start, min(n, start + HVP_FLUSH_ROWS)):
            for c in range(cols):
                acc = zero
                for j in range(d):
                    acc += X[i, j] * Vt[c, j]
                t = acc * curvature[i, c]
                for j in range(d):
                    part[c, j] += t * X[i, j]
        for c in range(cols):
            for j in range(d):
                Q[c, j] += part[c, j]
                part[c, j] = zero
