"""The audit's membership tests (see :mod:`worker.audit`): the two-sample test of the removed
rows' losses under two models, and the across-draws test of one model's mean loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def two_sample(a: np.ndarray, b: np.ndarray, level: float) -> dict[str, Any]:
    from scipy.stats import ks_2samp, mannwhitneyu  # noqa: PLC0415

    if len(a) == 0 or len(b) == 0:
        return {"mannwhitney_p": None, "ks_p": None, "distinguishable": None}
    mw = mannwhitneyu(a, b, alternative="two-sided")
    ks = ks_2samp(a, b)
    return {
        "mannwhitney_u": float(mw.statistic),
        "mannwhitney_p": float(mw.pvalue),
        "ks_statistic": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "distinguishable": bool(mw.pvalue < level),
    }


def loss_summary(fig: dict[str, np.ndarray]) -> dict[str, Any]:
    loss, p = fig["loss"], fig["p_true"]
    if len(loss) == 0:
        return {}
    return {
        "loss_mean": float(loss.mean()),
        "loss_median": float(np.median(loss)),
        "p_true_mean": float(p.mean()),
        "share_p_true_over_half": float((p > 0.5).mean()),
    }


def across_draws(value: float, null: np.ndarray, level: float) -> dict[str, Any]:
    """Is ``value`` (one model's mean loss on the sampled removed rows) a plausible member of
    ``null`` (the same figure under retrains with independent draws)? A two-sided prediction
    interval test on the logarithm (a mean loss is positive and skewed where the loss is near
    0): ``t = (log value - m) / (s sqrt(1 + 1/R))``, ``m``, ``s`` the mean and sd of the
    retrains' logs, ``R - 1`` degrees of freedom. ``band`` is the interval that holds a further
    retrain's value with probability ``1 - level``, in loss units."""
    from scipy.stats import t as student  # noqa: PLC0415

    r = len(null)
    logs = np.log(np.maximum(null, 1e-300))
    mean, sd = float(logs.mean()), float(logs.std(ddof=1))
    scale = sd * math.sqrt(1 + 1 / r)
    x = math.log(max(value, 1e-300))
    if scale <= 0:
        stat = 0.0 if x == mean else math.inf
    else:
        stat = (x - mean) / scale
    p = float(2 * student.sf(abs(stat), r - 1)) if math.isfinite(stat) else 0.0
    half = float(student.ppf(1 - level / 2, r - 1)) * scale
    return {
        "value": value,
        "retrains_mean": float(null.mean()),
        "retrains_sd": float(null.std(ddof=1)),
        "t": stat if math.isfinite(stat) else None,
        "p": p,
        "band": [math.exp(mean - half), math.exp(mean + half)],
        "distinguishable": bool(p < level),
    }
