"""Training against scikit-learn, the budget formula, and the noise's secrecy flags."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import core
from core.budget import gaussian_delta
from tests.core.conftest import make_data


@pytest.mark.parametrize("classes", [2, 4])
def test_unperturbed_fit_matches_sklearn(classes):
    X, y = make_data(300, 8, classes, seed=3)
    lam = 1e-2
    model = core.train(X, y, lam=lam, sigma=0.0, seed=0, max_removals=None)
    n = X.shape[0]
    Xn = X.double().numpy()
    targets = [(y.numpy() == 1)] if classes == 2 else [(y.numpy() == k) for k in range(classes)]
    W = model.weights.reshape(8, -1).numpy()
    for j, target in enumerate(targets):
        ref = LogisticRegression(
            C=1 / (lam * n),
            fit_intercept=False,
            tol=1e-14,
            max_iter=10_000,
            solver="newton-cholesky",
        )
        ref.fit(Xn, target.astype(int))
        np.testing.assert_allclose(
            W[:, j], ref.coef_[0], rtol=1e-6, atol=1e-9 * np.abs(ref.coef_).max()
        )


def test_budget_formula_and_calibrations():
    assert math.isclose(
        core.budget_total(10, 1, 1e-4), 10 / math.sqrt(2 * math.log(1.5e4)), rel_tol=1e-12
    )
    assert math.isclose(core.budget_total(10, 1, 1e-4), 2.2803, rel_tol=1e-4)
    analytic = core.budget_total(10, 1, 1e-4, calibration="analytic")
    assert 1.37 < analytic / core.budget_total(10, 1, 1e-4) < 1.39
    mu = analytic / 10
    assert gaussian_delta(mu, 1.0) <= 1e-4 < gaussian_delta(mu * 1.001, 1.0)
    with pytest.raises(ValueError, match="analytic"):
        core.budget_total(10, 2.0, 1e-4)
    assert core.budget_total(10, 2.0, 1e-4, calibration="analytic") > 0
    with pytest.raises(ValueError):
        core.budget_total(10, 1.0, 1.5)


def test_training_residual_is_tight_and_counted(digits):
    model = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    tol = min(1e-9 * 1e-2 * len(digits.y_train), 1e-6 * model.budget_total)
    assert 0 < model.budget_used <= tol
    assert model.certified and model.noise is not None
    # independent oracle: the gradient of L_b at the stored weights, through autograd
    W = model.weights.clone().requires_grad_(True)
    X = digits.X_train.double()
    Y = torch.where(digits.y_train[:, None] == torch.arange(10)[None, :], 1.0, -1.0).double()
    Z = Y * (X @ W)
    L = (
        torch.logaddexp(torch.zeros_like(Z), -Z).sum()
        + 0.5 * 1e-2 * len(X) * (W * W).sum()
        + (model.noise * W).sum()
    )
    (g,) = torch.autograd.grad(L, W)
    assert float(g.norm()) <= model.budget_used * (1 + 1e-6) + 1e-12
    assert model.accuracy(digits.X_test, digits.y_test) >= 0.85


def test_seed_marks_uncertified_and_noise_is_fresh(digits):
    a = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, seed=5, max_removals=None)
    b = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, seed=5, max_removals=None)
    c = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    d = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    assert not a.certified and c.certified
    torch.testing.assert_close(a.noise, b.noise)
    assert not torch.allclose(c.noise, d.noise)
