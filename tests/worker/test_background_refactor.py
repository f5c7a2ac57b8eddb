"""The worker's background refactor (``worker.refactor``): a fresh preconditioner factored in its
own thread while the steps go on, installed on the drain's thread after a later step; dropped
when it no longer applies; a failure never reaches the drain. And the setting that turns it off
(``CERTREMOVE_BACKGROUND_REFACTOR``) reaches the served model."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import core
from core.removal import SolveOptions
from tests.core.conftest import make_data
from worker.metrics import ServiceMetrics
from worker.refactor import BackgroundRefactor
from worker.settings import Settings


def _model() -> core.Model:
    X, y = make_data(1200, 40, 2, 3)
    model = core.train(X, y, lam=1e-3, sigma=10.0, seed=5, max_removals=None, device="cpu")
    model.solve_options = SolveOptions(defer_refactor=True)
    return model


def _ask(model: core.Model) -> None:
    """The cached factor asks for a refactor (as after CG grew past the base it lasted at)."""
    cache = dataclasses.replace(
        model._epoch.solver, iterations=2, base=1, lasted=1_000, refactor=True
    )
    model._epoch = dataclasses.replace(model._epoch, solver=cache)


def _settle(refactors: BackgroundRefactor) -> None:
    """Wait for the factorisation in flight (the drain never waits: the test does)."""
    pending = refactors._pending
    assert pending is not None
    pending[1].result(timeout=30)


def _counted(reg: CollectorRegistry) -> dict[str, float | None]:
    return {
        o: reg.get_sample_value("certremove_background_refactors_total", {"outcome": o})
        for o in ("installed", "dropped", "failed")
    }


def test_a_factor_is_factored_in_its_thread_and_installed_after_a_later_step():
    model = _model()
    reg = CollectorRegistry()
    refactors = BackgroundRefactor(ServiceMetrics(reg))
    assert _counted(reg) == {"installed": 0, "dropped": 0, "failed": 0}
    refactors.after_step(model)  # nothing asked: nothing started
    assert refactors._pending is None
    _ask(model)
    old = model._epoch.solver.factor
    model.remove([3])
    refactors.after_step(model)
    assert refactors._pending is not None
    assert any(t.name == "certremove-refactor" for t in threading.enumerate())
    _settle(refactors)
    model.remove([4])  # a step meanwhile, on the old factor
    assert model._epoch.solver.factor is old
    refactors.after_step(model)  # installs it
    fresh = model._epoch.solver
    assert refactors.installed == 1 and refactors.dropped == 0
    assert _counted(reg) == {"installed": 1, "dropped": 0, "failed": 0}
    assert fresh.factor is not old and not fresh.refactor and fresh.iterations == 0
    assert refactors._pending is None  # and asks for no other
    for row in range(5, 15):
        assert model.remove([row]).applied
    assert model._epoch.solver.factor is fresh.factor


def test_a_factor_for_an_epoch_gone_is_dropped_and_the_next_one_is_asked_for():
    model = _model()
    reg = CollectorRegistry()
    refactors = BackgroundRefactor(ServiceMetrics(reg))
    _ask(model)
    model.remove([3])
    refactors.after_step(model)
    _settle(refactors)
    model.retrain()  # another epoch: its own fit's factor
    fitted = model._epoch.solver.factor
    _ask(model)  # which asks for a refactor too
    refactors.after_step(model)
    assert refactors.dropped == 1 and refactors.installed == 0
    assert model._epoch.solver.factor is fitted
    assert refactors._pending is not None  # the new epoch's job
    _settle(refactors)
    refactors.after_step(model)
    assert refactors.installed == 1 and model._epoch.solver.factor is not fitted
    assert _counted(reg) == {"installed": 1, "dropped": 1, "failed": 0}


def test_a_failed_factorisation_is_logged_and_the_steps_go_on(monkeypatch, caplog):
    model = _model()
    reg = CollectorRegistry()
    refactors = BackgroundRefactor(ServiceMetrics(reg))
    _ask(model)

    def broken(self):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(core.epoch.FactorJob, "run", broken)
    refactors.after_step(model)
    _settle_failed(refactors)
    cache = model._epoch.solver
    with caplog.at_level(logging.ERROR, logger="certremove.worker"):
        refactors.after_step(model)  # never raises
    assert "background refactor failed" in caplog.text
    assert refactors.dropped == 1 and model._epoch.solver is cache
    assert _counted(reg) == {"installed": 0, "dropped": 0, "failed": 1}
    assert model.remove([3]).applied  # CG on the old factor, or a direct step: served
    # and a model that cannot even say what to factor: logged, no exception
    monkeypatch.setattr(core.Model, "refactor_job", lambda self: 1 / 0)
    refactors._pending = None
    with caplog.at_level(logging.ERROR, logger="certremove.worker"):
        refactors.after_step(model)
    assert refactors._pending is None


def _settle_failed(refactors: BackgroundRefactor) -> None:
    pending = refactors._pending
    assert pending is not None
    deadline = time.monotonic() + 30
    while not pending[1].done():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pending[1].exception() is not None


def test_close_drops_the_factorisation_in_flight():
    model = _model()
    refactors = BackgroundRefactor()
    _ask(model)
    refactors.after_step(model)
    refactors.close()
    assert refactors._pending is None
    refactors.after_step(model)  # asks again: the cache still wants a refactor
    assert refactors._pending is not None
    _settle(refactors)


@pytest.mark.parametrize(("raw", "want"), [(None, True), ("1", True), ("off", False)])
def test_the_setting_reaches_the_served_model(tmp_path: Path, raw, want) -> None:
    from worker.cli import train_model  # noqa: PLC0415
    from worker.runtime import load_model  # noqa: PLC0415
    from worker.settings import SettingsError  # noqa: PLC0415

    train_model("digits", tmp_path / "s", overwrite=True, device="cpu")
    env = {} if raw is None else {"CERTREMOVE_BACKGROUND_REFACTOR": raw}
    s = Settings.from_env(env, state_dir=tmp_path / "s")
    assert s.background_refactor is want and Settings.from_env(s.to_env()) == s
    assert load_model(s).solve_options.defer_refactor is want
    with pytest.raises(SettingsError, match="CERTREMOVE_BACKGROUND_REFACTOR"):
        Settings.from_env({"CERTREMOVE_BACKGROUND_REFACTOR": "sometimes"})


def test_an_epoch_whose_factorisation_failed_is_not_tried_again(monkeypatch):
    model = _model()
    refactors = BackgroundRefactor()
    _ask(model)
    monkeypatch.setattr(core.epoch.FactorJob, "run", lambda self: None)  # not factorable
    refactors.after_step(model)
    _settle(refactors)
    refactors.after_step(model)
    assert refactors.dropped == 1 and refactors._pending is None  # not asked again ...
    model.remove([3])
    refactors.after_step(model)
    assert refactors._pending is None
    model.retrain()  # ... until another epoch asks
    _ask(model)
    monkeypatch.undo()
    refactors.after_step(model)
    _settle(refactors)
    refactors.after_step(model)
    assert refactors.installed == 1


def test_the_drain_factors_in_the_background_and_installs_after_a_later_step(
    state: Path, broker_url: str, rclient, model_name: str
) -> None:
    """Through the service: a drain's step that asks for a refactor starts one, a later drain's
    step installs it, and closing the service drops one in flight. (CG forced, and asking for a
    refactor past one iteration: on this tiny model the cost model would solve directly.)"""
    from producer import Client  # noqa: PLC0415
    from tests.worker.test_service import build  # noqa: PLC0415

    service, _, reg = build(state, rclient, model_name)
    model = service.model
    model.solve_options = SolveOptions("iterative", refactor_iterations=1, defer_refactor=True)
    refactors = service.steps.refactors
    client = Client(broker_url, model=model_name)

    def drain(rows: range) -> None:
        client.enqueue_many([[i] for i in rows])
        assert service.drain().steps == 1

    drain(range(40, 45))  # a loaded model's first step: direct, its factor kept
    assert refactors._pending is None
    old = model._epoch.solver.factor
    drain(range(0, 10))  # CG on it asks for a refactor: started in the background
    assert model._epoch.solver.refactor and model._epoch.solver.factor is old
    assert refactors._pending is not None
    _settle(refactors)
    drain(range(10, 20))  # CG on the old factor again, then the new one installed
    assert refactors.installed == 1 and refactors.dropped == 0
    assert _counted(reg) == {"installed": 1, "dropped": 0, "failed": 0}  # the service's metrics
    assert model._epoch.solver.factor is not old
    drain(range(20, 30))  # which asks again (past one iteration): in flight ...
    assert refactors._pending is not None
    service.close()  # ... and dropped with the service's background work
    assert refactors._pending is None
