"""Group privacy of a DP feature extractor, and the removals it allows (pure functions).

A linear head trained on features from an ``(eps_dp, delta_dp)``-DP extractor carries its own
removal certificate ``(eps, delta)`` for every fixed extractor (Guo et al. 2020, Thm 1 and the
paper's §4.3 on DP feature extractors). Removing ``k`` rows also changes the extractor's
training set in ``k`` rows, which the extractor hides only up to group privacy; composing the
two gives the pipeline's guarantee (docs/theory.md "The DP feature extractor: group privacy").
``k`` counts rows, not requests.

Numbers only (``math``); the worker calls these for ``certremove_extractor_removals_remaining``.
"""

from __future__ import annotations

import math

from core.errors import InvalidInputError

__all__ = [
    "combined_guarantee",
    "extractor_removals_allowed",
    "extractor_removals_remaining",
    "group_privacy",
]

# Relative slack when comparing a computed term with an operator's limit, so that 3 * 0.1
# (= 0.30000000000000004) counts as within a limit of 0.3. It moves the limit by 1e-12 of itself.
_REL_TOL = 1e-12


def _check(eps_dp: float, delta_dp: float) -> None:
    if not (math.isfinite(eps_dp) and eps_dp > 0):
        raise InvalidInputError(f"eps_dp must be finite and > 0, got {eps_dp}")
    if not (0 <= delta_dp < 1):
        raise InvalidInputError(f"delta_dp must be in [0, 1), got {delta_dp}")


def group_privacy(
    eps_dp: float, delta_dp: float, k: int, *, tight: bool = False
) -> tuple[float, float]:
    """Group privacy: an (eps, delta)-DP mechanism is (k eps, k e^((k-1) eps) delta)-DP for k rows.

    Chain the DP inequality along ``k`` neighbouring datasets ``D_0 .. D_k``:
    ``P[M(D_0) in S] <= e^(k eps) P[M(D_k) in S] + delta * sum_{j<k} e^(j eps)`` (Dwork & Roth
    2014, §2.3, Theorem 2.2 for ``delta = 0``; the same induction with ``delta > 0``). The sum is
    at most ``k e^((k-1) eps)``: the form docs/theory.md uses.

    Args:
        eps_dp, delta_dp: the mechanism's guarantee for one row.
        k: rows that differ (``k >= 0``; ``k = 0`` gives ``(0, 0)``).
        tight: return the geometric sum ``delta (e^(k eps) - 1) / (e^eps - 1)`` instead of the
            contract's ``k e^((k-1) eps) delta`` (never larger; equal for ``k <= 1``).

    Returns:
        ``(eps_k, delta_k)``; ``delta_k`` may exceed 1 (then the statement is vacuous).
    """
    _check(eps_dp, delta_dp)
    if k < 0:
        raise InvalidInputError(f"k must be >= 0, got {k}")
    if k == 0:
        return 0.0, 0.0
    if delta_dp == 0:
        return k * eps_dp, 0.0
    if tight:
        # expm1 keeps the ratio accurate for small eps; overflow -> inf (vacuous, and honest).
        try:
            return k * eps_dp, delta_dp * math.expm1(k * eps_dp) / math.expm1(eps_dp)
        except OverflowError:
            return k * eps_dp, math.inf
    log_delta = math.log(k) + (k - 1) * eps_dp + math.log(delta_dp)
    return k * eps_dp, math.exp(log_delta) if log_delta < 700 else math.inf


def combined_guarantee(
    eps: float, delta: float, eps_dp: float, delta_dp: float, k: int
) -> tuple[float, float]:
    """Pipeline after ``k`` removed rows: ``(eps + k eps_dp, delta + k e^((k-1) eps_dp) delta_dp)``.

    Basic composition (Dwork & Roth 2014, Theorem 3.16) of the head's removal certificate
    ``(eps, delta)``, which holds for every fixed extractor, with the extractor's group privacy
    for ``k`` rows (:func:`group_privacy`). See docs/theory.md "The DP feature extractor".
    """
    eps_k, delta_k = group_privacy(eps_dp, delta_dp, k)
    return eps + eps_k, delta + delta_k


def extractor_removals_allowed(
    eps_dp: float, delta_dp: float, *, eps_extra_max: float, delta_extra_max: float
) -> int:
    """The largest ``k`` with ``k eps_dp <= eps_extra_max`` and ``k e^((k-1) eps_dp) delta_dp <=
    delta_extra_max``: the rows that may be removed before the extractor must be retrained.

    Both terms grow with ``k`` (:func:`group_privacy`), so the answer is a threshold: the
    epsilon limit gives ``floor(eps_extra_max / eps_dp)`` and a bisection on the log of the
    delta term finds the delta limit. ``eps_extra_max``, ``delta_extra_max``: the extra privacy
    loss the operator accepts on top of the head's certificate.

    Returns:
        ``k >= 0`` (0: not even one row may be removed without retraining the extractor).
    """
    _check(eps_dp, delta_dp)
    if not (eps_extra_max >= 0 and delta_extra_max >= 0):
        raise InvalidInputError("eps_extra_max and delta_extra_max must be >= 0")
    if math.isinf(eps_extra_max):
        raise InvalidInputError("eps_extra_max must be finite")
    k_eps = int(math.floor(eps_extra_max / eps_dp)) + 1
    while k_eps > 0 and k_eps * eps_dp > eps_extra_max * (1 + _REL_TOL):
        k_eps -= 1  # floor() can be one high or low after rounding: settle on the exact test
    if delta_dp == 0 or k_eps == 0:
        return k_eps
    if delta_extra_max == 0:
        return 0
    log_limit = math.log(delta_extra_max) + math.log1p(_REL_TOL)

    def delta_ok(k: int) -> bool:
        return math.log(k) + (k - 1) * eps_dp + math.log(delta_dp) <= log_limit

    if delta_ok(k_eps):
        return k_eps
    lo, hi = 0, k_eps  # invariant: delta_ok(lo) (vacuous for 0), not delta_ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if delta_ok(mid) else (lo, mid)
    return lo


def extractor_removals_remaining(
    eps_dp: float,
    delta_dp: float,
    removed: int,
    *,
    eps_extra_max: float,
    delta_extra_max: float,
) -> int:
    """Rows that may still be removed after ``removed`` rows since the extractor was trained.

    ``removed`` counts every row removed from the head since the extractor's training, across
    head retrains (a head retrain does not refresh the extractor). Never negative.
    """
    if removed < 0:
        raise InvalidInputError(f"removed must be >= 0, got {removed}")
    allowed = extractor_removals_allowed(
        eps_dp, delta_dp, eps_extra_max=eps_extra_max, delta_extra_max=delta_extra_max
    )
    return max(allowed - removed, 0)
