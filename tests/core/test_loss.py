"""Gradients and Hessians of core.loss against autograd; gamma against a grid."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.loss import GAMMA, gradient, hessian_vector_product, hessians, margins
from tests.core.conftest import make_data


def autograd_objective(X, Y, C, W, lam, n_reg, B):
    # written independently of core.loss: log(1 + exp(-z)) via logaddexp
    Z = Y * (X @ W)
    return (
        (C * torch.logaddexp(torch.zeros_like(Z), -Z)).sum()
        + 0.5 * lam * n_reg * (W * W).sum()
        + (B * W).sum()
    )


@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 60), d=st.integers(1, 12), k=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_gradient_and_hessian_match_autograd(n, d, k, seed):
    X, y = make_data(n, d, max(k, 2), seed)
    X = X.double()
    gen = torch.Generator().manual_seed(seed)
    Y = torch.where(torch.rand((n, k), generator=gen) > 0.5, 1.0, -1.0).double()
    C = (torch.rand((n, k), generator=gen) > 0.2).double()
    W = torch.randn((d, k), generator=gen, dtype=torch.float64) * 3
    B = torch.randn((d, k), generator=gen, dtype=torch.float64)
    lam, n_reg = 0.01, float(n)
    Wv = W.clone().requires_grad_(True)
    g_auto = torch.autograd.grad(autograd_objective(X, Y, C, Wv, lam, n_reg, B), Wv)[0]
    torch.testing.assert_close(gradient(X, Y, C, W, lam, n_reg, B), g_auto, rtol=1e-10, atol=1e-10)
    H = hessians(X, C, margins(X, Y, W), lam, n_reg)
    for j in range(k):

        def f(w, j=j):
            Wj = W.clone()
            Wj[:, j] = w
            return autograd_objective(X, Y, C, Wj, lam, n_reg, B)

        H_auto = torch.autograd.functional.hessian(f, W[:, j].clone())
        torch.testing.assert_close(H[j], H_auto, rtol=1e-9, atol=1e-9)
    S = torch.randn((d, k), generator=gen, dtype=torch.float64)
    hvp = hessian_vector_product(X, C, margins(X, Y, W), S, lam, n_reg)
    torch.testing.assert_close(hvp, torch.einsum("kij,jk->ik", H, S), rtol=1e-9, atol=1e-9)


def test_gamma_is_the_max_of_the_third_derivative_rounded_up():
    z = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64)
    s = torch.sigmoid(z)
    third = (s * (1 - s) * (1 - 2 * s)).abs().max().item()
    assert third <= GAMMA < third + 1e-8
    assert math.isclose(GAMMA, 1 / (6 * math.sqrt(3)), rel_tol=1e-7)
