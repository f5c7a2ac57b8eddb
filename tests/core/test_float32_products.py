"""The float32 copy of X (core.problem.Problem.X32) and the product layouts (core.products): the
copy feeds only the solvers (CG's Hessian-vector products, the float32 Gram matrix), never the
float64 certificate, which is checked here against an independent float64 computation (numpy)
of the gradient residual and of ``H' s - Delta`` for the step actually applied."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import core
import core.blocked as by_blocks
import core.products as products
from core.loss import weighted_gram
from core.removal import CURVATURE_FLOOR, SolveOptions, newton_step
from tests.core.conftest import make_data


def _binary_model() -> core.Model:
    X, y = make_data(1500, 200, 2, 0)
    return core.train(X, y, lam=1e-3, sigma=10.0, seed=7, max_removals=None, device="cpu")


def _independent(
    model: core.Model, step, rows: list[int], W0: torch.Tensor | None = None
) -> tuple[float, np.ndarray]:
    """``||grad L_0(W_new; D') - g_a||_F`` and ``||H'(W) s - Delta||`` per class, in numpy
    float64 from the float64 rows, the old (``W0``, default the epoch's) and new weights alone."""
    p, e = model._problem, model._epoch
    X, Y, omega = (t.cpu().numpy() for t in (p.X, p.Y, p.omega))
    W = (e.W if W0 is None else W0).cpu().numpy()
    W_new = step.W.cpu().numpy()
    keep = e.alive.cpu().numpy().copy()
    keep[rows] = False
    C = omega * keep[:, None]
    n_after = keep.sum()

    def lprime(Z: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp overflows to inf: l' -> -0, l'' -> 0, exact
            return -1.0 / (1.0 + np.exp(Z))

    Z_new = Y * (X @ W_new)
    grad = X.T @ (C * lprime(Z_new) * Y) + p.lam * n_after * W_new
    anchor = np.linalg.norm(grad - e.acct.anchor_grad.cpu().numpy())
    Z = Y * (X @ W)
    with np.errstate(over="ignore"):
        curvature = C / ((1.0 + np.exp(Z)) * (1.0 + np.exp(-Z)))
    S = W_new - W
    delta = X[rows].T @ (omega[rows] * lprime(Z[rows]) * Y[rows]) + p.lam * len(rows) * W
    hs = X.T @ (curvature * (X @ S)) + p.lam * n_after * S
    return float(anchor), np.linalg.norm(hs - delta, axis=0)


def test_the_copy_is_x_rounded_to_float32_and_follows_replace():
    model = _binary_model()
    p = model._problem
    assert p.X32.dtype == torch.float32 and torch.equal(p.X32, p.X.float())
    other = dataclasses.replace(p, X=p.X[:10].clone())
    assert torch.equal(other.X32, other.X.float())  # never a stale copy


@pytest.mark.parametrize("fallback", [False, True])
def test_a_perturbed_float32_copy_does_not_reach_the_certificate(fallback):
    model = _binary_model()
    p, e = model._problem, model._epoch
    rows = [5, 9]
    args = (p, e.alive, e.W, torch.tensor(rows), e.acct.anchor_grad)
    options = SolveOptions("iterative", fallback=fallback)
    honest = newton_step(*args, cache=e.solver, options=options)
    # a float32 copy 1 % off X: CG solves the wrong system (a step fit to a slightly wrong H)
    bent = dataclasses.replace(p)
    object.__setattr__(bent, "X32", p.X32 * 1.01)
    step = newton_step(bent, *args[1:], cache=e.solver, options=options)
    assert honest is not None and step is not None
    anchor, residual = _independent(model, step, rows)
    # the certificate reports the truth of the step applied, computed from the float64 rows
    assert step.anchor_distance == pytest.approx(anchor, rel=1e-9, abs=1e-13)
    np.testing.assert_allclose(step.solve_residual.numpy(), residual, rtol=1e-6, atol=1e-13)
    if fallback:
        # the certified residual is far above CG's tolerance: redone directly (its float64
        # refinement and certificate read the float64 rows)
        assert step.method == "direct"
        assert float(step.solve_residual.max()) <= 1e-3 * float(step.increments.max())
    else:
        assert step.method == "iterative"
        # visibly inexact, and the charge is the float64 truth, not CG's recurrence
        assert float(step.solve_residual.max()) > 100 * float(honest.solve_residual.max())
        assert bool((step.increments >= torch.as_tensor(residual)).all())
    # the honest step's certificate matches the independent computation as well
    anchor, residual = _independent(model, honest, rows)
    assert honest.anchor_distance == pytest.approx(anchor, rel=1e-9, abs=1e-13)
    np.testing.assert_allclose(honest.solve_residual.numpy(), residual, rtol=1e-3, atol=1e-12)


def test_curvatures_below_the_floor_leave_the_certificate_exact():
    model = _binary_model()
    p, e = model._problem, model._epoch
    W = e.W * 40  # margins in the hundreds: l''(z) far below float32's normal range
    curvature = torch.sigmoid(p.Y * (p.X @ W)) * torch.sigmoid(-p.Y * (p.X @ W))
    assert int((curvature < CURVATURE_FLOOR).sum()) > 100
    rows = [3]
    step = newton_step(p, e.alive, W, torch.tensor(rows), e.acct.anchor_grad, cache=e.solver)
    assert step is not None
    anchor, residual = _independent(model, step, rows, W)
    assert step.anchor_distance == pytest.approx(anchor, rel=1e-9)
    np.testing.assert_allclose(step.solve_residual.numpy(), residual, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("shape", [(5001, 40), (300, 7), (3, 5)])
@pytest.mark.parametrize("cols", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_product_layout_gives_the_same_product(shape, cols, dtype):
    gen = torch.Generator().manual_seed(cols)
    n, d = shape
    X = torch.rand((n, d), generator=gen, dtype=torch.float64).to(dtype)
    V = torch.randn((d, cols), generator=gen, dtype=torch.float64).to(dtype)
    M = torch.randn((n, cols), generator=gen, dtype=torch.float64).to(dtype)
    tol = dict(rtol=1e-12, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    want_v, want_m = X.double() @ V.double(), X.double().T @ M.double()
    padded = tuple(products.PADDED)
    numpy = products.NUMPY_LAYOUTS
    for layout in ("gemm", "rows", "columns", *padded, *numpy):
        torch.testing.assert_close(products._product(X, V, False, layout).double(), want_v, **tol)
    for layout in ("gemm", "blocked", "split", "columns", *padded, *numpy):
        torch.testing.assert_close(products._product(X, M, True, layout).double(), want_m, **tol)
    torch.testing.assert_close(products.x_times(X, V).double(), want_v, **tol)
    torch.testing.assert_close(products.xt_times(X, M).double(), want_m, **tol)
    if cols <= products.THIN_COLUMNS:  # measured once, then kept
        one = torch.get_num_threads() == 1  # NumPy's BLAS is measured with one torch thread
        extra = numpy if one else ()
        layouts = ("gemm", "rows", "columns", *padded, *extra)
        assert products._LAYOUT[(dtype, d, cols, False, one)] in layouts
        layouts = ("gemm", "blocked", "split", "columns", *padded, *extra)
        assert products._LAYOUT[(dtype, d, cols, True, one)] in layouts


def test_the_float32_hvp_is_float32_products_with_float64_vectors():
    X, _ = make_data(3000, 30, 2, 1)
    X64 = X.double()
    gen = torch.Generator().manual_seed(0)
    curvature = torch.rand((3000, 2), generator=gen, dtype=torch.float64) / 4
    V = torch.randn((30, 2), generator=gen, dtype=torch.float64)
    exact = by_blocks.hvp(X64, curvature, V, ridge=3.0)
    fast = by_blocks.hvp(X64.float(), curvature.float(), V, ridge=3.0)
    assert fast.dtype == torch.float64 and exact.dtype == torch.float64
    want = X64.T @ (curvature * (X64 @ V)) + 3.0 * V
    torch.testing.assert_close(exact, want, rtol=1e-12, atol=1e-12)
    rel = float((fast - want).norm() / want.norm())
    assert 0 < rel <= 1e-5  # rounded like float32 products, and only so


@pytest.mark.parametrize("k", [1, 3])
def test_the_batched_gram_equals_the_per_class_one(monkeypatch, k):
    X, _ = make_data(9000, 12, 2, 2)  # more rows than a block
    X64 = X.double()
    w = torch.rand((9000, k), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    want = torch.stack([X64.T @ (X64 * w[:, j : j + 1]) for j in range(k)]) + 2.0 * torch.eye(12)
    per_class = weighted_gram(X64, w, 2.0, dtype=torch.float32, X32=X64.float())
    monkeypatch.setattr("core.loss.batched_gram", lambda device: True)
    monkeypatch.setattr("core.loss.GRAM_BATCH_ELEMENTS", 4000 * k * 12)  # 3 blocks
    batched = weighted_gram(X64, w, 2.0, dtype=torch.float32, X32=X64.float())
    batched64 = weighted_gram(X64, w, 2.0)
    for H, tol in ((per_class, 1e-5), (batched, 1e-5), (batched64, 1e-12)):
        torch.testing.assert_close(H.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_numpy_layouts_run_one_thread_and_refuse_mixed_dtypes(monkeypatch):
    """With one torch thread the NumPy layouts are measured (NumPy's own BLAS set to one
    thread first, SciPy's left alone); a product of mismatched dtypes is refused, never
    promoted (NumPy would copy X to float64)."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X = make_data(2000, 24, 2, 5)[0].double()
        V = torch.randn(24, 1, dtype=torch.float64)
        monkeypatch.setattr(products, "_LAYOUT", {})
        products.x_times(X, V)
        assert products.match_blas_threads()
        numpy_pools = [p for p in threadpool_info() if "numpy" in p["filepath"]]
        assert numpy_pools and all(p["num_threads"] == 1 for p in numpy_pools)
        assert (torch.float64, 24, 1, False, True) in products._LAYOUT
        with pytest.raises(TypeError, match="float32"):
            products._numpy_product(X.float(), V, False, flip=False)
    finally:
        torch.set_num_threads(before)
