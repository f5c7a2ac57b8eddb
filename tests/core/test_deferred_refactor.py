"""A refactor left to the caller (``SolveOptions.defer_refactor``, what a worker factors in a
background thread): the steps stay iterative on the old factor until a fresh one is installed,
a stalled CG still refactors in the step, a factor is installed only where it still applies, and
every step stays certified: the true gradient residual, from the data and the noise alone, never
exceeds the exact figure, which never exceeds the bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import core
from core.epoch import FactorJob, refactor_job, with_factor
from core.removal import SolveOptions, choose_solver
from core.solvers import fresh_factor
from tests.core.test_iterative_step import _trained, true_residual

DEFERRED = SolveOptions(defer_refactor=True)


def _asking(model: core.Model) -> None:
    """Make the model's cached factor ask for a refactor, as a CG step past its base would: a
    factor that kept CG at one iteration for many steps (the real steps take two or more at
    tolerance 1e-6, so each asks again, ``core.solvers.refactor_pays``)."""
    cache = dataclasses.replace(
        model._epoch.solver, iterations=2, base=1, lasted=1_000, refactor=True
    )
    model._epoch = dataclasses.replace(model._epoch, solver=cache)


def _asked() -> tuple[core.Model, FactorJob]:
    """A binary model deferring refactors whose step of row 3 asked for one, and its job."""
    model, _ = _trained("binary")
    model.solve_options = DEFERRED
    _asking(model)
    model.remove([3])
    job = model.refactor_job()
    assert job is not None
    return model, job


def _certified(model: core.Model) -> None:
    truth = true_residual(model)
    assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
    assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("accounting", ["exact", "bound"])
@pytest.mark.parametrize("name", ["binary", "digits"])
def test_deferred_steps_stay_iterative_until_a_fresh_factor_is_installed(name, accounting):
    model, _ = _trained(name, accounting)
    model.solve_options = DEFERRED
    _asking(model)
    old = model._epoch.solver.factor
    for row in (3, 4, 5):  # the refactor is asked for and deferred: CG on the old factor
        assert model.remove([row]).applied
        cache = model._epoch.solver
        assert cache.factor is old and cache.iterations > 0 and cache.refactor
        _certified(model)
    job = model.refactor_job()
    assert job is not None and job.replaces is old
    W, used = model._W.clone(), (model.exact_used, model.bound_used)
    assert model.install_factor(job, job.run())
    fresh = model._epoch.solver
    assert fresh.factor is not old and fresh.iterations == fresh.base == fresh.lasted == 0
    assert not fresh.refactor and model.refactor_job() is None
    # installing a preconditioner changes neither the weights nor the accounting
    assert torch.equal(model._W, W) and (model.exact_used, model.bound_used) == used
    for row in range(6, 30):
        assert model.remove([row]).applied
    assert model._epoch.solver.base > 0
    _certified(model)


def test_without_deferral_the_step_asked_to_refactor_is_direct():
    model, _ = _trained("binary")
    _asking(model)
    old = model._epoch.solver.factor
    assert model.refactor_job() is None  # nothing is left to the caller
    model.remove([3])
    cache = model._epoch.solver
    assert cache.factor is not old and cache.iterations == 0 and not cache.refactor


def test_a_stalled_cg_refactors_in_the_step_even_when_deferring():
    model, _ = _trained("binary")
    p = model._problem
    stalled = dataclasses.replace(model._epoch.solver, refactor=True, stalled=True)
    assert choose_solver(p, 1, stalled, DEFERRED) == "direct"
    assert choose_solver(p, 1, dataclasses.replace(stalled, stalled=False), DEFERRED) != "direct"
    # a CG that did not converge, kept (no fallback): its cache says so, and the next step
    # refactors itself though refactors are deferred
    model.solve_options = SolveOptions(
        "iterative", cg_max_iter=1, fallback=False, defer_refactor=True
    )
    model.remove([3])
    cache = model._epoch.solver
    assert cache.stalled and cache.refactor and model.refactor_job() is None
    model.solve_options = DEFERRED
    model.remove([4])
    fresh = model._epoch.solver
    assert fresh.factor is not cache.factor and fresh.iterations == 0 and not fresh.stalled
    _certified(model)


@pytest.mark.parametrize("name", ["binary", "digits"])
def test_the_fresh_factor_is_that_of_the_float64_hessian_of_the_remaining_rows(name):
    model, _ = _trained(name)
    model.solve_options = DEFERRED
    for row in (3, 4, 5):
        model.remove([row])
    p, e = model._problem, model._epoch
    L = fresh_factor(p, e.alive, e.W)
    assert L is not None and L.dtype == torch.float64
    # the oracle: X^T diag(C l''(z)) X + lam n' I per class, in NumPy float64
    keep = e.alive.numpy()
    X = p.X.numpy()[keep]
    Z = p.Y.numpy()[keep] * (X @ e.W.numpy())
    s = 1.0 / (1.0 + np.exp(-Z))
    c = p.omega.numpy()[keep] * s * (1.0 - s)
    for k in range(L.shape[0]):
        H = X.T @ (c[:, k : k + 1] * X) + p.lam * keep.sum() * np.eye(X.shape[1])
        LLt = (L[k] @ L[k].T).numpy()
        assert np.linalg.norm(LLt - H) <= 1e-5 * np.linalg.norm(H), k
    # the margins given or computed: the same factor
    assert torch.allclose(fresh_factor(p, e.alive, e.W, e.Z), L, rtol=0, atol=1e-12)


def test_a_factor_is_installed_only_where_it_still_applies():
    model, job = _asked()
    factor = job.run()
    before = model._epoch
    assert not model.install_factor(job, None)  # no factor (a failed factorisation)
    assert model._epoch is before
    wrong = torch.zeros((1, 3, 3), dtype=torch.float64)
    assert not model.install_factor(job, wrong)  # not this problem's shape
    # another model's epoch (same data, another fit)
    other, _ = _trained("binary")
    assert with_factor(other._epoch, job, factor) is None
    # a direct step since: the epoch no longer asks for a refactor ...
    model.solve_options = SolveOptions(solver="direct", defer_refactor=True)
    model.remove([4])
    direct = model._epoch.solver
    assert not direct.refactor
    assert not model.install_factor(job, factor)
    # ... and when its own factor asks again, the older one does not replace it
    model.solve_options = DEFERRED
    _asking(model)
    model.remove([7])
    assert model._epoch.solver.factor is direct.factor and model._epoch.solver.refactor
    assert not model.install_factor(job, factor)
    assert model._epoch.solver.factor is direct.factor
    # a retrain since: another epoch
    model.solve_options = DEFERRED
    _asking(model)
    model.remove([5])
    job = model.refactor_job()
    assert job is not None
    model.retrain()
    _asking(model)  # even one asking for a refactor: the job was for the epoch before
    assert not model.install_factor(job, job.run())
    # an epoch rolled back to before the job's removals (a discarded step): not installed
    model.remove([6])
    job = model.refactor_job()
    assert job is not None
    rolled = dataclasses.replace(model._epoch, removed_in_epoch=job.removed - 1)
    assert with_factor(rolled, job, job.run()) is None


def test_a_job_reads_a_snapshot_the_steps_never_change():
    model, _ = _asked()
    job = refactor_job(model._problem, model._epoch, DEFERRED)
    assert job is not None
    alive, W = job.alive.clone(), job.W.clone()
    first = job.run()
    for row in range(4, 12):  # steps go on meanwhile (as the drain's would)
        model.remove([row])
    assert torch.equal(job.alive, alive) and torch.equal(job.W, W)
    assert torch.equal(job.run(), first)


def test_a_hessian_that_does_not_factor_in_float32_is_factored_in_float64(monkeypatch):
    import core.solvers  # noqa: PLC0415

    model, _ = _trained("binary")
    p, e = model._problem, model._epoch
    real = torch.linalg.cholesky_ex
    dtypes = []

    def float32_fails(H):
        dtypes.append(H.dtype)
        L, info = real(H)
        return L, info + (H.dtype == torch.float32)

    monkeypatch.setattr(core.solvers.torch.linalg, "cholesky_ex", float32_fails)
    L = fresh_factor(p, e.alive, e.W)
    assert dtypes == [torch.float32, torch.float64] and L is not None
    monkeypatch.setattr(core.solvers.torch.linalg, "cholesky_ex", lambda H: (H, H[:, 0, 0] * 0 + 1))
    assert fresh_factor(p, e.alive, e.W) is None


def test_an_epoch_on_a_row_view_factors_and_installs_on_its_rows():
    model, _ = _trained("binary")
    model.retrain(exclude=list(range(0, 1500, 4)))  # a quarter of the rows gone: a row view
    view = model._epoch.view
    assert view is not None
    model.solve_options = DEFERRED
    _asking(model)
    model.remove([5])
    job = model.refactor_job()
    assert job is not None
    assert job.problem.X.shape[0] == view.problem.X.shape[0] < model.n_rows
    assert int(job.alive.sum()) == model.n_alive
    assert model.install_factor(job, job.run())
    for row in range(6, 30):
        if row % 4:
            assert model.remove([row]).applied
    assert model._epoch.solver.base > 0
    _certified(model)


def test_a_job_runs_on_a_thread_while_the_steps_go_on():
    import threading  # noqa: PLC0415

    model, job = _asked()
    alone = job.run()
    out = []
    thread = threading.Thread(target=lambda: out.extend(job.run() for _ in range(3)))
    thread.start()
    for row in range(4, 24):
        assert model.remove([row]).applied
    thread.join(timeout=60)
    assert len(out) == 3 and all(torch.equal(f, alone) for f in out)
    _certified(model)
