"""Row views (core.rowview): once enough rows are gone, an epoch's fit, anchor, shadow runs and
removal steps read a gathered copy of the rows alive at its fit. Checked against the full
problem (the same step computed without the view), against the true gradient residual computed
from scratch with numpy, and through retrains, background adoption and a reload."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import core
from core.epoch import commit_prefix
from core.removal import SolveOptions
from core.rowview import MIN_SAVING, row_view
from tests.core.conftest import make_data
from tests.core.test_iterative_step import true_residual


def _model(name: str, accounting: str = "exact") -> core.Model:
    if name == "digits":
        ds = core.load_dataset("digits")
        X, y, lam, sigma = ds.X_train, ds.y_train, 1e-2, 1.0
    else:
        X, y = make_data(1500, 40, 2, 3)
        lam, sigma = 1e-3, 10.0
    return core.train(
        X, y, lam=lam, sigma=sigma, seed=5, max_removals=None, accounting=accounting, device="cpu"
    )


def _shrunk(name: str, accounting: str = "exact", fraction: float = 0.4) -> core.Model:
    """A model retrained without ``fraction`` of its rows (its epoch has a view)."""
    model = _model(name, accounting)
    order = np.random.default_rng(0).permutation(model.n_rows)
    model.retrain(order[: int(fraction * model.n_rows)].tolist(), seed=9)
    return model


def test_a_view_is_made_only_when_enough_rows_are_gone():
    model = _model("binary")
    p, n = model._problem, model.n_rows
    alive = torch.ones(n, dtype=torch.bool)
    assert row_view(p, alive) is None
    alive[: int(MIN_SAVING * n) - 1] = False
    assert row_view(p, alive) is None  # fewer than MIN_SAVING gone
    alive[: int(0.3 * n)] = False
    view = row_view(p, alive)
    assert view is not None
    kept = torch.nonzero(alive).flatten()
    assert torch.equal(view.index, kept)
    assert torch.equal(view.problem.X, p.X[kept]) and torch.equal(view.problem.Y, p.Y[kept])
    assert torch.equal(view.problem.X32, p.X32[kept])
    assert torch.equal(view.problem.row_norms_sq, p.row_norms_sq[kept])
    assert view.problem.x_norm2 == p.x_norm2 and view.problem.lam == p.lam
    assert torch.equal(view.rows(kept[[3, 0, 7]]), torch.tensor([3, 0, 7]))
    with pytest.raises(RuntimeError, match="outside its epoch"):
        view.rows(torch.tensor([0]))  # removed before the view: never served by its epoch


@pytest.mark.parametrize("name", ["digits", "binary"])
def test_the_fit_on_a_view_carries_its_margins(name):
    model = _shrunk(name)
    e, p = model._epoch, model._problem
    assert e.view is not None and torch.equal(e.view.index, torch.nonzero(e.alive).flatten())
    # Z: the margins at W on the view's rows, as a step would compute them (numpy, float64)
    X = p.X.numpy()[e.view.index.numpy()]
    Y = p.Y.numpy()[e.view.index.numpy()]
    assert e.Z is not None
    np.testing.assert_allclose(e.Z.numpy(), Y * (X @ e.W.numpy()), rtol=1e-12, atol=1e-12)
    assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("name", ["digits", "binary"])
@pytest.mark.parametrize("m", [1, 25])
def test_a_step_on_the_view_is_the_step_on_the_full_problem(name, m):
    model = _shrunk(name)
    # the direct solve: the two steps differ only by the order of their sums (CG's float32
    # products would add its tolerance, 1e-6, to the difference)
    model.solve_options = SolveOptions("direct")
    e = model._epoch
    rows = torch.nonzero(e.alive).flatten()[10 : 10 + m].tolist()
    full = dataclasses.replace(e, view=None, Z=None)
    budget = model.budget_total
    n_v, e_v, inc_v, _ = commit_prefix(model._problem, e, [rows], budget, model.solve_options)
    n_f, e_f, inc_f, _ = commit_prefix(model._problem, full, [rows], budget, model.solve_options)
    assert n_v == n_f == 1
    assert torch.equal(e_v.alive, e_f.alive) and int(e_v.alive.sum()) == int(e.alive.sum()) - m
    s_v, s_f = e_v.W - e.W, e_f.W - e.W
    assert float((s_v - s_f).norm()) <= 1e-9 * float(s_f.norm())
    # the view sums fewer terms: its rounding margins, in the figures, can only be smaller
    assert e_v.acct.exact_used <= e_f.acct.exact_used * (1 + 1e-12)
    assert e_v.acct.exact_used == pytest.approx(e_f.acct.exact_used, rel=1e-4)
    assert inc_v <= inc_f * (1 + 1e-9)
    assert e_v.view is e.view and e_v.Z.shape[0] == e.view.index.numel()


@pytest.mark.parametrize("accounting", ["exact", "bound"])
@pytest.mark.parametrize("name", ["digits", "binary"])
def test_removals_on_a_view_stay_certified(name, accounting):
    model = _shrunk(name, accounting)
    assert model._epoch.view is not None
    order = np.random.default_rng(2).permutation(np.flatnonzero(model.alive.numpy())).tolist()
    for t in range(12):
        res = model.remove(order[2 * t : 2 * t + 2])
        if not res.applied:  # the bound accounting's budget ran out: the safety net said so
            assert accounting == "bound" and res.retrain_reason == "budget" and t >= 3
            break
        truth = true_residual(model)
        assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
        assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12
    # a row removed before the view came is reported as already removed, as without a view
    gone = np.flatnonzero(~model.alive.numpy())[:1].tolist()
    used = model.budget_used
    res = model.remove(gone)
    assert res.already_removed == gone and res.removed == [] and model.budget_used == used


def test_a_background_retrain_on_a_view_catches_up_and_stays_certified():
    model = _shrunk("binary")
    order = np.random.default_rng(3).permutation(np.flatnonzero(model.alive.numpy())).tolist()
    model.remove(order[:150])  # 150 more gone: the snapshot's rows are fewer again
    snap = model.retrain_snapshot()
    prepared = model.prepare_retrain(snap, seed=13)
    assert prepared.view is not None
    assert int(prepared.view.index.numel()) == int(snap.alive.sum())
    model.remove(order[150:190])  # removed after the snapshot: the catch-up
    version = model.version
    result = model.adopt_retrain(prepared, order[190:200])
    assert result is not None and model.version == version + 1
    assert int(model.alive.sum()) == int(snap.alive.sum()) - 50
    assert not bool(model.alive[torch.as_tensor(order[:200])].any())
    assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12
    assert model.estimate_max_removals(seed=1) is None  # max_removals=None: no estimate


@pytest.mark.parametrize("name", ["digits", "binary"])
def test_a_catch_up_on_the_fits_thread_works_on_the_prepared_view(name):
    model = _shrunk(name)
    alive = np.flatnonzero(model.alive.numpy())
    order = np.random.default_rng(6).permutation(alive).tolist()
    model.remove(order[:100])  # 10 % of the remaining rows more: the next fit has a view
    prepared = model.prepare_retrain(seed=21)
    assert prepared.view is not None and prepared.view is not model._epoch.view
    model.remove(order[100:130])
    caught = model.catch_up(prepared)
    assert caught is not None and caught is not prepared and caught.view is prepared.view
    assert caught.Z.shape[0] == prepared.view.index.numel()
    model.remove(order[130:140])
    assert model.adopt_retrain(caught, order[140:145])
    assert model.removed_in_epoch == 45 and not bool(model.alive[order[:145]].any())
    assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12
    assert model.remove(order[145:150]).applied
    assert true_residual(model) <= model.exact_used * (1 + 1e-9) + 1e-12


def test_a_reloaded_model_with_many_rows_gone_has_a_view(tmp_path):
    model = _shrunk("digits")
    order = np.random.default_rng(4).permutation(np.flatnonzero(model.alive.numpy())).tolist()
    model.remove(order[:20])
    model.save(tmp_path / "state")
    loaded = core.load_model(tmp_path / "state", device="cpu")
    assert loaded._epoch.view is not None
    assert torch.equal(loaded.alive, model.alive) and torch.equal(loaded._W, model._W)
    # the loaded state is the new anchor: its figure adds the anchor's rounding margin
    assert model.budget_used <= loaded.budget_used <= model.budget_used * (1 + 1e-6)
    res = loaded.remove(order[20:30])
    assert res.applied and int(loaded.alive.sum()) == int(model.alive.sum()) - 10


def test_an_estimate_on_a_snapshot_reads_its_epochs_view(monkeypatch):
    ds = core.load_dataset("digits")
    model = core.train(ds.X_train, ds.y_train, lam=1e-2, sigma=1.0, seed=5, device="cpu")
    order = np.random.default_rng(0).permutation(model.n_rows)
    model.retrain(order[: int(0.4 * model.n_rows)].tolist(), seed=9)  # "auto", with a view
    model.remove(order[600:620].tolist())
    snap = model.retrain_snapshot()
    assert snap.view is model._epoch.view and snap.view is not None
    seeded = model.estimate_max_removals(snap, seed=3)

    def no_gather(*a, **k):
        raise AssertionError("the estimate gathered a copy of its own")

    monkeypatch.setattr(core.model, "row_view", no_gather)
    assert model.estimate_max_removals(snap, seed=3) == seeded  # the same, and no new copy
    rows, value = seeded
    assert rows == model.n_alive and 0 < value <= 0.25 * rows
