"""Privacy calibration: the residual budget ``sigma * epsilon / c`` and its analytic variant.

Pure functions (math/scipy only). The stateful bookkeeping lives in ``core.accountant``.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.stats import norm

from core.errors import InvalidInputError

CALIBRATIONS = ("classical", "analytic")


def classical_c(delta: float) -> float:
    """``c = sqrt(2 ln(1.5 / delta))`` of the Gaussian mechanism (Guo et al. 2020, Thm 3).

    The paper's Gaussian noise theorem: ``b ~ N(0, sigma^2 I)`` with ``sigma = c eps'/epsilon``
    gives (epsilon, delta)-certified removal for gradient residuals up to ``eps'``.
    """
    return math.sqrt(2.0 * math.log(1.5 / delta))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact privacy profile of N(0, 1) vs N(mu, 1) (Balle & Wang 2018, Thm 8)."""
    return float(
        norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon) * norm.cdf(-mu / 2 - epsilon / mu)
    )


def analytic_mu(epsilon: float, delta: float) -> float:
    """Largest shift ``mu`` (in units of sigma) whose exact profile stays within ``delta``.

    Analytic Gaussian mechanism (Balle & Wang 2018, Alg. 1). Deviation: leaves no margin for the
    dependence of the residual on ``b`` (docs/theory.md "What is certified"), hence opt-in only.
    """
    lo, hi = 1e-9, 1.0
    while gaussian_delta(hi, epsilon) <= delta:
        hi *= 2.0
        if hi > 1e6:  # pragma: no cover - absurd parameters
            raise InvalidInputError(f"no finite calibration for epsilon={epsilon}, delta={delta}")
    mu = brentq(lambda m: gaussian_delta(m, epsilon) - delta, lo, hi, xtol=1e-14, rtol=1e-14)
    # brentq's root can sit a hair above the boundary: step down until the profile holds.
    while gaussian_delta(mu, epsilon) > delta:
        mu *= 1 - 1e-12
    return mu


def validate_privacy(sigma: float, epsilon: float, delta: float, calibration: str) -> None:
    """Reject parameters outside the range where the chosen calibration is sound."""
    if calibration not in CALIBRATIONS:
        raise InvalidInputError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise InvalidInputError(f"sigma must be a finite number >= 0, got {sigma}")
    if not (0 < delta < 1):
        raise InvalidInputError(f"delta must lie in (0, 1), got {delta}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidInputError(f"epsilon must be > 0, got {epsilon}")
    if calibration == "classical" and epsilon > 1:
        raise InvalidInputError(
            f"epsilon={epsilon} > 1: the classical calibration sigma*epsilon/sqrt(2 ln(1.5/delta)) "
            "is only proven for epsilon <= 1 (and unsound above about 8); "
            'use calibration="analytic" for larger epsilon'
        )


def budget_total(
    sigma: float, epsilon: float, delta: float, calibration: str = "classical"
) -> float:
    """The residual budget ``eps'`` the noise covers: ``sigma*epsilon/c`` or ``mu*sigma``."""
    validate_privacy(sigma, epsilon, delta, calibration)
    if calibration == "analytic":
        return analytic_mu(epsilon, delta) * sigma
    return sigma * epsilon / classical_c(delta)
