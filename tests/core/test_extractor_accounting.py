"""A model whose rows come from a DP extractor: removals are capped by the extractor's group
privacy, across head retrains, and the combined guarantee is reported."""

from __future__ import annotations

import math

import pytest

import core
from core.group_privacy import extractor_removals_allowed


@pytest.fixture
def model(digits):
    return core.train(
        digits.X_train,
        digits.y_train,
        ids=digits.ids_train,  # saved with digits below: the ids must be the dataset's
        lam=1e-2,
        sigma=1.0,
        max_removals=None,
        extractor_dp=(0.1, 1e-6),
        extractor_limit=(1.0, 1e-4),
    )


def test_extractor_caps_removals_across_head_retrains(tmp_path, digits, model):
    allowed = extractor_removals_allowed(0.1, 1e-6, eps_extra_max=1.0, delta_extra_max=1e-4)
    assert allowed == 10 and model.extractor_removals_remaining == 10
    res = model.remove(list(range(6)), groups=[3, 3])
    assert res.applied and model.extractor_removals_remaining == 4
    res = model.remove(list(range(6, 12)), groups=[3, 3])
    assert (
        res.applied_groups == 1 and res.retrain_reason == "extractor" and res.pending == [9, 10, 11]
    )
    assert model.extractor_removals_remaining == 1
    eps, delta = model.guarantee()
    assert math.isclose(eps, 1.0 + 9 * 0.1) and math.isclose(
        delta, 1e-4 + 9 * math.exp(8 * 0.1) * 1e-6
    )
    with pytest.raises(ValueError, match="full-pipeline retrain"):
        model.retrain(exclude=res.pending)  # a head retrain cannot forget what the extractor saw
    model.retrain(exclude=[9])  # one row still fits
    assert model.extractor_removals_remaining == 0 and model.version == 2
    model.save(tmp_path, dataset=digits)
    loaded = core.load_model(tmp_path)
    assert loaded.extractor_removed == 10 and loaded.extractor_removals_remaining == 0
    res = loaded.remove([20])
    assert res.needs_retrain and res.retrain_reason == "extractor" and res.removed == []


def test_models_without_extractor_report_the_head_guarantee(digits):
    m = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    assert m.extractor_removals_remaining is None and m.guarantee() == (1.0, 1e-4)


def test_extractor_limit_is_reported_when_both_limits_bind(digits):
    m = core.train(
        digits.X_train,
        digits.y_train,
        lam=1e-2,
        sigma=1.0,
        max_removals=5,
        extractor_dp=(0.1, 1e-6),
        extractor_limit=(1.0, 1e-4),
    )
    res = m.remove(list(range(12)), groups=[4, 8])
    assert res.applied_groups == 1 and res.retrain_reason == "extractor"
