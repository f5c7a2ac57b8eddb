"""A retrain prepared in another thread from a snapshot, then adopted with a catch-up Newton step
(``Model.prepare_retrain`` / ``Model.adopt_retrain``), against the true gradient residual with the
new noise and an exact retrain (scipy) on the remaining rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import core
from tests.core.test_removal import exact_retrain, true_residual

LAM = 1e-2


def _train(digits, **kw):
    kw.setdefault("max_removals", 300)
    return core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0, **kw)


def test_prepared_in_a_thread_while_removals_go_on_then_adopted_is_certified(digits):
    model = _train(digits)
    model.remove(list(range(0, 100)), groups=[10] * 10)
    version, epoch_budget = model.version, model.budget_total
    old_noise = model.noise.clone()
    snap = model.retrain_snapshot()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(model.prepare_retrain, snap)
        for start in range(100, 200, 25):  # removals go on against the old epoch meanwhile
            assert model.remove(list(range(start, start + 25)), groups=[5] * 5).applied
        prepared = future.result()
    assert model.version == version  # preparing changed nothing
    alive_before = model.alive
    assert model.adopt_retrain(prepared)
    assert model.version == version + 1
    assert torch.equal(model.alive, alive_before)  # the caught-up rows stay removed
    assert model.removed_in_epoch == 100  # rows 100..199, removed after the snapshot
    assert not torch.equal(model.noise, old_noise)  # fresh noise
    assert model.budget_total == epoch_budget and 0 < model.budget_used < model.budget_total
    # the certificate of the new epoch, against the true residual with the new noise
    truth = true_residual(model, digits.X_train, digits.y_train, LAM)
    assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
    assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12
    W_star = exact_retrain(model, digits.X_train, digits.y_train, LAM)
    assert float((model.weights - W_star).norm()) <= truth / (LAM * model.n_alive) * 1.01 + 1e-7
    # and removals continue on the new epoch
    res = model.remove(list(range(200, 250)))
    assert res.applied and model.removed_in_epoch == 150
    assert true_residual(model, digits.X_train, digits.y_train, LAM) <= model.exact_used * (
        1 + 1e-9
    )


def test_adopt_without_removals_since_the_snapshot_is_the_fresh_fit(digits):
    model = _train(digits)
    model.remove(list(range(50)))
    prepared = model.prepare_retrain()
    assert model.adopt_retrain(prepared)
    assert model.removed_in_epoch == 0
    assert model.budget_used < 1e-6 * model.budget_total + 1e-9  # only r0 (tolerance-tied)
    assert torch.equal(model.weights.reshape(prepared.W.shape), prepared.W)


def test_a_stale_prepared_retrain_is_refused_and_changes_nothing(digits):
    model = _train(digits)
    prepared = model.prepare_retrain()
    model.retrain()  # another retrain happened meanwhile: the snapshot's version is gone
    W, version = model.weights.clone(), model.version
    assert not model.adopt_retrain(prepared)
    assert torch.equal(model.weights, W) and model.version == version


def test_a_catch_up_past_the_new_epochs_trigger_is_refused(digits):
    model = _train(digits, max_removals=40)
    snap = model.retrain_snapshot()
    prepared = model.prepare_retrain(snap)
    assert prepared.max_removals == 40
    model.remove(list(range(40)))  # 40 rows since the snapshot: fits exactly
    assert model.adopt_retrain(prepared)
    assert model.removed_in_epoch == 40
    snap = model.retrain_snapshot()
    prepared = model.prepare_retrain(snap)
    model.retrain()  # bumps the version: refused below for that
    model2 = _train(digits, max_removals=10)
    prepared2 = model2.prepare_retrain()
    model2.remove(list(range(10)))
    model2.max_removals = 50  # let the old epoch go on past what the prepared one allows
    model2.remove(list(range(10, 20)))
    W, version = model2.weights.clone(), model2.version
    assert not model2.adopt_retrain(prepared2)  # 20 caught-up rows > the new epoch's 10
    assert torch.equal(model2.weights, W) and model2.version == version
    assert not model.adopt_retrain(prepared)


def test_a_catch_up_past_the_budget_is_a_counted_safety_net_firing(digits):
    model = _train(digits)
    prepared = model.prepare_retrain()
    assert model.remove(list(range(200))).applied
    # a budget that the fresh fit's r0 fits but the 200-row catch-up step does not
    model.budget_total = 2 * prepared.r0_anchor + 1e-12
    W, version, fired = model.weights.clone(), model.version, model.safety_retrains
    assert not model.adopt_retrain(prepared)
    assert torch.equal(model.weights, W) and model.version == version
    assert model.safety_retrains == fired + 1


def test_adopted_model_persists_and_reloads(tmp_path, digits):
    model = _train(digits)
    model.save(tmp_path / "state")
    prepared = model.prepare_retrain()
    model.remove(list(range(30)))
    assert model.adopt_retrain(prepared)
    model.save(tmp_path / "state")
    loaded = core.load_model(tmp_path / "state")
    assert loaded.version == model.version and loaded.removed_in_epoch == 30
    assert torch.equal(loaded.alive, model.alive)
    torch.testing.assert_close(loaded.weights, model.weights)
    assert loaded.noise is None  # b is never persisted


def test_auto_reestimate_due_says_when_shadow_runs_come(digits):
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0)  # "auto"
    n0 = model.n_alive
    assert not model.auto_reestimate_due()
    assert not model.auto_reestimate_due(n0 // 2 + 1)
    assert model.auto_reestimate_due(n0 // 2 - 1)
    model.retrain(exclude=list(range(n0 // 2 + 10)))  # the retrain re-estimated: a new basis
    assert not model.auto_reestimate_due()
    assert not _train(digits).auto_reestimate_due(1)  # a fixed count never re-estimates


def test_requests_ride_in_the_catch_up_step(digits):
    model = _train(digits, max_removals=100)
    prepared = model.prepare_retrain()
    model.remove(list(range(40)))
    version = model.version
    res = model.adopt_retrain(prepared, list(range(30, 80)), groups=[10, 20, 20])
    assert res is not None and model.version == version + 1
    assert res.applied and res.applied_groups == 3
    assert res.already_removed == list(range(30, 40)) and res.removed == list(range(40, 80))
    assert model.removed_in_epoch == 80 and model.n_alive == model.n_rows - 80
    truth = true_residual(model, digits.X_train, digits.y_train, LAM)
    assert truth <= model.exact_used * (1 + 1e-9) + 1e-12 <= model.budget_total
    # groups past the new epoch's trigger are left pending, on request boundaries
    prepared = model.prepare_retrain()
    assert model.remove(list(range(80, 100))).applied  # fills the epoch: 20 rows to catch up
    res = model.adopt_retrain(prepared, list(range(100, 200)), groups=[50, 40, 10])
    assert res is not None and res.applied_groups == 1 and res.needs_retrain
    assert res.retrain_reason == "max_removals" and res.pending == list(range(150, 200))
    assert model.removed_in_epoch == 70 and model.n_alive == model.n_rows - 150


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_background_retrain_on_cuda_is_certified(digits):
    model = _train(digits, device="cuda")
    snap = model.retrain_snapshot()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(model.prepare_retrain, snap)
        for start in range(0, 100, 20):
            assert model.remove(list(range(start, start + 20))).applied
        prepared = future.result()
    res = model.adopt_retrain(prepared, list(range(100, 140)), groups=[20, 20])
    assert res is not None and res.applied and model.removed_in_epoch == 140
    assert model.device.type == "cuda"
    truth = true_residual(model, digits.X_train, digits.y_train, LAM)
    assert truth <= model.exact_used * (1 + 1e-9) + 1e-12 <= model.budget_total


def test_an_auto_trigger_estimated_ahead_is_scaled_by_the_fit(digits):
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0)  # "auto"
    rows, value = model.estimate_max_removals(seed=7)
    assert rows == model.n_alive and 0 < value <= 0.25 * rows
    assert model.estimate_max_removals(seed=7) == (rows, value)  # its own noise, seeded
    assert _train(digits).estimate_max_removals() is None  # a fixed count: nothing to estimate
    model.remove(list(range(100)))
    prepared = model.prepare_retrain(auto_basis=(rows, value))
    assert prepared.auto_basis == (rows, value)
    assert prepared.max_removals == int(value * (rows - 100) / rows)


def test_an_error_inside_the_catch_up_leaves_the_model_as_it_was(digits, monkeypatch):
    model = _train(digits)
    prepared = model.prepare_retrain()
    model.remove(list(range(30)))
    W, alive, version, used = model.weights.clone(), model.alive, model.version, model.budget_used
    extractor_removed = model.extractor_removed

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("core.epoch.newton_step", boom)
    with pytest.raises(RuntimeError):
        model.adopt_retrain(prepared, [40, 41])
    assert torch.equal(model.weights, W) and torch.equal(model.alive, alive)
    assert model.version == version and model.budget_used == used
    assert model.removed_in_epoch == 30 and model.extractor_removed == extractor_removed


def test_the_auto_basis_survives_a_restart(tmp_path, digits):
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0)  # "auto"
    basis = model._auto_basis
    assert basis is not None and not model.auto_reestimate_due()
    model.save(tmp_path / "s")
    loaded = core.load_model(tmp_path / "s")
    assert loaded._auto_basis == basis and not loaded.auto_reestimate_due()


def test_a_fit_told_not_to_reestimate_scales_the_last_estimate(digits):
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0)  # "auto"
    n0, m0 = model._auto_basis
    snap = model.retrain_snapshot()
    snap.alive[: n0 // 2 + 50] = False  # the rows have halved: a fit would estimate again
    n = int(snap.alive.sum())
    fresh = model.prepare_retrain(snap)
    assert fresh.auto_basis[0] == n  # shadow runs on the snapshot's rows
    scaled = model.prepare_retrain(snap, reestimate=False)
    assert scaled.auto_basis == (n0, m0)  # none: the last estimate, scaled
    assert scaled.max_removals == int(m0 * n / n0)


def test_a_catch_up_in_the_background_leaves_the_adoption_the_rest(digits):
    model = _train(digits, max_removals=400)
    model.remove(list(range(0, 50)))
    snap = model.retrain_snapshot()
    prepared = model.prepare_retrain(snap)
    assert model.catch_up(prepared) is prepared  # nothing removed since the snapshot
    model.remove(list(range(50, 120)), groups=[10] * 7)  # during the fit
    with ThreadPoolExecutor(1) as pool:  # the catch-up beside removals, as in the worker
        future = pool.submit(model.catch_up, prepared)
        for start in range(120, 160, 10):
            assert model.remove(list(range(start, start + 10))).applied
        caught = future.result()
    assert caught is not prepared and caught.version == prepared.version
    assert caught.removed_in_epoch >= 70 and not bool(caught.alive[50:120].any())
    assert torch.equal(prepared.alive, snap.alive)  # the prepared value is untouched
    assert caught.acct.exact_used > prepared.acct.exact_used  # the step is charged
    # the adoption removes only the rest; its step counts all of them against the trigger
    version = model.version
    assert model.adopt_retrain(caught, list(range(160, 170)))
    assert model.version == version + 1 and model.removed_in_epoch == 120
    assert not bool(model.alive[:170].any()) and model.n_alive == model.n_rows - 170
    truth = true_residual(model, digits.X_train, digits.y_train, LAM)
    assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
    assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12
    W_star = exact_retrain(model, digits.X_train, digits.y_train, LAM)
    assert float((model.weights - W_star).norm()) <= truth / (LAM * model.n_alive) * 1.01 + 1e-7


def test_a_catch_up_past_its_trigger_or_budget_or_for_another_version(digits):
    model = _train(digits, max_removals=30)
    prepared = model.prepare_retrain()
    model.max_removals = 100  # the old epoch goes on past what the prepared one allows
    model.remove(list(range(40)))
    assert model.catch_up(prepared) is prepared  # 40 > its trigger of 30
    assert not model.adopt_retrain(prepared)  # and the adoption refuses it, as before
    model.max_removals = None
    prepared = model.prepare_retrain()
    model.remove(list(range(40, 60)))
    budget, model.budget_total = model.budget_total, 2 * prepared.r0_anchor + 1e-12
    fired = model.safety_retrains  # the fit's r0 fits the budget, the catch-up step does not
    assert model.catch_up(prepared) is None  # the safety net fired: it must not take over
    assert model.safety_retrains == fired  # counted by the caller, on the removing thread
    model.count_safety_firing()
    assert model.safety_retrains == fired + 1
    model.budget_total = budget
    stale = model.prepare_retrain()
    model.retrain()
    model.remove([70])
    assert model.catch_up(stale) is stale  # another version's epoch


def test_an_estimate_paced_by_its_caller_is_the_same_estimate(digits):
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0)  # "auto"
    pauses: list[float] = []
    paced = model.estimate_max_removals(seed=7, pause=pauses.append)
    assert paced == model.estimate_max_removals(seed=7)
    assert len(pauses) >= 2 and all(p > 0 for p in pauses)  # after every shadow step
