"""The fused kernels (core.fused, compiled by Numba): the certificate's products, terms and sums
and the Hessian-vector product, each against NumPy in float64 as the oracle; extreme margins and
NaN; several threads at once; the layouts that use them fall back to the blocked ones where the
kernels do not apply or Numba is missing, and are measured only on large matrices."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from core import blocked as by_blocks
from core import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="Numba not available")


def _certificate_oracle(X, V, Y, neg_cy, curvature):
    """NumPy in float64, written from the definition."""
    X = X.astype(np.float64)
    k = Y.shape[1]
    P = X @ V
    z = Y * P[:, :k]
    sig = np.exp(-np.logaddexp(0.0, z))  # sigmoid(-z) without overflow
    T = np.concatenate(((neg_cy * sig).T, (curvature * P[:, k:]).T))
    return P, T, T @ X


def _inputs(n, d, k, dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    V = rng.standard_normal((d, 2 * k)) * scale
    Y = np.where(rng.random((n, k)) > 0.5, 1.0, -1.0)
    C = (rng.random((n, k)) > 0.2).astype(np.float64)  # removed rows weigh 0
    curvature = C * rng.random((n, k)) * 0.25
    return X, V, Y, -(C * Y), curvature


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, d, k", [(1, 1, 1), (257, 64, 1), (1000, 13, 3), (300, 100, 10)])
def test_the_certificate_kernel_is_the_float64_products(dtype, n, d, k):
    X, V, Y, neg_cy, curvature = _inputs(n, d, k, dtype, seed=n + d + k)
    P, T, Q, _ = fused.certificate_rows(X, V, Y, neg_cy, curvature)
    Po, To, Qo = _certificate_oracle(X, V, Y, neg_cy, curvature)
    assert P.shape == (n, 2 * k) and T.shape == (2 * k, n) and Q.shape == (2 * k, d)
    assert P.dtype == T.dtype == Q.dtype == np.float64
    # float64 throughout: a float32 X is widened exactly, so the products agree to rounding
    np.testing.assert_allclose(P, Po, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T, To, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(Q, Qo, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_the_bounds_sums_are_the_torch_ones(dtype, k):
    # the kernel's sums (core.fused.SUMS) against LogisticTerms.bound_sums computed by torch
    # from the kernel's own P and T, and against NumPy from the definitions
    n, d = 2000, 24
    X, V, Y, neg_cy, curvature = _inputs(n, d, k, dtype, seed=11 + k)
    C = -neg_cy * Y
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    norms_sq = norms**2
    s_err = np.full(k, 1e-3)
    P, T, Q, sums = fused.certificate_rows(X, V, Y, neg_cy, curvature, (C, norms, norms_sq, s_err))
    t = torch.from_numpy
    terms = by_blocks.LogisticTerms(
        t(Y), t(neg_cy), t(curvature), (t(C), t(norms), t(norms_sq), t(s_err))
    )
    expected = terms.bound_sums(t(P), t(T))
    assert expected.shape == (6, k)
    torch.testing.assert_close(t(sums), expected, rtol=1e-12, atol=0)
    xs = np.abs(P[:, k:])
    u = xs + norms[:, None] * s_err
    wu = C * u * u
    oracle = np.stack((np.abs(T[:k]) @ norms, np.abs(T[k:]) @ norms, norms_sq @ C,
                       norms_sq @ (C * xs), (wu * wu).sum(0), norms @ wu))  # fmt: skip
    np.testing.assert_allclose(sums, oracle, rtol=1e-12)
    assert (sums >= 0).all()


def test_extreme_margins_give_exact_zeros_and_no_overflow():
    # margins of +-800: exp overflows on one side, the stable sigmoid never does
    X, V, Y, neg_cy, curvature = _inputs(400, 8, 1, np.float64, seed=3, scale=200.0)
    P, T, Q, _ = fused.certificate_rows(X, V, Y, neg_cy, curvature)
    assert np.abs(Y[:, 0] * P[:, 0]).max() > 700
    assert np.isfinite(P).all() and np.isfinite(T).all() and np.isfinite(Q).all()
    Po, To, Qo = _certificate_oracle(X, V, Y, neg_cy, curvature)
    np.testing.assert_allclose(T, To, rtol=1e-12, atol=1e-300)
    big = Y[:, 0] * P[:, 0] > 745  # sigmoid(-z) underflows to 0
    assert (T[0, big] == 0).all()


def test_a_nan_in_x_reaches_every_product():
    X, V, Y, neg_cy, curvature = _inputs(50, 6, 1, np.float32, seed=4)
    X[17, 2] = np.nan
    P, T, Q, _ = fused.certificate_rows(X, V, Y, neg_cy, curvature)
    assert np.isnan(P[17]).all() and np.isnan(Q).all()
    assert np.isfinite(np.delete(P, 17, axis=0)).all()
    assert np.isnan(fused.hvp_rows(X, curvature.astype(np.float32), V[:, :1])).all()


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 3001])
@pytest.mark.parametrize("k", [1, 2])
def test_the_hvp_kernel_is_the_product_in_x_dtype(dtype, rtol, n, k):
    rng = np.random.default_rng(n + k)
    X = rng.random((n, 40)).astype(dtype)
    curvature = rng.random((n, k)).astype(dtype)
    V = rng.standard_normal((40, k))
    Q = fused.hvp_rows(X, curvature, V)
    assert Q.shape == (40, k) and Q.dtype == np.float64
    # the operands as the kernel takes them (X's dtype), the sums exact in float64
    Xo, co, Vo = (a.astype(dtype).astype(np.float64) for a in (X, curvature, V))
    oracle = Xo.T @ (co * (Xo @ Vo))
    np.testing.assert_allclose(Q, oracle, rtol=rtol, atol=rtol * np.abs(oracle).max())


def test_float32_hvp_sums_are_closer_than_float32_blas():
    # its blocks' sums are added in float64: on 100,000 rows, well inside CG's 1e-6
    rng = np.random.default_rng(7)
    X = rng.random((100_000, 16)).astype(np.float32)
    c = rng.random((100_000, 1)).astype(np.float32)
    V = rng.standard_normal((16, 1))
    Xo = X.astype(np.float64)
    oracle = Xo.T @ (c.astype(np.float64) * (Xo @ V.astype(np.float32).astype(np.float64)))
    err = np.abs(fused.hvp_rows(X, c, V) - oracle).max() / np.abs(oracle).max()
    assert err < 1e-6


def test_threads_running_the_kernels_at_once_get_their_own_results():
    inputs = [_inputs(20_000, 32, 1, np.float32, seed=s) for s in range(4)]
    alone = [fused.certificate_rows(*a) for a in inputs]
    got: dict[int, tuple] = {}

    def run(i):
        got[i] = fused.certificate_rows(*inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for a, b in zip(alone[i][:3], got[i][:3], strict=True):
            np.testing.assert_array_equal(a, b)


def test_without_numba_the_fused_layouts_are_the_blocked_ones(monkeypatch, cert_layout, hvp_layout):
    gen = torch.Generator().manual_seed(1)
    X32 = torch.rand((3000, 12), generator=gen)
    X = X32.double()
    Y = torch.where(torch.rand((3000, 1), generator=gen) > 0.5, 1.0, -1.0).double()
    terms = by_blocks.LogisticTerms(Y, -Y, torch.full_like(Y, 0.2))
    V = torch.randn((12, 2), generator=gen, dtype=torch.float64)
    cert_layout.value = "fused_f32"
    with_numba = by_blocks.certificate_products(X, V, terms, X32=X32)
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_failed", True)
    assert not fused.available()
    with pytest.raises(RuntimeError, match="Numba"):
        fused.certificate_rows(X.numpy(), V.numpy(), Y.numpy(), Y.numpy(), Y.numpy())
    without = by_blocks.certificate_products(X, V, terms, X32=X32)
    cert_layout.value = "blocked_f32"
    blocked = by_blocks.certificate_products(X, V, terms, X32=X32)
    for a, b, c in zip(with_numba, without, blocked, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        assert torch.equal(b, c)  # the same computation
    hvp_layout.value = "fused"
    c32 = torch.rand((3000, 1), generator=gen)
    hvp_layout.value = "fused"
    without_hvp = by_blocks.hvp(X32, c32, V[:, :1], 0.5)
    hvp_layout.value = "blocked"
    assert torch.equal(without_hvp, by_blocks.hvp(X32, c32, V[:, :1], 0.5))


def test_other_terms_than_the_certificates_run_blocked(cert_layout):
    X = torch.rand((2000, 10), dtype=torch.float64)
    V = torch.rand((10, 2), dtype=torch.float64)
    calls: list[tuple[int, int]] = []

    def terms_of(P, out, s, e):
        calls.append((s, e))
        out.copy_(P.T)

    cert_layout.value = "fused"
    P, T, Q = by_blocks.certificate_products(X, V, terms_of)
    assert len(calls) > 1  # by blocks, through the callable
    torch.testing.assert_close(Q, X.T @ (X @ V), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entries, offered", [(by_blocks.FUSED_MIN_ENTRIES // 64 - 1, False),
                                              (by_blocks.FUSED_MIN_ENTRIES // 64, True)])  # fmt: skip
def test_the_fused_layouts_are_measured_only_on_large_matrices(monkeypatch, entries, offered):
    monkeypatch.setattr(by_blocks, "_CERT_LAYOUT", {})
    monkeypatch.setattr(by_blocks, "_HVP_LAYOUT", {})
    measured: set[str] = set()
    real_cert, real_hvp = by_blocks._certificate_products, by_blocks._hvp_products

    def cert(X, V, terms_of, layout, X32=None):
        measured.add(layout)
        return real_cert(X, V, terms_of, layout, X32)

    def hvp(X, curvature, V, layout):
        measured.add("hvp_" + layout)
        return real_hvp(X, curvature, V, layout)

    monkeypatch.setattr(by_blocks, "_certificate_products", cert)
    monkeypatch.setattr(by_blocks, "_hvp_products", hvp)
    X32 = torch.rand((entries, 64))
    by_blocks.calibrate_certificate(X32.double(), 2, repeats=1, X32=X32)
    by_blocks.calibrate_hvp(X32, 1, repeats=1)
    fused_measured = {"fused", "fused_f32", "hvp_fused"} & measured
    assert fused_measured == ({"fused", "fused_f32", "hvp_fused"} if offered else set())


def test_the_sums_are_those_of_the_last_products(cert_layout):
    # the fused layout leaves its sums on the terms; a later call in another layout computes
    # its own, never returns the earlier ones
    gen = torch.Generator().manual_seed(3)
    X32 = torch.rand((3000, 12), generator=gen)
    X = X32.double()
    Y = torch.where(torch.rand((3000, 1), generator=gen) > 0.5, 1.0, -1.0).double()
    norms = torch.linalg.vector_norm(X, dim=1)
    terms = by_blocks.LogisticTerms(
        Y, -Y, torch.full_like(Y, 0.2), (torch.ones_like(Y), norms, norms**2, torch.zeros(1))
    )
    V = torch.randn((12, 2), generator=gen, dtype=torch.float64)
    cert_layout.value = "fused"
    P, T, _ = by_blocks.certificate_products(X, V, terms, X32=X32)
    fused_sums = terms.bound_sums(P, T)
    assert terms.sums is not None
    W = V * 3  # other weights: other sums
    cert_layout.value = "blocked"
    P2, T2, _ = by_blocks.certificate_products(X, W, terms, X32=X32)
    assert terms.sums is None
    again = terms.bound_sums(P2, T2)
    assert not torch.allclose(again, fused_sums)
    cert_layout.value = "fused"
    P3, T3, _ = by_blocks.certificate_products(X, W, terms, X32=X32)
    torch.testing.assert_close(terms.bound_sums(P3, T3), again, rtol=1e-12, atol=0)
