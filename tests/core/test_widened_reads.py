"""Fewer bytes per removal step, the same float64 certificate:

- the certificate's widened layouts (core.products, ``*_f32``) read the problem's float32 copy
  of X and widen each block to float64, only where that copy widens back to X exactly
  (core.problem.Problem.exact_float32: checked when the problem is made, the same tensor,
  unchanged in place since); a float64 X with more digits, a replaced or changed copy: X;
- the Hessian-vector products by blocks of rows (core.by_blocks.hvp, ``HVP_LAYOUTS``).

Checked against NumPy in float64 and against the true gradient residual and ``H's - Delta``
computed from scratch from the float64 rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import core
from core import blocked as by_blocks
from core import products, removal
from core.problem import widens_exactly
from core.removal import SolveOptions, newton_step
from tests.core.conftest import make_data, numpy_measured
from tests.core.test_float32_products import _independent
from tests.core.test_iterative_step import true_residual

WIDENED = [name for name in by_blocks.CERT_LAYOUTS if name.endswith("_f32")]


def _model(X: torch.Tensor, y: torch.Tensor, accounting: str = "exact") -> core.Model:
    return core.train(
        X, y, lam=1e-3, sigma=10.0, seed=3, max_removals=None, accounting=accounting, device="cpu"
    )


# ----------------------------------------------------------------- which copy is exact
def test_a_dataset_of_float32_rows_has_an_exact_copy_and_a_float64_one_has_not():
    X, y = make_data(1200, 20, 2, 0)
    assert X.dtype == torch.float32
    p = _model(X, y)._problem
    assert p.exact_float32() is p.X32
    assert torch.equal(p.X32.double(), p.X)
    # core.train rounds a caller's float64 rows to float32 (the rows as stored): exact again
    X64 = X.double()
    X64[7, 3] += 1e-12
    trained = _model(X64, y)._problem
    assert trained.exact_float32() is trained.X32
    # a problem on float64 rows with digits past float32's: no exact copy
    q = dataclasses.replace(p, X=X64)
    assert q.exact_float32() is None
    # a row view (core.rowview) gathers the float32 copy with its rows: exact where its
    # problem's is (checked here independently), not where its problem's is not
    rows = torch.arange(0, 1200, 2)
    view = core.problem.restrict(p, rows)
    assert view.exact_float32() is view.X32
    assert core.problem.widens_exactly(view.X32, view.X) and torch.equal(view.X, p.X[rows])
    inexact = core.problem.restrict(q, rows)
    assert inexact.exact_float32() is None
    assert torch.equal(inexact.X32, q.X[rows].to(torch.float32))
    assert inexact.X32.is_contiguous() and inexact.X.is_contiguous()
    # a view of a problem whose copy changed in place since its check is not exact either
    changed = dataclasses.replace(p)
    changed.X32[0, 0] = 0.5
    assert core.problem.restrict(changed, rows).exact_float32() is None
    # ... nor a view of a problem whose X (not its copy) changed in place since its check
    moved = dataclasses.replace(p, X=p.X.clone())
    assert moved.exact_float32() is moved.X32
    moved.X[0, 0] += 1e-3
    assert core.problem.restrict(moved, rows).exact_float32() is None
    # a copy that does not match X's shape, dtype or layout is refused
    for bad in (p.X, p.X32[:-1], p.X32.T.contiguous().T):
        with pytest.raises(ValueError, match="_gathered32"):
            core.problem.Problem(
                X=p.X, Y=p.Y, omega=p.omega, row_norms=p.row_norms, x_norm2=p.x_norm2,
                lam=p.lam, hess_dtype=p.hess_dtype, _gathered32=(bad, True),
            )  # fmt: skip


@pytest.mark.parametrize(
    "index",
    [
        torch.tensor([5, 0, 5, 3, 1199, 2]),  # unsorted, repeated
        torch.tensor([-1, 0], dtype=torch.int32),  # negative, int32
        torch.tensor([], dtype=torch.long),
        torch.arange(1200) % 3 == 0,  # a mask: by torch's indexing, never NumPy's take
    ],
)
def test_gather_rows_is_indexing(index):
    X, y = make_data(1200, 20, 2, 0)
    p = _model(X, y)._problem
    for tensor in (p.X, p.X32, p.Y, p.omega, p.row_norms, p.Y[:, 0] > 0, p.X.to(torch.bfloat16)):
        got, want = core.problem.gather_rows(tensor, index), tensor[index]
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got, want)
        if got.numel():
            assert got.data_ptr() != tensor.data_ptr()  # a copy, never a view of the problem's


def test_a_replaced_or_changed_copy_is_not_exact_any_more():
    X, y = make_data(1200, 20, 2, 0)
    p = _model(X, y)._problem
    replaced = dataclasses.replace(p)
    assert replaced.exact_float32() is replaced.X32  # made anew, checked anew
    object.__setattr__(replaced, "X32", replaced.X32.clone())
    assert replaced.exact_float32() is None  # not the tensor that was checked
    changed = dataclasses.replace(p)
    changed.X32[0, 0] = 0.5  # in place: its version counter moved
    assert changed.exact_float32() is None
    assert p.exact_float32() is p.X32  # the original's copy is its own


def test_a_changed_x_is_not_matched_by_its_old_copy_any_more():
    X, y = make_data(1200, 20, 2, 0)
    p = dataclasses.replace(_model(X, y)._problem)
    assert p.exact_float32() is p.X32
    p.X[:, 0] *= 1.01  # X itself changed in place: the copy no longer widens to it
    assert p.exact_float32() is None
    q = dataclasses.replace(_model(X, y)._problem)
    object.__setattr__(q, "X", q.X.clone())  # another X (equal or not): not the one checked
    assert q.exact_float32() is None


def test_training_and_removing_under_inference_mode_read_x():
    """Tensors made under ``torch.inference_mode()`` count no changes: no exact copy is
    trusted, and training, removals and their certificate work as before."""
    X, y = make_data(1500, 16, 2, 1)
    with torch.inference_mode():
        model = _model(X, y)
        assert model._problem.exact_float32() is None
        assert model.remove([3, 4, 5]).applied
    assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12


def test_widens_exactly_compares_every_block():
    gen = torch.Generator().manual_seed(1)
    X32 = torch.rand((1000, 8), generator=gen)
    X = X32.double()
    assert widens_exactly(X32, X, block_bytes=64 * 8)  # blocks of 64 rows
    for row in (0, 63, 64, 999):
        bent = X.clone()
        bent[row, 5] = float(bent[row, 5]) + 2.0**-40  # below float32's resolution
        assert not widens_exactly(X32, bent, block_bytes=64 * 8)
    nan = X.clone()
    nan[500, 0] = float("nan")
    X32nan = nan.float()
    assert not widens_exactly(X32nan, nan)  # NaN never equals
    assert not widens_exactly(X32[:999], X)
    assert not widens_exactly(X32.T.contiguous(), X.T.contiguous()[:, :999])


# ----------------------------------------------------------------- the widened layouts
@pytest.mark.parametrize("widened", WIDENED)
def test_the_widened_layouts_read_the_float32_copy(cert_layout, widened):
    """A copy that differs from X shows which one a layout read (a caller never passes one:
    the copy must widen back to X exactly); the unwidened layout reads X."""
    gen = torch.Generator().manual_seed(2)
    X32 = torch.rand((1500, 12), generator=gen)
    X = X32.double()
    other = (X32 * 0.5).contiguous()
    V = torch.randn((12, 2), generator=gen, dtype=torch.float64)

    def terms_of(P, out, s, e):
        out.copy_(P.T)

    cert_layout.value = widened
    P, _, Q = by_blocks.certificate_products(X, V, terms_of, X32=other)
    cert_layout.value = widened.removesuffix("_f32")
    P0, _, Q0 = by_blocks.certificate_products(X, V, terms_of, X32=other)
    o = other.double().numpy()
    torch.testing.assert_close(P, torch.from_numpy(o @ V.numpy()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P0, torch.from_numpy(X.numpy() @ V.numpy()), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(Q, Q0)


@pytest.mark.parametrize("widened", WIDENED)
@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_steps_with_a_widened_certificate_stay_certified(cert_layout, widened, accounting):
    X, y = make_data(3000, 24, 3, 2)  # one-vs-rest, 6 blocks of 512 rows
    model = _model(X, y, accounting)
    e, p = model._epoch, model._problem
    args = (p, e.alive, e.W, torch.arange(40, 70), e.acct.anchor_grad)
    cert_layout.value = "blocked"
    plain = newton_step(*args, cache=e.solver)
    cert_layout.value = widened
    given: list[torch.Tensor | None] = []
    widenings = [0]
    real_products, real_copyto = removal.certificate_products, products.np.copyto
    real_copy = torch.Tensor.copy_

    def spy(X, V, terms_of, X32=None):
        given.append(X32)
        return real_products(X, V, terms_of, X32=X32)

    def copyto(dst, src, *a, **k):
        widenings[0] += src.dtype == np.float32 and dst.dtype == np.float64
        return real_copyto(dst, src, *a, **k)

    def copy_(self, src, *a, **k):
        widenings[0] += src.dtype == torch.float32 and self.dtype == torch.float64
        return real_copy(self, src, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(removal, "certificate_products", spy)
        mp.setattr(products.np, "copyto", copyto)
        mp.setattr(torch.Tensor, "copy_", copy_)
        step = newton_step(*args, cache=e.solver)
    # the step handed the problem's float32 copy to the certificate, which widened it block by
    # block (6 blocks of 512 rows; the fused kernel widens each row as it reads it)
    assert len(given) == 1 and given[0] is p.X32
    assert widenings[0] == (0 if widened.startswith("fused") else 6)
    assert plain is not None and step is not None
    assert torch.equal(plain.W, step.W)
    assert step.anchor_distance == pytest.approx(plain.anchor_distance, rel=1e-9)
    torch.testing.assert_close(step.increments, plain.increments, rtol=1e-9, atol=0)
    order = np.random.default_rng(5).permutation(model.n_rows)[:60].tolist()
    for t in range(6):
        assert model.remove(order[10 * t : 10 * t + 10]).applied
        assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("widened", WIDENED)
def test_a_copy_changed_in_place_does_not_reach_the_certificate(cert_layout, widened):
    X, y = make_data(1500, 40, 2, 0)
    model = _model(X, y)
    p, e = model._problem, model._epoch
    rows = [5, 9, 11]
    cert_layout.value = widened
    p.X32.mul_(1.01)  # a float32 copy 1 % off X, changed after the problem checked it
    assert p.exact_float32() is None
    step = newton_step(p, e.alive, e.W, torch.tensor(rows), e.acct.anchor_grad, cache=e.solver)
    assert step is not None
    anchor, residual = _independent(model, step, rows)
    # the certificate is the truth of the step applied, from the float64 rows
    assert step.anchor_distance == pytest.approx(anchor, rel=1e-9, abs=1e-13)
    np.testing.assert_allclose(step.solve_residual.numpy(), residual, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("widened", WIDENED)
def test_a_float64_x_with_more_digits_is_certified_from_itself(cert_layout, widened):
    X, y = make_data(2000, 16, 2, 4)
    model = _model(X, y)
    e = model._epoch
    X64 = model._problem.X.clone()
    X64[:, 0] += 1e-11  # digits past float32's
    p = dataclasses.replace(model._problem, X=X64)
    assert p.exact_float32() is None
    args = (p, e.alive, e.W, torch.arange(10, 30), e.acct.anchor_grad)
    cert_layout.value = widened.removesuffix("_f32")
    plain = newton_step(*args, cache=e.solver)
    cert_layout.value = widened
    step = newton_step(*args, cache=e.solver)
    assert plain is not None and step is not None
    # the same reads of the float64 rows: the same certificate to the last bit
    assert step.anchor_distance == plain.anchor_distance
    assert torch.equal(step.increments, plain.increments)
    assert torch.equal(step.solve_residual, plain.solve_residual)


# ----------------------------------------------------------------- blocked Hessian-vector
def test_the_hvp_layouts_are_the_documented_ones():
    assert by_blocks.HVP_LAYOUTS == ("two_passes", "blocked", "blocked_numpy", "fused")


@pytest.mark.parametrize("blocked", ["blocked", "blocked_numpy", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3001, 512, 100])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("strided", [False, True])
def test_blocked_hvp_is_the_two_pass_product(hvp_layout, blocked, dtype, n, k, strided):
    gen = torch.Generator().manual_seed(n + k)
    X = torch.rand((n, 30), generator=gen, dtype=torch.float64).to(dtype)
    if strided:  # a column slice: neither layout reads it in place through NumPy
        X = torch.rand((n, 34), generator=gen, dtype=torch.float64).to(dtype)[:, 2:32]
        assert not X.is_contiguous()
    curvature = torch.rand((n, k), generator=gen, dtype=torch.float64).to(dtype)
    V = torch.randn((30, k), generator=gen, dtype=torch.float64)
    hvp_layout.value = "two_passes"
    two = by_blocks.hvp(X, curvature, V, 0.3)
    hvp_layout.value = blocked
    got = by_blocks.hvp(X, curvature, V, 0.3)
    assert got.dtype == torch.float64 and got.shape == (30, k)
    Xn, cn = X.double().numpy(), curvature.double().numpy()
    Vn = V.to(dtype).double().numpy()  # (the products run in X's dtype)
    oracle = torch.from_numpy(Xn.T @ (cn * (Xn @ Vn)) + 0.3 * V.numpy())
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(got, oracle, rtol=tol, atol=tol)
    torch.testing.assert_close(two, oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("one_thread", [True, False])
@pytest.mark.parametrize("fast", by_blocks.HVP_LAYOUTS)
def test_the_hvp_calibration_keeps_the_fastest_layout(
    monkeypatch, threads, slow_but, one_thread, fast
):
    numpy = numpy_measured(threads, one_thread, fast)
    fused = core.fused.available()
    if fast == "fused" and not fused:
        pytest.skip("Numba not available")
    # the fused kernel is measured only on large matrices (this one made large enough)
    monkeypatch.setattr(by_blocks, "FUSED_MIN_ENTRIES", 0 if fused else 1 << 40)
    monkeypatch.setattr(by_blocks, "_HVP_LAYOUT", {})
    monkeypatch.setattr(by_blocks, "CERT_BLOCK_BYTES", 0)
    assert by_blocks.calibrate_hvp(torch.rand((100, 8)), 1) == "two_passes"
    assert by_blocks._HVP_LAYOUT == {}  # one block: nothing to measure
    real = by_blocks._hvp_products
    measured: list[str] = []

    clock = slow_but(fast)

    def timed(X, curvature, V, layout):
        measured.append(layout)
        clock.tick(layout)
        return real(X, curvature, V, layout)

    monkeypatch.setattr(by_blocks, "_hvp_products", timed)
    X = torch.rand((3000, 16))
    assert by_blocks.calibrate_hvp(X, 1, repeats=2) == fast
    assert by_blocks._HVP_LAYOUT == {(torch.float32, 16, 1, one_thread): fast}
    expected = set(by_blocks.HVP_LAYOUTS)
    if not numpy:
        expected.discard("blocked_numpy")
    if not fused:
        expected.discard("fused")
    assert set(measured) == expected and len(measured) == 2 * len(expected)
    measured.clear()
    by_blocks.hvp(X, torch.rand((3000, 1)), torch.rand((16, 1), dtype=torch.float64), 0.1)
    assert measured == [fast]
    measured.clear()
    assert by_blocks.calibrate_hvp(torch.rand((5000, 16)), 1) == fast  # once per key
    assert measured == []


def test_a_failed_hvp_measurement_keeps_nothing(monkeypatch):
    monkeypatch.setattr(by_blocks, "_HVP_LAYOUT", {})
    monkeypatch.setattr(by_blocks, "CERT_BLOCK_BYTES", 0)
    real = by_blocks._hvp_products

    def failing(X, curvature, V, layout):
        if layout == "blocked":
            raise MemoryError("no room")
        return real(X, curvature, V, layout)

    monkeypatch.setattr(by_blocks, "_hvp_products", failing)
    with pytest.raises(MemoryError):
        by_blocks.calibrate_hvp(torch.rand((3000, 16)), 1)
    assert by_blocks._HVP_LAYOUT == {}


@pytest.mark.parametrize("blocked", ["blocked", "blocked_numpy", "fused"])
@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_cg_steps_with_blocked_hvps_stay_certified(hvp_layout, threads, blocked, accounting):
    threads(1)
    X, y = make_data(3000, 24, 2, 8)
    model = _model(X, y, accounting)
    p, e = model._problem, model._epoch
    hvp_layout.value = blocked
    rows = [3, 8, 13]
    step = newton_step(
        p, e.alive, e.W, torch.tensor(rows), e.acct.anchor_grad, cache=e.solver,
        options=SolveOptions("iterative", fallback=False),
    )  # fmt: skip
    assert step is not None and step.method == "iterative"
    anchor, residual = _independent(model, step, rows)
    assert step.anchor_distance == pytest.approx(anchor, rel=1e-9, abs=1e-13)
    np.testing.assert_allclose(step.solve_residual.numpy(), residual, rtol=1e-6, atol=1e-13)
    order = np.random.default_rng(9).permutation(model.n_rows)[:50].tolist()
    for t in range(5):
        assert model.remove(order[10 * t : 10 * t + 10]).applied
        assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12
