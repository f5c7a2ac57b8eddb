"""core.epoch: a noise epoch is one immutable value, so a failed or refused operation leaves the
model exactly as it was (every public attribute and ``to_state()`` compared)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import core
from core.epoch import NoiseEpoch, commit_prefix, fit_epoch
from core.errors import InvalidInputError

#: the public attributes of a model (the worker's, the tests', the benchmarks')
ATTRS = (
    "ids", "version", "n_rows", "n_alive", "budget_used", "budget_total", "max_removals",
    "removed_in_epoch", "safety_retrains", "certified", "device", "extractor_removals_remaining",
    "extractor_removed", "extra", "hyper", "classes", "exact_used", "bound_used",
    "budget_remaining", "data_fingerprint", "save_seq", "excluded_ids",
)  # fmt: skip


def _train(digits, **kw):
    kw.setdefault("max_removals", 300)
    return core.train(
        digits.X_train, digits.y_train, ids=digits.ids_train, lam=1e-2, sigma=1.0, seed=0,
        device="cpu", **kw,
    )  # fmt: skip


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if hasattr(a, "tolist") and not isinstance(a, torch.Tensor):
        return _equal(a.tolist(), b.tolist())
    return bool(a == b)


def _everything(model):
    """Every public attribute, the weights, the alive mask, the noise and ``to_state()``."""
    state = model.to_state()
    return {
        **{name: getattr(model, name) for name in ATTRS},
        "alive": model.alive,
        "weights": model.weights.clone(),
        "noise": model.noise,
        "guarantee": model.guarantee(),
        "auto_reestimate_due": model.auto_reestimate_due(),
        "state": state.state,
        "tensors": state.tensors,
        "fingerprint": state.fingerprint,
    }


def assert_unchanged(model, before) -> None:
    after = _everything(model)
    changed = [k for k in before if not _equal(before[k], after[k])]
    assert not changed, f"changed: {changed}"


def test_a_noise_epoch_is_immutable(digits):
    model = _train(digits)
    epoch = model._epoch
    assert isinstance(epoch, NoiseEpoch)
    with pytest.raises(dataclasses.FrozenInstanceError):
        epoch.max_removals = 3  # type: ignore[misc]
    model.max_removals = 3  # a public setter makes a new epoch value
    assert model._epoch is not epoch and epoch.max_removals == 300
    model.remove([0, 1])
    assert epoch.removed_in_epoch == 0 and bool(epoch.alive[0])  # the old value is untouched


def test_fit_epoch_is_pure_and_deterministic(digits):
    model = _train(digits)
    model.remove(list(range(20)))
    before = _everything(model)
    args = (model._problem, model.hyper, model.budget_total, model.alive)
    kw = {"binary": False, "version": model.version, "seed": 5, "W0": model._W}
    one, two = fit_epoch(*args, **kw), fit_epoch(*args, **kw)
    assert torch.equal(one.W, two.W) and torch.equal(one.noise, two.noise)
    assert one.removed_in_epoch == 0 and one.version == model.version
    # the fit's margins at its weights come with it (the first step makes no pass for them)
    p = model._problem
    assert one.view is None and one.Z is not None
    torch.testing.assert_close(one.Z, p.Y * (p.X @ one.W), rtol=1e-12, atol=1e-12)
    assert_unchanged(model, before)


def test_commit_prefix_leaves_its_input_epoch_alone(digits):
    model = _train(digits)
    epoch = model._epoch
    n, new, inc, reason = commit_prefix(model._problem, epoch, [[0, 1], [2]], model.budget_total)
    assert (n, reason) == (2, None) and inc > 0
    assert new.removed_in_epoch == 3 and new.extractor_removed == 3
    assert epoch.removed_in_epoch == 0 and bool(epoch.alive[:3].all())
    # a budget no step fits: nothing committed, the same epoch value back
    n, same, inc, reason = commit_prefix(model._problem, epoch, [[0, 1], [2]], 0.0)
    assert (n, inc, reason) == (0, 0.0, "budget") and same is epoch


@pytest.mark.parametrize("where", ["core.epoch.newton_step", "core.model.commit_prefix"])
def test_an_adopt_retrain_that_raises_leaves_the_model_exactly_as_before(
    digits, monkeypatch, where
):
    model = _train(digits)
    prepared = model.prepare_retrain()
    model.remove(list(range(30)))
    model.extra = {"note": 1}
    before = _everything(model)

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(where, boom)
    with pytest.raises(RuntimeError):
        model.adopt_retrain(prepared, [40, 41], groups=[1, 1])
    assert_unchanged(model, before)
    monkeypatch.undo()
    assert model.adopt_retrain(prepared, [40, 41], groups=[1, 1]).applied  # and it still works
    assert model.version == before["version"] + 1 and model.removed_in_epoch == 32


def test_an_adopt_retrain_that_cannot_take_over_changes_nothing_but_the_counter(digits):
    model = _train(digits)
    prepared = model.prepare_retrain()
    model.remove(list(range(30)))
    before = _everything(model)
    # another version: refused before anything is computed
    assert model.adopt_retrain(dataclasses.replace(prepared, version=99)) is None
    assert_unchanged(model, before)
    # the catch-up alone past the prepared epoch's trigger
    assert model.adopt_retrain(dataclasses.replace(prepared, max_removals=10)) is None
    assert_unchanged(model, before)
    # the catch-up alone past the budget: a safety-net firing, counted, nothing else changes
    model.budget_total = prepared.r0_anchor * (1 + 1e-12)
    before = _everything(model)
    assert model.adopt_retrain(prepared) is None
    assert model.safety_retrains == before["safety_retrains"] + 1
    before["safety_retrains"] += 1
    before["state"]["safety_retrains"] += 1
    assert_unchanged(model, before)


def test_refused_removals_and_retrains_leave_the_model_as_before(digits):
    model = _train(digits, extractor_dp=(1.0, 1e-5), extractor_limit=(0.5, 1e-4))
    model.remove(list(range(5)))
    before = _everything(model)
    with pytest.raises(InvalidInputError):
        model.remove([10, 10])  # repeated
    with pytest.raises(InvalidInputError):
        model.remove([model.n_rows])  # out of range
    with pytest.raises(InvalidInputError):
        model.retrain(exclude=list(range(model.n_rows)))  # no rows left
    left = model.extractor_removals_remaining
    with pytest.raises(InvalidInputError):
        model.retrain(exclude=list(range(10, 12 + left)))  # past the extractor's cover
    assert_unchanged(model, before)


def test_to_state_round_trips(digits, tmp_path):
    model = _train(digits, subsample_ratio=0.5)
    model.remove(list(range(7)), groups=[3, 4])
    state = model.to_state()
    back = core.Model.from_state(state, model.dataset or digits, "cpu")
    got = back.to_state()
    assert _equal(got.tensors, state.tensors) and got.fingerprint == state.fingerprint
    differs = {k for k in state.state if not _equal(state.state[k], got.state[k])}
    # the budget used is the new anchor's r0: the stored bound plus the float64 rounding margin
    assert differs <= {"budget_used"}
    assert (
        state.state["budget_used"]
        <= got.state["budget_used"]
        <= state.state["budget_used"] * (1 + 1e-6)
    )
