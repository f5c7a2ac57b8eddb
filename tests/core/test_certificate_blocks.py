"""The certificate's two passes by blocks of rows (core.by_blocks.certificate_products), in each
blocked layout (torch's GEMMs, the rows form, NumPy's BLAS; each reading X or, widened, the
float32 copy that widens back to X exactly): the same products as one pass each (against NumPy
in float64), the same removal steps, and the certificate still above the true gradient residual
computed from scratch with numpy; the calibration keeps the fastest layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core
from core import blocked as by_blocks
from core import products
from core.removal import newton_step
from tests.core.conftest import make_data, numpy_measured
from tests.core.test_iterative_step import true_residual


def _terms(Y: torch.Tensor, calls: list[tuple[int, int]] | None = None):
    def terms_of(P: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
        if calls is not None:
            calls.append((start, end))
        out.copy_(torch.cat((torch.sigmoid(-Y[start:end] * P[:, :1]).T, (P[:, 1:] ** 2).T)))

    return terms_of


@pytest.fixture
def numpy_products(monkeypatch):
    """Counts the products NumPy's ``matmul`` computes (the ``"blocked_numpy"`` layout's)."""
    real = np.matmul
    count = [0]

    def matmul(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(products.np, "matmul", matmul)
    return count


BLOCKED = [name for name in by_blocks.CERT_LAYOUTS if name != "direct"]


def test_the_layouts_are_the_documented_ones():
    # one pass each, three blocked layouts and the fused kernel, and each of those widened
    # from the float32 copy
    blocked = ("blocked", "blocked_rows", "blocked_numpy", "fused")
    widened = tuple(name + by_blocks.WIDENED for name in blocked)
    assert by_blocks.CERT_LAYOUTS == ("direct", *blocked, *widened)


@pytest.mark.parametrize("blocked", BLOCKED)
@pytest.mark.parametrize("n", [3001, 512, 513, 100])
@pytest.mark.parametrize("cols", [2, 6])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("copy32", [False, True])
def test_blocked_products_are_the_direct_ones(
    cert_layout, numpy_products, blocked, n, cols, strided, copy32
):
    gen = torch.Generator().manual_seed(n + cols)
    # float32 numbers in float64 (as every dataset's rows): the float32 copy widens back exactly
    X = torch.rand((n, 30), generator=gen).double()
    if strided:  # a column slice (not contiguous): NumPy's layout falls back to torch's
        X = torch.rand((n, 35), generator=gen).double()[:, 2:32]
        assert not X.is_contiguous()
    # the float32 copy as a problem makes it (contiguous); strided: a slice, which the widened
    # layouts do not read (they read X instead)
    X32 = X.float() if not strided else torch.rand((n, 35), generator=gen)[:, 2:32]
    X32 = X32 if copy32 else None
    if X32 is not None and strided:
        X32.copy_(X)  # (the same values: whatever is read, the products are X's)
    V = torch.randn((30, cols), generator=gen, dtype=torch.float64)
    Y = torch.where(torch.rand((n, 1), generator=gen) > 0.5, 1.0, -1.0).double()
    cert_layout.value = "direct"
    calls: list[tuple[int, int]] = []
    P, T, Q = by_blocks.certificate_products(X, V, _terms(Y, calls), X32=X32)
    assert calls == [(0, n)] and numpy_products[0] == 0
    cert_layout.value = blocked
    calls.clear()
    Pb, Tb, Qb = by_blocks.certificate_products(X, V, _terms(Y, calls), X32=X32)
    # the layout ran by blocks of 512 rows, NumPy's products exactly when its layout applies:
    # on X in place, or on the widened blocks of a contiguous float32 copy
    assert calls == [(s, min(n, s + 512)) for s in range(0, n, 512)]
    widened = blocked.endswith("_f32") and copy32 and not strided
    numpy = blocked.startswith("blocked_numpy") and (widened or not strided)
    assert numpy_products[0] == (2 * len(calls) if numpy else 0)
    # an independent oracle: numpy in float64
    Xn, Vn = X.numpy(), V.numpy()
    Pn = Xn @ Vn
    torch.testing.assert_close(P, torch.from_numpy(Pn), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Pb, torch.from_numpy(Pn), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Tb, T, rtol=1e-12, atol=1e-13)
    Qn = Xn.T @ T.numpy().T
    torch.testing.assert_close(Q, torch.from_numpy(Qn), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Qb, torch.from_numpy(Qn), rtol=1e-12, atol=1e-12)
    assert Qb.shape == (30, cols) and Pb.shape == (n, cols) and Tb.shape == (cols, n)
    assert Pb.is_contiguous()


@pytest.mark.parametrize("blocked", BLOCKED)
@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_steps_with_a_blocked_certificate_are_the_same_and_stay_certified(
    cert_layout, blocked, accounting
):
    X, y = make_data(3000, 24, 3, 2)  # one-vs-rest: 2K = 6 columns, 6 blocks of 512 rows
    assert X.dtype == torch.float32  # as every dataset's rows: the widened layouts apply
    model = core.train(
        X, y, lam=1e-3, sigma=10.0, seed=3, max_removals=None, accounting=accounting, device="cpu"
    )
    e, p = model._epoch, model._problem
    assert p.exact_float32() is p.X32
    rows = torch.arange(40, 70)
    args = (p, e.alive, e.W, rows, e.acct.anchor_grad)
    cert_layout.value = "direct"
    direct = newton_step(*args, cache=e.solver)
    cert_layout.value = blocked
    step = newton_step(*args, cache=e.solver)
    assert direct is not None and step is not None
    assert torch.equal(direct.W, step.W)  # the certificate does not change the step
    assert step.anchor_distance == pytest.approx(direct.anchor_distance, rel=1e-9)
    torch.testing.assert_close(step.increments, direct.increments, rtol=1e-9, atol=0)
    torch.testing.assert_close(step.Z, direct.Z, rtol=1e-13, atol=1e-13)
    order = np.random.default_rng(5).permutation(model.n_rows)[:60].tolist()
    for t in range(6):  # removals served with the blocked certificate
        assert model.remove(order[10 * t : 10 * t + 10]).applied
        assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("one_thread", [True, False])
@pytest.mark.parametrize("fast", by_blocks.CERT_LAYOUTS)
def test_calibration_keeps_the_fastest_layout_and_skips_small_matrices(
    monkeypatch, threads, slow_but, one_thread, fast
):
    numpy = numpy_measured(threads, one_thread, fast)
    fused = fast.startswith("fused") and core.fused.available()
    if fast.startswith("fused") and not fused:
        pytest.skip("Numba not available")
    # the fused kernels are measured only on large matrices (this one made large enough)
    monkeypatch.setattr(by_blocks, "FUSED_MIN_ENTRIES", 0 if fused else 1 << 40)
    monkeypatch.setattr(by_blocks, "_CERT_LAYOUT", {})
    monkeypatch.setattr(by_blocks, "CERT_BLOCK_BYTES", 0)  # blocks of 512 rows
    small = torch.rand((100, 64), dtype=torch.float64)
    assert by_blocks.calibrate_certificate(small, 2) == "direct"
    assert by_blocks._CERT_LAYOUT == {}  # one block: nothing to measure
    real = by_blocks._certificate_products
    measured: list[str] = []

    clock = slow_but(fast)

    def timed(X, V, terms_of, layout, X32=None):  # all but one made slow: that one is kept
        measured.append(layout)
        clock.tick(layout)
        return real(X, V, terms_of, layout, X32)

    monkeypatch.setattr(by_blocks, "_certificate_products", timed)
    X32 = torch.rand((3000, 16))
    X = X32.double()
    widened = fast.endswith("_f32")
    copy = X32 if widened else None  # the widened layouts are measured with a float32 copy
    assert by_blocks.calibrate_certificate(X, 2, repeats=2, X32=copy) == fast
    assert by_blocks._CERT_LAYOUT == {(torch.float64, 16, 2, one_thread, widened): fast}
    expected = {name for name in by_blocks.CERT_LAYOUTS if widened or not name.endswith("_f32")}
    if not numpy:
        # (NumPy's BLAS not found)
        expected -= {"blocked_numpy", "blocked_numpy_f32"}
    if not fused:
        expected -= {"fused", "fused_f32"}
    assert set(measured) == expected and len(measured) == 2 * len(expected)
    # the certificate uses what was kept, under the same key
    measured.clear()
    V = torch.rand((16, 2), dtype=torch.float64)
    by_blocks.certificate_products(X, V, lambda P, out, s, e: out.copy_(P.T), X32=copy)
    assert measured == [fast]
    # measured once per process and key: a later problem of that shape reuses the choice
    measured.clear()
    later = torch.rand((5000, 16))
    chosen = by_blocks.calibrate_certificate(later.double(), 2, X32=later if widened else None)
    assert chosen == fast and measured == []


def test_a_failed_measurement_keeps_nothing(monkeypatch, threads):
    threads(1)
    monkeypatch.setattr(by_blocks, "_CERT_LAYOUT", {})
    monkeypatch.setattr(by_blocks, "CERT_BLOCK_BYTES", 0)
    real = by_blocks._certificate_products

    def failing(X, V, terms_of, layout, X32=None):
        if layout == "blocked_rows":
            raise MemoryError("no room for this layout")
        return real(X, V, terms_of, layout, X32)

    monkeypatch.setattr(by_blocks, "_certificate_products", failing)
    X = torch.rand((3000, 16), dtype=torch.float64)
    with pytest.raises(MemoryError):
        by_blocks.calibrate_certificate(X, 2)
    assert by_blocks._CERT_LAYOUT == {}  # the next problem measures again
    monkeypatch.setattr(by_blocks, "_certificate_products", real)
    assert by_blocks.calibrate_certificate(X, 2, repeats=1) in by_blocks.CERT_LAYOUTS


def test_numpy_is_measured_only_where_it_reads_x_in_place(monkeypatch, threads):
    threads(1)
    if not products.match_blas_threads():
        pytest.skip("NumPy's BLAS not found")
    monkeypatch.setattr(by_blocks, "_CERT_LAYOUT", {})
    monkeypatch.setattr(by_blocks, "CERT_BLOCK_BYTES", 0)
    real = by_blocks._certificate_products
    measured: set[str] = set()

    def spy(X, V, terms_of, layout, X32=None):
        measured.add(layout)
        return real(X, V, terms_of, layout, X32)

    monkeypatch.setattr(by_blocks, "_certificate_products", spy)
    for X in (
        torch.rand((3000, 20), dtype=torch.float64)[:, 2:18],  # not contiguous
        torch.rand((3000, 16), dtype=torch.bfloat16),  # NumPy has no bfloat16
    ):
        measured.clear()
        chosen = by_blocks.calibrate_certificate(X, 2, repeats=1)
        assert "blocked_numpy" not in measured and chosen != "blocked_numpy"


def test_a_cuda_like_x_is_direct_whatever_is_cached(monkeypatch):
    monkeypatch.setattr(by_blocks, "_CERT_LAYOUT", {})
    X = torch.rand((3000, 16), dtype=torch.float64)
    by_blocks._CERT_LAYOUT[by_blocks._cert_key(X, 2, None)] = "blocked_rows"
    meta = torch.empty((3000, 16), dtype=torch.float64, device="meta")
    assert by_blocks.calibrate_certificate(meta, 2) == "direct"
