"""Products with X by blocks of rows, each block read from memory once for two products while
it sits in the cache: the removal step's float64 certificate (:func:`certificate_products`, which
may read the problem's float32 copy of X widened block by block where it widens back to X
exactly) and the Hessian-vector products of the solvers' conjugate gradients (:func:`hvp`). Their
layouts are measured per machine like the thin products' (:func:`core.products.keep_fastest`).

The rounding margins of the certificate (:mod:`core.bounds`) hold for any summation order, so
any layout may compute a certified product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from core import fused
from core.certificate_terms import LogisticTerms, fused_applies, fused_certificate
from core.products import keep_fastest, match_blas_threads, x_times, xt_times

#: the fewest entries of X for which the :mod:`core.fused` layouts are measured: below it a pass
#: over X takes well under a millisecond whatever the layout, not worth loading Numba (about a
#: second per process) for
FUSED_MIN_ENTRIES = 1 << 20

#: curvatures ``C l''(z)`` below this are 0 in a float32 operator (:func:`curvature32`):
#: ``l''(z) ~ e^-|z|`` would be a float32 subnormal from ``|z| > 87`` (slow arithmetic on x86);
#: such rows weigh nothing next to the ridge, and the float64 certificate charges whatever the
#: operator leaves out
CURVATURE_FLOOR = 1e-20


def curvature32(curvature: torch.Tensor) -> torch.Tensor:
    """``curvature`` (float64) for :func:`hvp` on the problem's float32 copy of X: rounded to
    float32, with the values below :data:`CURVATURE_FLOOR` set to 0."""
    return torch.where(curvature >= CURVATURE_FLOOR, curvature, 0.0).to(torch.float32)


def hvp(
    X: torch.Tensor, curvature: torch.Tensor, V: torch.Tensor, ridge: float | torch.Tensor
) -> torch.Tensor:
    """``H' V`` per class without forming ``H'``: ``X^T (C l''(Z) (X V)) + lam n' V`` (two
    products with X: one pass each, or both per block of rows, in the layout of
    :data:`HVP_LAYOUTS` that :func:`calibrate_hvp` measured fastest). With X float32 (the
    problem's copy) and ``curvature`` float32 the products are float32, half the bytes of
    float64, and the result is float64 (``V``'s dtype): CG's vectors and recurrences stay
    float64, only its operator is rounded (about 1e-7 relative)."""
    layout = "two_passes"
    if X.device.type == "cpu":
        layout = _HVP_LAYOUT.get(_hvp_key(X, V.shape[1]), "two_passes")
    return _hvp_products(X, curvature, V.to(X.dtype), layout).to(V.dtype) + ridge * V


#: the ways :func:`hvp` may compute ``X^T (c * (X V))`` on the CPU: ``"two_passes"`` (one
#: product each, in :func:`core.products.thin_product`'s layouts), ``"blocked"`` and ``"blocked_numpy"`` (both
#: products per block of rows while it sits in the cache, by torch's or by NumPy's BLAS, the
#: latter on one thread whatever torch's count, :func:`core.products.match_blas_threads`): X read from memory
#: once per product instead of twice. On the AMD EPYC 2-vCPU VM, one thread, float32, X cold:
#: 3.4 against 2.5 ms (blocked_numpy) at n = 100,000, d = 64; 6.2 against 3.9 ms at 11,982 x 784
#: ``"fused"``: :func:`core.fused.hvp_rows`, each row read once for both products by a kernel
#: Numba compiled (where it is available and X has :data:`FUSED_MIN_ENTRIES`; on an AMD EPYC
#: 2-vCPU VM with slow memory, n = 100,000, d = 64, float32: 3.1 against 3.1-4.7 ms, and its
#: blocks' sums added in float64: 2e-8 against 2e-6 relative off the exact product)
HVP_LAYOUTS = ("two_passes", "blocked", "blocked_numpy", "fused")
#: (dtype, d, columns, one torch thread) -> a layout of :data:`HVP_LAYOUTS`, measured by
#: :func:`calibrate_hvp` (CPU only; unmeasured: two_passes)
_HVP_LAYOUT: dict[tuple[torch.dtype, int, int, bool], str] = {}


def _hvp_key(X: torch.Tensor, cols: int) -> tuple[torch.dtype, int, int, bool]:
    return (X.dtype, X.shape[1], cols, torch.get_num_threads() == 1)


def _hvp_products(
    X: torch.Tensor, curvature: torch.Tensor, V: torch.Tensor, layout: str
) -> torch.Tensor:
    """``X^T (curvature * (X V))`` (d, k) in ``layout`` (:data:`HVP_LAYOUTS`; the blocked ones
    on the CPU only; NumPy's where it reads every operand in place, else torch's; the fused
    kernel where it applies, else the blocked torch layout), in X's dtype (float64 from the
    fused kernel)."""
    if layout == "two_passes" or X.device.type != "cpu":
        return xt_times(X, curvature * x_times(X, V))
    n, d = X.shape
    k = V.shape[1]
    if layout == "fused":
        if fused_applies(X) and curvature.shape == (n, k) and fused.available():
            # float64 (its sums are), which hvp() returns as it is
            return torch.from_numpy(fused.hvp_rows(X.numpy(), curvature.numpy(), V.numpy()))
        layout = "blocked"
    rows = _block_rows(d)
    numpy = (
        layout == "blocked_numpy"
        and _numpy_blocks_apply(X, V)
        and curvature.dtype == X.dtype
        and curvature.shape == (n, k)
    )
    if numpy:
        Xn, cn, Vn = X.numpy(), curvature.numpy(), V.contiguous().numpy()
        Qn = np.zeros((d, k), dtype=Xn.dtype)
        part, scratch = np.empty_like(Qn), np.empty((min(rows, n), k), dtype=Xn.dtype)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            Xb, t = Xn[start:end], scratch[: end - start]
            np.matmul(Xb, Vn, out=t)
            np.multiply(t, cn[start:end], out=t)
            np.matmul(Xb.T, t, out=part)
            np.add(Qn, part, out=Qn)
        return torch.from_numpy(Qn)
    Q = torch.zeros((d, k), dtype=X.dtype)
    for start in range(0, n, rows):
        rows_of_x = X[start : start + rows]
        Q.addmm_(rows_of_x.T, (rows_of_x @ V).mul_(curvature[start : start + rows]))
    return Q


def calibrate_hvp(X: torch.Tensor, cols: int, repeats: int = 5) -> str:
    """Measure the layouts of :func:`hvp` (:data:`HVP_LAYOUTS`; NumPy's only with NumPy's BLAS
    found and X contiguous, float32 or float64) on ``X`` with ``cols``
    columns (interleaved, the best of ``repeats`` each) and keep the fastest for X's dtype,
    width and thread count, once per process (:func:`calibrate_certificate`). CPU only, and only
    where X has more rows than one block (else two passes, unmeasured). Nothing is kept when a
    measurement fails."""
    if X.device.type != "cpu":
        return "two_passes"
    key = _hvp_key(X, cols)
    if key in _HVP_LAYOUT:
        return _HVP_LAYOUT[key]
    if X.shape[0] <= _block_rows(X.shape[1]):
        return "two_passes"
    V = torch.ones((X.shape[1], cols), dtype=X.dtype)
    curvature = torch.full((X.shape[0], cols), 0.25, dtype=X.dtype)
    layouts = ["two_passes", "blocked"]
    if _numpy_blocks_apply(X, V) and match_blas_threads():
        layouts.append("blocked_numpy")
    if fused_applies(X) and X.numel() >= FUSED_MIN_ENTRIES and fused.available():
        layouts.append("fused")
    return keep_fastest(
        _HVP_LAYOUT,
        key,
        layouts,
        lambda layout: _hvp_products(X, curvature, V, layout),
        repeats,
    )


#: bytes of float64 X per block of :func:`certificate_products` (a block stays in the cache
#: between its two products: on the AMD VM 1-4 MiB of its 32 MiB L3 measured alike)
CERT_BLOCK_BYTES = 2 << 20
#: the ways :func:`certificate_products` may compute its two products on the CPU: ``"direct"``
#: (one pass each, in :func:`core.products.thin_product`'s layouts) and, per block of rows, ``"blocked"``
#: (torch's GEMMs), ``"blocked_rows"`` (the first product as ``(V^T X_b^T)^T``, which MKL runs
#: faster on some CPUs) and ``"blocked_numpy"`` (both by NumPy's BLAS on one thread, whatever
#: torch's count: on the AMD VM with two torch threads a single removal at 11,982 x 784 took 17.0
#: ms with NumPy's certificate and CG products against 21.8 with torch's; the thin products of
#: :data:`core.products.NUMPY_LAYOUTS` stay one-thread only). On the AMD EPYC 2-vCPU VM with a 32 MiB L3, X cold, the two
#: products took, per layout: one thread, n = 100,000, d = 64: 13.7 ms blocked, 8.5 ms
#: blocked_numpy; 11,982 x 784: 19.3 and 9.5 ms; two threads, 11,982 x 784: 12.0 ms blocked,
#: 9.4 ms blocked_rows. Each blocked layout also comes :data:`WIDENED` (its name + ``"_f32"``):
#: it reads the problem's float32 copy of X and widens each block to float64 in a buffer that
#: stays in the cache, half the bytes from memory for the same float64 values (only where that
#: copy widens back to X exactly, :meth:`core.problem.Problem.exact_float32`)
#: ``"fused"`` (and ``"fused_f32"``): :func:`core.fused.certificate_rows`, the whole certificate
#: row by row in one kernel Numba compiled, for the removal step's terms
#: (:class:`LogisticTerms`; any other terms: ``"blocked"``), where it is available and X has
#: :data:`FUSED_MIN_ENTRIES` (on an AMD EPYC 2-vCPU VM with slow memory, n = 100,000, d = 64,
#: one thread: 6.6-7.0 ms against 16-24 ms for the blocked layouts)
CERT_LAYOUTS = (
    "direct",
    "blocked",
    "blocked_rows",
    "blocked_numpy",
    "fused",
    "blocked_f32",
    "blocked_rows_f32",
    "blocked_numpy_f32",
    "fused_f32",
)
#: the suffix of the layouts that read the float32 copy of X, widened block by block
WIDENED = "_f32"
#: (dtype, d, columns, one torch thread, an exact float32 copy given) -> a layout of
#: :data:`CERT_LAYOUTS`, measured by :func:`calibrate_certificate` (CPU only; unmeasured: direct)
_CERT_LAYOUT: dict[tuple[torch.dtype, int, int, bool, bool], str] = {}


def _cert_key(
    X: torch.Tensor, cols: int, X32: torch.Tensor | None
) -> tuple[torch.dtype, int, int, bool, bool]:
    return (X.dtype, X.shape[1], cols, torch.get_num_threads() == 1, X32 is not None)


def certificate_products(
    X: torch.Tensor,
    V: torch.Tensor,
    terms_of: Callable[[torch.Tensor, torch.Tensor, int, int], None],
    X32: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two passes of a removal step's certificate: ``P = X V`` (n, c), ``T`` (c, n: the
    columns of ``X^T``'s argument, a function of each row's products, which
    ``terms_of(P[s:e], T[:, s:e], s, e)`` writes) and ``Q = X^T T^T`` (d, c).

    The blocked layouts (where :func:`calibrate_certificate` measured one faster, see
    :data:`CERT_LAYOUTS`): both products per block of rows (:data:`CERT_BLOCK_BYTES` of X), so
    that each block of X is read from memory once for both while it sits in the cache (on the
    AMD 2-vCPU VM, one thread, n = 100,000, d = 64: 10.8 against 19 ms). The sums are the same;
    only their order differs, which the rounding margins cover.

    ``X32``: a float32 tensor whose values widened to float64 are exactly X's (the caller's
    promise: :meth:`core.problem.Problem.exact_float32`), or None. With it the :data:`WIDENED`
    layouts may read it instead of X: the same float64 values, half the bytes."""
    layout = "direct"
    if X.device.type == "cpu":
        if X32 is not None and not _widening_applies(X, X32):
            X32 = None  # (as the calibration keys it)
        layout = _CERT_LAYOUT.get(_cert_key(X, V.shape[1], X32), "direct")
    return _certificate_products(X, V, terms_of, layout, X32)


def _certificate_products(
    X: torch.Tensor,
    V: torch.Tensor,
    terms_of: Callable[[torch.Tensor, torch.Tensor, int, int], None],
    layout: str,
    X32: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`certificate_products` in ``layout`` (one of :data:`CERT_LAYOUTS`; the blocked ones
    on the CPU only; a widened one without a float32 copy it can read: the same layout on X)."""
    n, d = X.shape
    cols = V.shape[1]
    if isinstance(terms_of, LogisticTerms):
        terms_of.sums = None  # (only this call's products may give the sums)
    widened = layout.endswith(WIDENED)
    layout = layout.removesuffix(WIDENED)
    if widened and not _widening_applies(X, X32):
        widened = False  # (never on a problem's shapes: its copy is contiguous and X's size)
    if layout == "blocked_numpy" and not (
        _numpy_blocks_apply(X, V) or (widened and V.dtype == X.dtype == torch.float64)
    ):
        layout = "blocked"  # NumPy would copy X (or promote it): never on the measured shapes
    if layout == "fused":
        read = X32 if widened and X32 is not None else X
        done = fused_certificate(X, read, V, terms_of)
        if done is not None:
            return done
        layout = "blocked"
    T = torch.empty((cols, n), dtype=X.dtype, device=X.device)
    if layout == "direct":
        P = x_times(X, V)
        terms_of(P, T, 0, n)
        return P, T, xt_times(X, T.T)
    rows = _block_rows(d)
    Q = torch.zeros((cols, d), dtype=X.dtype, device=X.device)
    numpy = layout == "blocked_numpy"  # the same memory through NumPy (its BLAS drops the GIL)
    # per block: X's rows (``block``: a view of X, or of the float32 copy widened into a buffer
    # that stays in the cache), its rows of P (``first``), then of T (``terms_of``), then
    # Q += T_b X_b (``second``)
    block: Callable[[int, int], Any]
    if not widened:
        source = X.numpy() if numpy else X

        def block(start: int, end: int) -> Any:
            return source[start:end]

    else:
        assert X32 is not None
        buffer = torch.empty((min(rows, n), d), dtype=X.dtype)
        if numpy:
            narrow, wide = X32.numpy(), buffer.numpy()

            def block(start: int, end: int) -> Any:
                out = wide[: end - start]
                np.copyto(out, narrow[start:end])
                return out

        else:

            def block(start: int, end: int) -> Any:
                return buffer[: end - start].copy_(X32[start:end])

    if layout == "blocked_rows":
        Pt = torch.empty((cols, n), dtype=X.dtype, device=X.device)
        P, Vt = Pt.T, V.T.contiguous()  # (P: a view, made contiguous at the end)

        def first(Xb: Any, start: int, end: int) -> None:
            torch.mm(Vt, Xb.T, out=Pt[:, start:end])

    else:
        P = torch.empty((n, cols), dtype=X.dtype, device=X.device)

        def first(Xb: Any, start: int, end: int) -> None:
            torch.mm(Xb, V, out=P[start:end])

    def second(Xb: Any, start: int, end: int) -> None:
        Q.addmm_(T[:, start:end], Xb)

    if numpy:
        Vn, Pn, Tn, Qn = V.contiguous().numpy(), P.numpy(), T.numpy(), Q.numpy()
        part = np.empty_like(Qn)

        def first(Xb: Any, start: int, end: int) -> None:
            np.matmul(Xb, Vn, out=Pn[start:end])

        def second(Xb: Any, start: int, end: int) -> None:
            np.matmul(Tn[:, start:end], Xb, out=part)
            np.add(Qn, part, out=Qn)

    for start in range(0, n, rows):
        end = min(n, start + rows)
        Xb = block(start, end)
        first(Xb, start, end)
        terms_of(P[start:end], T[:, start:end], start, end)
        second(Xb, start, end)
    return P.contiguous(), T, Q.T


def _numpy_blocks_apply(X: torch.Tensor, V: torch.Tensor) -> bool:
    """Whether ``"blocked_numpy"`` can read ``X`` in place: contiguous, float32 or float64, and
    ``V`` of the same dtype."""
    return X.is_contiguous() and X.dtype in (torch.float32, torch.float64) and V.dtype == X.dtype


def _widening_applies(X: torch.Tensor, X32: torch.Tensor | None) -> bool:
    """Whether the :data:`WIDENED` layouts can read ``X32`` for ``X``: a contiguous float32 CPU
    tensor of X's shape, X float64 on the CPU."""
    return (
        X32 is not None
        and X.dtype == torch.float64
        and X.device.type == "cpu"
        and X32.dtype == torch.float32
        and X32.device.type == "cpu"
        and X32.shape == X.shape
        and X32.is_contiguous()
    )


def _block_rows(d: int) -> int:
    """Rows per block of :func:`certificate_products`: :data:`CERT_BLOCK_BYTES` of float64
    rows, at least 512."""
    return max(512, CERT_BLOCK_BYTES // (8 * d))


def calibrate_certificate(
    X: torch.Tensor, cols: int, repeats: int = 5, X32: torch.Tensor | None = None
) -> str:
    """Measure the layouts of :func:`certificate_products` (:data:`CERT_LAYOUTS`; NumPy's only
    with NumPy's BLAS found and X contiguous, float32 or float64; the
    :data:`WIDENED` ones only with ``X32``, as :func:`certificate_products` takes it) on ``X``
    with ``cols`` columns (interleaved, the best of ``repeats`` each) and keep the fastest for
    X's dtype, width, thread count and whether ``X32`` is given, once per process like
    :func:`core.products.thin_product`'s layouts: the measurement took 0.5-1.3 s on the 2-vCPU VMs, which every
    later problem of that shape (a retrain from scratch, a reload) would pay again for the same
    answer. CPU only, and only where X has more rows than one block (else direct, unmeasured).
    Nothing is kept when a measurement fails."""
    if X.device.type != "cpu":
        return "direct"
    if X32 is not None and not _widening_applies(X, X32):
        X32 = None
    key = _cert_key(X, cols, X32)
    if key in _CERT_LAYOUT:
        return _CERT_LAYOUT[key]
    if X.shape[0] <= _block_rows(X.shape[1]):
        return "direct"
    V = torch.ones((X.shape[1], cols), dtype=X.dtype)
    # the removal step's terms (cols = 2K) and the bounds' sums, as it computes them
    labels = torch.ones((X.shape[0], max(1, cols // 2)), dtype=X.dtype)
    norms = torch.ones(X.shape[0], dtype=X.dtype)
    terms_of = LogisticTerms(
        labels,
        -labels,
        0.25 * labels,
        (labels, norms, norms, torch.zeros(labels.shape[1], dtype=X.dtype)),
    )

    def run(layout: str) -> None:
        P, T, _ = _certificate_products(X, V, terms_of, layout, X32)
        terms_of.bound_sums(P, T)

    numpy = match_blas_threads()
    offer_fused = (
        cols % 2 == 0
        and X.dtype == torch.float64
        and fused_applies(X)
        and X.numel() >= FUSED_MIN_ENTRIES
        and fused.available()
    )
    layouts = []
    for name in CERT_LAYOUTS:
        base = name.removesuffix(WIDENED)
        if name != base and X32 is None:
            continue
        if base == "fused" and not offer_fused:
            continue
        if base == "blocked_numpy" and not (
            numpy and (_numpy_blocks_apply(X, V) if name == base else V.dtype == torch.float64)
        ):
            continue
        layouts.append(name)
    return keep_fastest(_CERT_LAYOUT, key, layouts, run, repeats)
