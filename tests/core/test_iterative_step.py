"""The iterative removal step (CG preconditioned by a cached Cholesky factor, core.removal)
against the direct solve, and its certificate: the true gradient residual of the released weights
on the remaining rows, computed here from scratch in float64 with the in-memory noise, never
exceeds the exact accounted figure, which never exceeds the bound (docs/theory.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import core
from core.epoch import commit_prefix
from core.newton import gradient_tolerance, newton_fit
from core.removal import SolveOptions, SolverCache, choose_solver, newton_step
from tests.core.conftest import make_data

ITERATIVE = SolveOptions(solver="iterative")
DIRECT = SolveOptions(solver="direct")


def true_residual(model: core.Model) -> float:
    """``||grad L_b(W; D')||_F`` in float64 from the data, the weights and the noise alone."""
    p = model._problem
    keep = model.alive.cpu().numpy()
    X = p.X.cpu().numpy()[keep]
    Y = p.Y.cpu().numpy()[keep]
    omega = p.omega.cpu().numpy()[keep]
    W = model._W.cpu().numpy()
    Z = Y * (X @ W)
    lprime = -1.0 / (1.0 + np.exp(Z))  # l'(z) = sigmoid(z) - 1
    G = X.T @ (omega * lprime * Y) + p.lam * keep.sum() * W + model.noise.cpu().numpy()
    return float(np.linalg.norm(G))


def binary_data(n: int = 1500, d: int = 200, seed: int = 0):
    return make_data(n, d, 2, seed)


def _trained(name: str, accounting: str = "exact") -> tuple[core.Model, float]:
    if name == "digits":
        ds = core.load_dataset("digits")
        X, y, lam = ds.X_train, ds.y_train, 1e-2
        sigma = 1.0
    else:
        X, y = binary_data()
        lam, sigma = 1e-3, 10.0
    model = core.train(
        X, y, lam=lam, sigma=sigma, seed=7, max_removals=None, accounting=accounting, device="cpu"
    )
    return model, lam


@pytest.mark.parametrize("name", ["digits", "binary"])
@pytest.mark.parametrize("m", [1, 10])
def test_iterative_step_equals_the_direct_solve(name, m):
    model, _ = _trained(name)
    e, p = model._epoch, model._problem
    assert e.solver is not None  # the fit's factor seeds the cache
    rows = torch.arange(5, 5 + m)
    args = (p, e.alive, e.W, rows, e.acct.anchor_grad)
    it = newton_step(*args, cache=e.solver, options=ITERATIVE)
    direct = newton_step(*args, cache=e.solver, options=DIRECT)
    assert it is not None and direct is not None
    assert it.method == "iterative" and 1 <= it.iterations <= 8
    assert direct.method == "direct" and direct.iterations == 0
    s_it, s_dir = it.W - e.W, direct.W - e.W
    assert float((s_it - s_dir).norm()) <= 1e-6 * float(s_dir.norm())
    # the solve residual CG leaves (its products are float32), certified in float64, is within
    # the acceptance check's 100 cg_tol ||Delta|| and far below the increment it is charged in
    delta_norms = torch.linalg.vector_norm(_delta(p, e, rows), dim=0)
    assert bool((it.solve_residual <= 100 * ITERATIVE.cg_tol * delta_norms).all())
    assert float(it.solve_residual.max()) <= 2e-4 * float(it.increments.max())
    assert float(direct.solve_residual.max()) <= 1e-9 * float(direct.increments.max())
    # the exact accounting's figure moves by H' (s_it - s_dir) = r_it - r_dir (r = H's - Delta,
    # up to the second-order remainder of the step difference): at most the two solve residuals
    moved = abs(it.anchor_distance - direct.anchor_distance)
    assert moved <= 1.01 * float(it.solve_residual.norm() + direct.solve_residual.norm()) + 1e-15
    # a tolerance float32 products cannot reach: CG fails and the step is the direct one
    tight = newton_step(*args, cache=e.solver, options=SolveOptions("iterative", cg_tol=1e-12))
    assert tight is not None and tight.method == "direct" and torch.equal(tight.W, direct.W)


def _delta(p, e, rows: torch.Tensor) -> torch.Tensor:
    """``Delta`` of removing ``rows`` at the epoch's weights, from scratch in float64."""
    Z = p.Y * (p.X @ e.W)
    lprime = -torch.sigmoid(-Z[rows])
    return p.X[rows].T @ (p.omega[rows] * lprime * p.Y[rows]) + p.lam * rows.numel() * e.W


@pytest.mark.parametrize("accounting", ["exact", "bound"])
@pytest.mark.parametrize("name", ["digits", "binary"])
def test_many_single_removals_on_the_iterative_path_stay_certified(name, accounting):
    model, _ = _trained(name, accounting)
    model.solve_options = ITERATIVE
    order = np.random.default_rng(1).permutation(model.n_rows)[:120].tolist()
    iterative_steps = 0
    for t, row in enumerate(order, start=1):
        res = model.remove([row])
        assert res.applied
        iterative_steps += model._epoch.solver.iterations > 0
        if t % 20 == 0 or t <= 3:
            truth = true_residual(model)
            assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
            assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12
            used = model.exact_used if accounting == "exact" else model.bound_used
            assert model.budget_used == used
    assert iterative_steps >= 110  # the iterative path did the work (refactors are direct)


def test_auto_chooses_cg_while_it_is_cheaper_than_the_gram_matrix():
    wide, _ = _trained("binary")  # d = 200
    narrow, _ = _trained("digits")  # d = 64
    for model in (wide, narrow):
        assert choose_solver(model._problem, 1, model._epoch.solver) == "iterative"
        assert choose_solver(model._problem, 1, None) == "direct"  # no factor yet
        refactor = dataclasses.replace(model._epoch.solver, refactor=True)
        assert choose_solver(model._problem, 1, refactor) == "direct"
    # the estimated CG cost grows with the last iteration count (and the batch): 8 iterations
    # of two float32 products cost more than a 64-wide Gram matrix, less than a 200-wide one
    for model, want in ((narrow, "direct"), (wide, "iterative")):
        busy = dataclasses.replace(model._epoch.solver, iterations=8)
        assert choose_solver(model._problem, 1, busy) == want
    busy = dataclasses.replace(wide._epoch.solver, iterations=40)
    assert choose_solver(wide._problem, 1, busy) == "direct"
    wide.remove([3])
    assert wide._epoch.solver.iterations > 0  # auto took CG on the wide data


def test_a_cg_that_does_not_converge_falls_back_to_the_direct_step():
    model, _ = _trained("binary")
    e, p = model._epoch, model._problem
    rows = torch.tensor([11])
    args = (p, e.alive, e.W, rows, e.acct.anchor_grad)
    failed = newton_step(*args, cache=e.solver, options=SolveOptions("iterative", cg_max_iter=1))
    direct = newton_step(*args, cache=e.solver, options=DIRECT)
    assert failed is not None and direct is not None
    assert failed.method == "direct" and torch.equal(failed.W, direct.W)
    assert failed.cache is not None and not failed.cache.refactor  # a fresh factor


def test_an_unconverged_cg_step_kept_charges_its_residual_soundly():
    model, _ = _trained("binary")
    model.solve_options = SolveOptions("iterative", cg_max_iter=1, fallback=False)
    e = model._epoch
    step = newton_step(
        model._problem,
        e.alive,
        e.W,
        torch.tensor([11]),
        e.acct.anchor_grad,
        cache=e.solver,
        options=model.solve_options,
    )
    assert step is not None and step.method == "iterative" and step.cache.refactor
    assert float(step.solve_residual.max()) > 1e-9  # visibly inexact ...
    assert bool((step.increments >= step.solve_residual).all())  # ... and charged
    for row in range(11, 41):
        model.remove([row])
        truth = true_residual(model)
        assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12


def test_cg_iterations_past_the_threshold_make_the_next_step_refactor():
    model, _ = _trained("binary")
    e = model._epoch
    n, e1, _, _ = commit_prefix(
        model._problem,
        e,
        [[3]],
        model.budget_total,
        SolveOptions("iterative", refactor_iterations=1),
    )
    assert n == 1 and e1.solver.iterations > 1 and e1.solver.refactor
    n, e2, _, _ = commit_prefix(model._problem, e1, [[4]], model.budget_total, ITERATIVE)
    assert n == 1 and e2.solver.iterations == 0 and not e2.solver.refactor  # refactored (direct)
    assert e2.solver.factor is not e1.solver.factor


def test_the_factor_is_never_persisted_and_a_reload_is_identical(tmp_path):
    model, _ = _trained("binary")
    model.remove([1, 2])
    model.remove([3])
    state = model.to_state()
    assert set(state.tensors) <= {"weights", "alive", "omega"}
    assert "solver" not in state.state and "factor" not in str(state.state)
    model.save(tmp_path)
    loaded = core.load_model(tmp_path)
    assert loaded._epoch.solver is None  # the first step after a load is direct
    again = loaded.to_state()
    for key, tensor in state.tensors.items():
        assert torch.equal(again.tensors[key], tensor)
    loaded.save(tmp_path)
    reloaded = core.load_model(tmp_path)
    assert torch.equal(reloaded.weights, model.weights)
    assert torch.equal(reloaded.alive, model.alive)
    # the next removal: direct after the load, CG in memory; the same step to CG's tolerance
    # (1e-6 on float32 products)
    model.remove([4])
    reloaded.remove([4])
    assert reloaded._epoch.solver.iterations == 0 and model._epoch.solver.iterations > 0
    scale = float((model.weights - loaded.weights).norm())
    assert float((model.weights - reloaded.weights).norm()) <= 1e-6 * scale


def test_a_warm_retrain_uses_the_cached_factor_and_keeps_the_tolerance():
    model, lam = _trained("binary")
    model.remove(list(range(50)))
    p, alive = model._problem, model.alive
    C, n_reg = p.weights(alive), float(alive.sum())
    B = torch.randn(model._W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tol = gradient_tolerance(lam, n_reg, model.budget_total)
    kw = dict(tol=tol, W0=model._W, hess_dtype=p.hess_dtype)
    plain = newton_fit(p.X, p.Y, C, lam, n_reg, B, **kw)
    pre = newton_fit(p.X, p.Y, C, lam, n_reg, B, precond=model._epoch.solver.factor, **kw)
    # CG's products on the float32 copy of X (as fit_epoch runs it): only the direction moves
    pre32 = newton_fit(
        p.X, p.Y, C, lam, n_reg, B, precond=model._epoch.solver.factor, X32=p.X32, **kw
    )
    assert plain.r0 <= tol and pre.r0 <= tol and pre32.r0 <= tol
    # r0 is the float64 gradient norm at the weights returned (numpy's, independently)
    Xn, Yn, Cn, Wn = (t.numpy() for t in (p.X, p.Y, C, pre32.W))
    z = Yn * (Xn @ Wn)
    grad = Xn.T @ (Cn * -Yn / (1 + np.exp(z))) + lam * n_reg * Wn + B.numpy()
    assert abs(float(np.linalg.norm(grad)) - pre32.r0) <= 1e-6 * tol
    # and from a cold start (a Hessian first, then CG on its factor with float32 products)
    cold32 = newton_fit(p.X, p.Y, C, lam, n_reg, B, tol=tol, hess_dtype=p.hess_dtype, X32=p.X32)
    assert cold32.r0 <= tol and cold32.factor is not None
    # all four are within r0 / (lam n) of the unique minimiser
    for a, b in ((plain, pre), (plain, pre32), (plain, cold32)):
        assert float((a.W - b.W).norm()) <= (a.r0 + b.r0) / (lam * n_reg) * 1.01 + 1e-12
    version = model.version
    model.retrain()
    assert model.version == version + 1 and model._epoch.r0_anchor <= model.budget_total
    assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12


def _capacity(model: core.Model, order: list[int]) -> tuple[int, int]:
    """Single removals until the safety net refuses one (the exact count: the model decides on
    the exact accounting) and the last count whose bound figure stayed within the budget."""
    budget, exact, bound = model.budget_total, 0, None
    for t, row in enumerate(order, start=1):
        if not model.remove([row]).applied:
            break
        exact = t
        if bound is None and model.bound_used > budget:
            bound = t - 1
    assert bound is not None
    return exact, bound


def test_digits_capacity_is_the_same_on_the_iterative_path():
    ds = core.load_dataset("digits")
    setting = dict(lam=1e-2, sigma=1.0, epsilon=1.0, delta=1e-4, max_removals=None, seed=11)
    order = np.random.default_rng(0).permutation(len(ds.y_train)).tolist()
    counts = {}
    for solver in ("direct", "iterative"):
        model = core.train(ds.X_train, ds.y_train, **setting, device="cpu")
        model.solve_options = SolveOptions(solver)
        counts[solver] = _capacity(model, order)
    (exact_d, bound_d), (exact_i, bound_i) = counts["direct"], counts["iterative"]
    assert abs(exact_i - exact_d) <= 2 and abs(bound_i - bound_d) <= 2, counts
    assert 350 <= exact_i <= 550 and 250 <= bound_i <= 420, counts


def test_solver_cache_of_none_and_options_are_validated():
    assert SolverCache.of(None) is None
    with pytest.raises(ValueError):
        SolveOptions("cholesky")
    with pytest.raises(ValueError):
        SolveOptions(cg_max_iter=0)


def test_a_nan_residual_is_never_solved():
    """``Step.residual_ratio`` is the worst class's: a NaN in any class (whatever its place)
    counts as unsolved, so such a CG step is redone directly."""
    from core.removal import _ratio  # noqa: PLC0415

    assert max(map(_ratio, [5.0, float("nan")], [1.0, 1.0])) == float("inf")
    assert max(map(_ratio, [float("nan"), 5.0], [1.0, 1.0])) == float("inf")
    assert _ratio(0.0, 0.0) == 0.0 and _ratio(1e-9, 0.0) == float("inf")
    assert _ratio(1e-7, 1e-1) == pytest.approx(1e-6)
