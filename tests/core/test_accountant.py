"""core.accountant: the accounting state (anchor, commit, restart, exact vs bound, the budget
check), table-driven, against the pure maths of core.bounds / core.budget / core.removal as the
oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.accountant import Accountant, anchor_at, anchored
from core.bounds import rounding_margin
from core.budget import budget_total
from core.epoch import fit_epoch
from core.labels import LabelCoding
from core.loss import gradient, margins
from core.problem import Hyper, make_problem
from core.removal import newton_step
from tests.core.conftest import make_data

LAM = 1e-2


def _setup(classes: int):
    X, y = make_data(300, 12, classes, seed=classes)
    coding = LabelCoding.fit(y)
    Y = coding.encode(y)
    problem = make_problem(X, Y, torch.ones_like(Y), LAM, torch.device("cpu"))
    hyper = Hyper(LAM, 1.0, 1.0, 1e-4, "exact", "classical", None, None)
    alive = torch.ones(300, dtype=torch.bool)
    epoch = fit_epoch(problem, hyper, 1.0, alive, binary=coding.binary, version=1, seed=3, W0=None)
    return problem, epoch.W, alive


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "ovr3"])
def setup(request):
    return _setup(request.param)


def _oracle_r0(problem, W, alive, r0):
    """r0 + the rounding margin of the float64 anchor gradient, from core.bounds directly."""
    n_reg = float(alive.sum())
    C = problem.weights(alive)
    Z = margins(problem.X, problem.Y, W)
    g = gradient(problem.X, problem.Y, C, W, LAM, n_reg)
    abs_terms = float((C * torch.sigmoid(-Z) * problem.row_norms[:, None]).sum())
    d = problem.X.shape[1]
    # the rounding of the margins x.w behind l' (docs/theory.md): (1.01 d u / 4) sum_k ||w_k||
    # sum_i C_ik ||x_i||^2, written out here
    sq = (C * (problem.X**2).sum(1, keepdim=True)).sum(0)
    products = 1.01 * d * 2.0**-53 / 4 * float((sq * W.norm(dim=0)).sum())
    return g, r0 + rounding_margin(
        problem.X.shape[0], d, abs_terms, LAM, n_reg,
        float(torch.linalg.vector_norm(W)), float(torch.linalg.vector_norm(g)),
    ) + products  # fmt: skip


def _steps(problem, W, alive, anchor_grad, batches):
    """The Newton steps removing ``batches`` in turn (core.removal, the oracle of a step)."""
    out, Z = [], None
    for rows in batches:
        step = newton_step(problem, alive, W, torch.tensor(rows), anchor_grad, Z)
        assert step is not None
        out.append(step)
        alive, W, Z = step.alive, step.W, step.Z
    return out


@pytest.mark.parametrize("r0", [0.0, 0.05, 1.5])
@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_anchor(setup, accounting, r0):
    problem, W, alive = setup
    g, want_r0 = _oracle_r0(problem, W, alive, r0)
    acct = anchored(accounting, problem, W, alive, r0=r0)
    assert torch.allclose(acct.anchor_grad, g, rtol=0, atol=1e-12)
    assert acct.r0 == pytest.approx(want_r0, rel=1e-12) and acct.r0 > r0
    assert acct.exact_used == acct.bound_used == acct.used == acct.r0  # nothing used yet
    assert acct.beta is not None and acct.beta.shape == (W.shape[1],)
    assert anchor_at(problem, W, alive, r0=r0)[1] == acct.r0


# (accounting, batches of rows removed in turn)
COMMITS = [
    ("exact", [[0, 1, 2]]),
    ("bound", [[0, 1, 2]]),
    ("exact", [[5], [6, 7], list(range(10, 30))]),
    ("bound", [[5], [6, 7], list(range(10, 30))]),
    ("exact", [list(range(40, 100))]),
    ("bound", [list(range(40, 100))]),
]


@pytest.mark.parametrize(("accounting", "batches"), COMMITS)
def test_commit_exact_and_bound(setup, accounting, batches):
    problem, W, alive = setup
    start = anchored(accounting, problem, W, alive, r0=0.01)
    steps = _steps(problem, W, alive, start.anchor_grad, batches)
    acct, beta = start, torch.zeros(W.shape[1], dtype=torch.float64)
    for step in steps:
        predicted = acct.used_after(step)
        beta = beta + step.increments
        before = (acct.exact_used, acct.bound_used)
        new = acct.commit(step)
        assert (acct.exact_used, acct.bound_used) == before  # immutable: the old value stays
        # exact: the last step's distance from the anchor (not summed); bound: the summed beta
        assert new.exact_used == pytest.approx(start.r0 + step.anchor_distance + step.margin)
        assert new.bound_used == pytest.approx(start.r0 + float(torch.linalg.vector_norm(beta)))
        assert new.used == (new.exact_used if accounting == "exact" else new.bound_used)
        assert new.used == predicted  # used_after predicts what commit gives
        assert new.anchor_grad is start.anchor_grad and new.r0 == start.r0
        # the a-priori bound is never below the exact residual it bounds
        assert new.bound_used >= new.exact_used * (1 - 1e-9)
        acct = new


@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_restart_forgets_what_was_used(setup, accounting):
    problem, W, alive = setup
    acct = anchored(accounting, problem, W, alive, r0=0.02)
    (step,) = _steps(problem, W, alive, acct.anchor_grad, [[3, 4, 5, 6]])
    used = acct.commit(step)
    assert used.used > acct.used
    g2, r2 = anchor_at(problem, step.W, step.alive, r0=0.5)
    fresh = used.restart(g2, r2)
    assert fresh.accounting == accounting and fresh.anchor_grad is g2 and fresh.r0 == r2
    assert fresh.distance == fresh.margin == 0.0 and not bool(fresh.beta.any())
    assert fresh.exact_used == fresh.bound_used == r2


# (accounting, budget: the step's used_after scaled by this factor; whether the step fits)
NEAR_BUDGET = [
    ("exact", 1.0, True),  # exactly at the budget: allowed (<=)
    ("bound", 1.0, True),
    ("exact", 1 - 1e-12, False),  # a hair below: refused (the safety net)
    ("bound", 1 - 1e-12, False),
    ("exact", 2.0, True),
    ("bound", 0.5, False),
]


@pytest.mark.parametrize(("accounting", "factor", "fits"), NEAR_BUDGET)
def test_refusal_near_the_budget(setup, accounting, factor, fits):
    problem, W, alive = setup
    acct = anchored(accounting, problem, W, alive, r0=0.0)
    (step,) = _steps(problem, W, alive, acct.anchor_grad, [list(range(20))])
    limit = acct.used_after(step) * factor
    assert acct.fits(step, limit) is fits


@pytest.mark.parametrize(
    ("sigma", "epsilon", "delta"), [(0.01, 1.0, 1e-4), (1.0, 1.0, 1e-4), (100.0, 0.1, 1e-6)]
)
@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_budget_check_against_core_budget(setup, accounting, sigma, epsilon, delta):
    """A step fits exactly when its used budget is within core.budget.budget_total."""
    problem, W, alive = setup
    total = budget_total(sigma, epsilon, delta)
    acct = anchored(accounting, problem, W, alive, r0=0.0)
    (step,) = _steps(problem, W, alive, acct.anchor_grad, [list(range(50))])
    assert acct.fits(step, total) is (acct.used_after(step) <= total)
    assert acct.fits(step, total) is (acct.commit(step).used <= total)


def test_bad_accounting_and_frozen(setup):
    problem, W, alive = setup
    with pytest.raises(ValueError):
        anchored("nope", problem, W, alive, r0=0.0)
    acct = anchored("exact", problem, W, alive, r0=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        acct.r0 = 1.0  # type: ignore[misc]
    assert isinstance(acct.restart(acct.anchor_grad, 0.0), Accountant)
