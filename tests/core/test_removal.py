"""Newton removal against an exact retrain with the same noise, and the accountings against the
true gradient residual (computed with autograd and the in-memory noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import core
from tests.core.conftest import make_data


def coded(y: torch.Tensor, classes: list[int], binary: bool) -> torch.Tensor:
    if binary:
        return torch.where(y == classes[1], 1.0, -1.0).double()[:, None]
    return torch.where(y[:, None] == torch.arange(len(classes))[None, :], 1.0, -1.0).double()


def objective(W, X, Y, lam, B):
    Z = Y * (X @ W)
    return (
        torch.logaddexp(torch.zeros_like(Z), -Z).sum()
        + 0.5 * lam * len(X) * (W * W).sum()
        + (B * W).sum()
    )


def true_residual(model, X, y, lam) -> float:
    """||grad L_b(W; D')||_F by autograd on the remaining rows, with the model's noise."""
    keep = model.alive.cpu()
    Y = coded(y, model.classes, len(model.classes) == 2 and model.weights.ndim == 1)
    W = model.weights.cpu().reshape(X.shape[1], -1).clone().requires_grad_(True)
    noise = model.noise.cpu()
    (g,) = torch.autograd.grad(objective(W, X.double()[keep], Y[keep], lam, noise), W)
    return float(g.norm())


def exact_retrain(model, X, y, lam) -> torch.Tensor:
    """argmin L_b(.; D') with the same b, by scipy (an optimiser independent of core)."""
    keep = model.alive
    Y = coded(y, model.classes, model.weights.ndim == 1)
    Xk, Yk = X.double()[keep], Y[keep]
    shape = model.noise.shape

    def fun(w):
        W = torch.from_numpy(w.reshape(shape)).requires_grad_(True)
        f = objective(W, Xk, Yk, lam, model.noise)
        (g,) = torch.autograd.grad(f, W)
        return float(f.detach()), g.numpy().ravel()

    res = minimize(
        fun,
        model.weights.reshape(shape).numpy().ravel(),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000},
    )
    return torch.from_numpy(res.x.reshape(shape))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(30, 120),
    d=st.integers(2, 10),
    classes=st.sampled_from([2, 3, 4]),
    batches=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    lam=st.sampled_from([1e-2, 1e-1]),
    seed=st.integers(0, 100_000),
)
def test_newton_removal_is_certified_and_close_to_retrain(n, d, classes, batches, lam, seed):
    X, y = make_data(n, d, classes, seed)
    model = core.train(X, y, lam=lam, sigma=100.0, seed=seed, max_removals=None)
    order = np.random.default_rng(seed).permutation(np.arange(classes, n))  # keep one row per class
    start = 0
    for m in batches:
        rows = order[start : start + m].tolist()
        start += m
        res = model.remove(rows)
        assert res.applied and sorted(res.removed) == sorted(rows)
        truth = true_residual(model, X, y, lam)
        # the true residual never exceeds the exact figure, which never exceeds the bound
        assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12
    # the released weights minimise L_{b-U}: ||w - w*|| <= ||U|| / (lam n') (strong convexity)
    W_star = exact_retrain(model, X, y, lam)
    gap = float((model.weights.reshape(W_star.shape) - W_star).norm())
    assert gap <= true_residual(model, X, y, lam) / (lam * model.n_alive) * 1.01 + 1e-7


def test_batched_step_equals_sequence_oracle_on_digits(digits):
    model = core.train(
        digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None, accounting="bound"
    )
    rows = list(range(0, 200, 2))
    res = model.remove(rows, groups=[25, 25, 25, 25])
    assert res.applied and res.applied_groups == 4
    assert res.bound_increment > 0
    truth = true_residual(model, digits.X_train, digits.y_train, 1e-2)
    assert truth <= model.exact_used <= model.bound_used == model.budget_used
    W_star = exact_retrain(model, digits.X_train, digits.y_train, 1e-2)
    assert float((model.weights - W_star).norm()) <= truth / (1e-2 * model.n_alive) * 1.01 + 1e-7
    assert model.accuracy(digits.X_test, digits.y_test) >= 0.88


def test_already_removed_rows_are_reported_not_reapplied(digits):
    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    model.remove([1, 2, 3])
    W = model.weights.clone()
    res = model.remove([2, 3])
    assert res.applied and res.removed == [] and res.already_removed == [2, 3]
    assert torch.equal(model.weights, W)


def test_max_removals_trigger_splits_on_request_boundaries(digits):
    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=10)
    assert model.max_removals == 10
    res = model.remove(list(range(14)), groups=[4, 4, 4, 2])
    assert res.applied_groups == 2 and res.removed == list(range(8))
    assert res.pending == list(range(8, 14))
    assert res.needs_retrain and res.retrain_reason == "max_removals"
    assert model.removed_in_epoch == 8
    version = model.version
    model.retrain(exclude=res.pending)
    assert model.version == version + 1 and model.removed_in_epoch == 0
    assert model.n_alive == len(digits.y_train) - 14
    assert model.budget_used < 1e-6 * model.budget_total + 1e-9


def test_safety_net_fires_on_a_tiny_budget_and_is_counted(digits):
    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=0.002, max_removals=None)
    used = model.budget_used
    W = model.weights.clone()
    res = model.remove(list(range(400)), groups=[100] * 4)
    assert res.needs_retrain and res.retrain_reason == "budget"
    assert model.budget_used <= model.budget_total
    if res.applied_groups == 0:
        assert torch.equal(model.weights, W) and model.budget_used == used
    assert model.safety_retrains == 1
    assert len(res.pending) == 100 * (4 - res.applied_groups)


def test_auto_trigger_is_a_count_fixed_at_training(digits):
    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0)
    assert isinstance(model.max_removals, int)
    assert 0 < model.max_removals <= 0.25 * len(digits.y_train)
    frac = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=0.1)
    assert frac.max_removals == int(0.1 * len(digits.y_train))


@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_one_vs_rest_with_negative_subsampling(digits, accounting):
    model = core.train(
        digits.X_train,
        digits.y_train,
        lam=1e-2,
        sigma=1.0,
        seed=1,
        max_removals=None,
        subsample_ratio=0.3,
        accounting=accounting,
    )
    res = model.remove(list(range(30)))
    assert res.applied
    assert model.exact_used <= model.bound_used
    assert model.accuracy(digits.X_test, digits.y_test) > 0.8


def test_float32_solve_path_stays_certified(digits):
    """The CUDA path (float32 Hessian and solve, float64 refinement and certificate), run on CPU."""
    import dataclasses

    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    model._problem = dataclasses.replace(model._problem, hess_dtype=torch.float32)
    for start in range(0, 300, 50):
        res = model.remove(list(range(start, start + 50)))
        assert res.applied
        truth = true_residual(model, digits.X_train, digits.y_train, 1e-2)
        assert (
            truth <= model.exact_used * (1 + 1e-9) + 1e-12 <= model.bound_used * (1 + 1e-9) + 2e-12
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_matches_cpu_and_is_certified(digits):
    cpu = core.train(
        digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, seed=3, max_removals=None, device="cpu"
    )
    gpu = core.train(
        digits.X_train,
        digits.y_train,
        lam=1e-2,
        sigma=1.0,
        seed=3,
        max_removals=None,
        device="cuda",
    )
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-6, atol=1e-8)
    for start in range(0, 200, 40):
        a = cpu.remove(list(range(start, start + 40)))
        b = gpu.remove(list(range(start, start + 40)))
        assert a.applied and b.applied
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-5, atol=1e-7)
    assert (
        true_residual(gpu, digits.X_train, digits.y_train, 1e-2)
        <= gpu.exact_used * (1 + 1e-9) + 1e-12
    )


def test_auto_trigger_is_scaled_at_retrains_and_reestimated_after_halving(digits):
    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0)
    n0, m0 = model.n_alive, model.max_removals
    model.retrain(exclude=list(range(100)))
    assert model.max_removals == int(m0 * (n0 - 100) / n0)
    model.retrain(exclude=list(range(100, 900)))  # below half of n0: shadow runs again
    assert model._auto_basis[0] == n0 - 900
