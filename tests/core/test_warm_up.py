"""``Model.warm_up``: one removal step computed and thrown away before a worker serves. The
model's state and accounting are unchanged; an epoch without a solver factor (loaded from disk)
keeps the step's as its preconditioner, and removals after it stay certified (checked against
the true gradient residual by autograd)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

import core
from tests.core.test_removal import true_residual
from worker.runtime import warm_up

LAM = 1e-2


def _state(model: core.Model) -> tuple:
    return (
        model.weights.clone(),
        model.alive.clone(),
        model.version,
        model.budget_used,
        model.exact_used,
        model.bound_used,
        model.removed_in_epoch,
        model.safety_retrains,
    )


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def test_warm_up_changes_nothing_and_keeps_the_factor_of_a_loaded_model(
    digits, tmp_path: Path
) -> None:
    trained = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0, max_removals=200)
    trained.save(tmp_path / "state")
    model = core.load_model(tmp_path / "state", device="cpu")
    assert model._epoch.solver is None  # the factor is never persisted
    before = _state(model)
    model.warm_up()
    assert _same(before, _state(model))
    assert model._epoch.solver is not None
    assert model.remove(list(range(20))).applied  # and serving goes on
    assert model.removed_in_epoch == 20 and model.budget_used <= model.budget_total


def test_removals_after_a_warm_up_are_certified(digits) -> None:
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0, max_removals=200)
    model._epoch = dataclasses.replace(model._epoch, solver=None)  # as loaded from disk
    before = _state(model)
    model.warm_up()
    assert _same(before, _state(model))
    for start in range(0, 60, 20):
        assert model.remove(list(range(start, start + 20)), groups=[5] * 4).applied
    truth = true_residual(model, digits.X_train, digits.y_train, LAM)
    assert truth <= model.exact_used * (1 + 1e-9) + 1e-12
    assert model.exact_used <= model.bound_used * (1 + 1e-9) + 1e-12


def test_warm_up_keeps_the_factor_a_model_has(digits) -> None:
    model = core.train(digits.X_train, digits.y_train, lam=LAM, sigma=1.0, max_removals=200)
    solver = model._epoch.solver
    assert solver is not None  # the fit's
    model.warm_up()
    assert model._epoch.solver is solver


def test_a_failed_warm_up_does_not_fail_the_start(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def warm_up(self) -> None:
            raise RuntimeError("out of memory")

    with caplog.at_level(logging.WARNING, logger="certremove.worker"):
        warm_up(Broken())  # type: ignore[arg-type]
    assert "warm-up step failed (RuntimeError: out of memory)" in caplog.text
