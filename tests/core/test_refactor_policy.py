"""When CG's iterations grow past those a fresh factor gave, the next step refactors where that
pays for itself (core.solvers.refactor_pays), and the steps on either path stay certified: the
true gradient residual, computed here from the data and the noise alone, never exceeds the exact
figure, which never exceeds the bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import core
from core.epoch import commit_prefix
from core.removal import SolveOptions, SolverCache
from core.solvers import refactor_pays
from tests.core.test_iterative_step import ITERATIVE, _trained, true_residual

AUTO = SolveOptions()


def _costs(d: int) -> tuple[float, float]:
    """By hand, from the cost model's documented constants on the CPU (a float32 product half a
    float64 pass, the Gram matrix d / 12 passes): one CG iteration (two float32 products) and
    the direct path (the Gram matrix and a float64 refinement's two passes)."""
    return 2 * 0.5, d / 12 + 2


@pytest.mark.parametrize("name", ["digits", "binary"])
def test_refactor_pays_against_the_costs_computed_by_hand(name):
    model, _ = _trained(name)
    p, factor = model._problem, model._epoch.solver.factor
    d = p.X.shape[1]
    per_iteration, direct = _costs(d)
    for base, its in ((1, 2), (2, 3), (2, 5)):
        extra = direct - per_iteration * its  # the next step direct instead of CG at ``its``
        saved = (its - base) * per_iteration  # per step back at ``base``
        # the fewest steps at ``base`` for which a refactor pays: ``saved * lasted > extra``
        least = int(np.floor(extra / saved)) + 1
        for lasted, want in ((least - 1, False), (least, True), (least + 10, True)):
            cache = SolverCache(factor, iterations=base, base=base, lasted=lasted)
            assert refactor_pays(p, its, cache) is (want and lasted > 0), (base, its, lasted)
    cache = SolverCache(factor, base=2, lasted=10_000)
    assert not refactor_pays(p, 2, cache)  # no more iterations than the base: nothing to save
    assert not refactor_pays(p, 1, cache)
    assert not refactor_pays(p, 3, dataclasses.replace(cache, base=0))  # no base yet
    assert not refactor_pays(p, 3, dataclasses.replace(cache, lasted=0))  # lasted no step


def test_the_first_cg_step_on_a_factor_sets_its_base_and_counts_how_long_it_lasts():
    model, _ = _trained("binary")
    e = model._epoch
    assert e.solver.base == 0 and e.solver.lasted == 0  # the fit's factor: no CG step yet
    steps = []
    for row in range(3, 9):
        n, e, _, _ = commit_prefix(model._problem, e, [[row]], model.budget_total, AUTO)
        assert n == 1
        steps.append(e.solver)
    first = steps[0]
    assert first.iterations > 0 and first.base == first.iterations and first.lasted == 1
    for before, after in zip(steps[:-1], steps[1:], strict=True):
        assert after.factor is before.factor and after.base == first.base  # no refactor
        assert after.lasted == before.lasted + (after.iterations <= first.base)


def _grown(model: core.Model) -> SolverCache:
    """The model's factor as if it had kept CG at one iteration for many steps: the next real
    CG step (which needs two or more at tolerance 1e-6) is one past that base."""
    return dataclasses.replace(model._epoch.solver, iterations=1, base=1, lasted=1_000)


@pytest.mark.parametrize("accounting", ["exact", "bound"])
def test_cg_grown_past_its_base_refactors_when_it_pays_and_stays_certified(accounting):
    model, _ = _trained("binary", accounting)
    model._epoch = dataclasses.replace(model._epoch, solver=_grown(model))
    grown = model._epoch.solver
    model.remove([3])
    after = model._epoch.solver
    assert after.factor is grown.factor and after.iterations >= 2  # CG on the old factor ...
    assert after.refactor  # ... one iteration past a base that lasted: refactoring pays
    model.remove([4])
    fresh = model._epoch.solver
    assert fresh.factor is not grown.factor and fresh.iterations == 0  # the direct step
    assert not fresh.refactor and fresh.base == 0 and fresh.lasted == 0
    model.remove([5])
    again = model._epoch.solver
    assert again.factor is fresh.factor and again.base == again.iterations > 0
    # every step certified: the truth <= the exact figure <= the bound
    for row in range(6, 40):
        assert model.remove([row]).applied
        truth = true_residual(model)
        assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12


def test_a_base_that_lasted_too_few_steps_keeps_the_factor():
    model, _ = _trained("binary")  # d = 200: the direct path costs about 18 CG iterations
    cache = dataclasses.replace(model._epoch.solver, iterations=1, base=1, lasted=2)
    model._epoch = dataclasses.replace(model._epoch, solver=cache)
    model.remove([3])
    after = model._epoch.solver
    assert after.factor is cache.factor and after.iterations >= 2 and not after.refactor


def test_forced_cg_never_refactors_for_cost():
    model, _ = _trained("binary")
    model.solve_options = ITERATIVE
    model._epoch = dataclasses.replace(model._epoch, solver=_grown(model))
    factor = model._epoch.solver.factor
    for row in range(3, 6):
        model.remove([row])
        assert model._epoch.solver.factor is factor and not model._epoch.solver.refactor


def test_a_step_of_no_iterations_before_any_base_counts_for_nothing():
    """A zero right-hand side takes CG no iterations: before a base is set that says nothing about
    how long the factor keeps CG at its fewest."""
    import torch  # noqa: PLC0415

    from core.removal import newton_step  # noqa: PLC0415

    model, _ = _trained("binary")
    e, p = model._epoch, model._problem
    assert e.solver.base == 0
    # weights 0 and a removed row of zeros: Delta = 0, so CG stops before its first iteration
    zero_row = torch.zeros_like(p.X[0])
    X = p.X.clone()
    X[3] = zero_row
    p0 = dataclasses.replace(p, X=X)
    W0 = torch.zeros_like(e.W)
    step = newton_step(
        p0, e.alive, W0, torch.tensor([3]), e.acct.anchor_grad, cache=e.solver, options=AUTO
    )
    assert step is not None and step.method == "iterative" and step.iterations == 0
    assert step.cache.base == 0 and step.cache.lasted == 0
