"""``certremove audit``: look at what a removal left behind, offline (operator only).

The certificate says: after the removals, the released model is as close to a model retrained
from scratch without the removed rows as two such retrains (independent noise draws) are to each
other. This module measures that for the current model of a state directory (or for a release
written under ``<state_dir>/releases/<model>/NNNNNNNN/``, or for a model in memory):

- **Distances.** It retrains from scratch on the model's remaining rows (every row the removal
  ledger names is excluded) with the same hyper-parameters: once unperturbed (``b = 0``) and
  ``draws`` times (10) with fresh, independent noise. It reports ``||W_released - W_draw_i||``
  per class and in total (Frobenius; mean over the draws) against the spread of two retrains
  ``||W_draw_i - W_draw_j||`` (mean over the pairs), and against the spread the linearised noise
  predicts, ``E||H^-1 (b_1 - b_2)||`` with ``H`` the Hessian of the unperturbed retrain
  (``sqrt(2) sigma sqrt(sum_k tr H_k^-2)``, with its relative standard deviation). The released
  weights pass within ``max(observed, predicted spread) (1 + 3 rel_sd) + budget_used / (lam n')``
  (the last term is the most the certified residual ``U`` can move the minimiser:
  ``||H^-1 U|| <= ||U|| / (lam n')``).
- **Membership.** For a sample of ``sample`` removed rows, the row's one-vs-rest loss
  ``sum_k log(1 + exp(-y_k w_k.x))`` and the predicted probability of its true label
  (``sigmoid`` of the true class's margin) under (1) the released model, (2) a retrain with a
  fresh draw, (3) the model before removal, counterfactually: retrained from scratch on the
  remaining rows plus the removed ones, same hyper-parameters, its own fresh draw (the first
  snapshot is usually pruned). Two tests at ``level`` (0.01), each of (1) and (3) against
  retrains: the two-sided Mann-Whitney U test (unpaired; KS alongside) against the retrain with
  draw 1, and the **across-draws** test, which decides: the sampled rows' mean loss under the
  model against its values under the ``draws`` retrains (a two-sided prediction-interval t
  test). Rows removed together share each draw's effect (a class emptied by the removal has a
  column of pure noise), so two honest retrains can differ systematically on them and the
  two-sample test over-rejects; the report gives the share of retrain pairs it tells apart.
  Expected: (1) is not distinguishable; (3) is for a removal that leaves a mark (a whole class
  or cluster); many scattered rows usually are not, and then the membership test has little
  power on this removal (the report says so).
- **Residual.** The certificate promises that the released weights exactly minimise
  ``L_{b-U}`` on the remaining rows with ``||U||_F <= budget_used <= budget_total``. ``b`` never
  reaches the disk, so offline the audit checks what it can independently, in float64:
  ``U`` changes between two snapshots of one noise epoch (one model version) by exactly
  ``grad L_0(W_1; D_1) - grad L_0(W_0; D_0)`` (the ``b`` terms cancel), so the budget used
  recorded at the oldest kept snapshot of the epoch plus that norm is an upper bound on
  ``||U||`` recomputed from the files alone, which must stay within the budget; and
  ``-grad L_0(W; D') = b - U`` must look like a draw of ``N(0, sigma^2 I)`` (its norm against
  ``sigma sqrt(dK)``, a KS test of its coordinates): a model released without its noise fails
  it. For a model in memory (``b`` still there) it computes ``||U||_F = ||grad L_b(W; D')||_F``
  itself and compares it with the budget used.

**Internal only.** The distances, the removed rows' losses, the residual figures and the budget
depend on the secret noise draw (docs/design.md "Secrets and limits"): keep the report with the
state directory, never publish it. It holds no sample id and never the noise. The audit's own
draws are not secret (``seed`` makes them reproducible) and are never released.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.audit_base import (
    DEFAULT_DRAWS,
    DEFAULT_SAMPLE,
    FORMATS,
    LEVEL,
    NOTICE,
    RELEASES,
    SPREAD_SDS,
    AuditError,
    Target,
    check_numbers,
    check_outs,
)
from worker.audit_fits import (
    accuracy,
    fit,
    grad0,
    noise_check,
    norms,
    row_figures,
    spread_prediction,
)
from worker.audit_membership import across_draws, loss_summary, two_sample
from worker.audit_output import draw_png, summary_lines, write_json
from worker.audit_targets import (
    release_dirs,
    target_from_model,
    target_from_release,
    target_from_state,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_DRAWS",
    "DEFAULT_SAMPLE",
    "FORMATS",
    "LEVEL",
    "NOTICE",
    "RELEASES",
    "SPREAD_SDS",
    "AuditError",
    "Target",
    "audit",
    "check_numbers",
    "check_outs",
    "draw_png",
    "release_dirs",
    "run_audit",
    "summary_lines",
    "target_from_model",
    "target_from_release",
    "target_from_state",
    "write_json",
]


def run_audit(
    target: Target,
    *,
    sample: int = DEFAULT_SAMPLE,
    draws: int = DEFAULT_DRAWS,
    seed: int | None = None,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Audit ``target`` (see the module docstring); return every figure as JSON-able data.

    Raises:
        AuditError: nothing removed yet (1), a bad ``sample``, ``draws`` or ``level`` (2).
    """
    import torch  # noqa: PLC0415

    from core.loss import frobenius  # noqa: PLC0415
    from core.noise import draw_noise  # noqa: PLC0415

    check_numbers(sample, draws, level)
    removed = target.removed_rows
    if len(removed) == 0:
        raise AuditError(f"no rows removed yet in {target.label}: nothing to audit", 1)
    started = time.monotonic()
    p, h = target.problem, target.hyper
    shape = (p.X.shape[1], p.Y.shape[1])
    seeds = np.random.SeedSequence(seed).spawn(draws + 2)
    rng = np.random.default_rng(seeds[-1])

    def draw(i: int) -> torch.Tensor:
        return draw_noise(shape, h.sigma, np.random.default_rng(seeds[i]), p.X.device)

    alive = target.alive
    before_alive = alive.clone()
    before_alive[torch.as_tensor(removed, dtype=torch.long, device=alive.device)] = True
    W = target.W
    zero = torch.zeros(shape, dtype=torch.float64, device=p.X.device)
    fits: dict[str, Any] = {}
    W0, fits["unperturbed"] = fit(p, alive, zero, W, target.budget_total)
    Ws = []
    for i in range(draws):
        Wi, fits[f"draw_{i + 1}"] = fit(p, alive, draw(i), W0, target.budget_total)
        Ws.append(Wi)
    Wb, fits["before_removal"] = fit(p, before_alive, draw(draws), W0, target.budget_total)

    # distances
    predicted = spread_prediction(p, alive, W0, h.sigma)
    n_alive = float(alive.sum())
    shift = (target.budget_used or target.budget_total) / (h.lam * n_alive)
    pairs = [norms(Ws[i], Ws[j]) for i in range(draws) for j in range(i + 1, draws)]
    pair_totals = np.array([x["total"] for x in pairs])
    observed = {
        "per_class": [float(np.mean([x["per_class"][k] for x in pairs])) for k in range(shape[1])],
        "total": float(pair_totals.mean()),
        "min": float(pair_totals.min()),
        "max": float(pair_totals.max()),
        "pairs": len(pairs),
    }
    reference = max(observed["total"], predicted["total"])
    allowed = reference * (1 + SPREAD_SDS * predicted["rel_sd"]) + shift
    to_draws = [norms(W, Wi) for Wi in Ws]
    released_mean = {
        "per_class": [
            float(np.mean([x["per_class"][k] for x in to_draws])) for k in range(shape[1])
        ],
        "total": float(np.mean([x["total"] for x in to_draws])),
        "max": float(max(x["total"] for x in to_draws)),
    }
    distances: dict[str, Any] = {
        "released_vs_draws": released_mean,
        "released_vs_each_draw": [x["total"] for x in to_draws],
        "draw_spread": observed,
        "predicted_spread": predicted,
        "released_vs_unperturbed": norms(W, W0),
        "draws_vs_unperturbed": float(np.mean([norms(Wi, W0)["total"] for Wi in Ws])),
        "before_removal_vs_draws": {
            "per_class": [
                float(np.mean([norms(Wb, Wi)["per_class"][k] for Wi in Ws]))
                for k in range(shape[1])
            ],
            "total": float(np.mean([norms(Wb, Wi)["total"] for Wi in Ws])),
        },
        "residual_shift_bound": shift,
        "allowed": allowed,
        "ratio_to_spread": released_mean["total"] / reference if reference > 0 else None,
        "within_spread": bool(released_mean["total"] <= allowed),
    }

    # membership
    n = min(int(sample), len(removed))
    rows = np.sort(rng.choice(removed, size=n, replace=False))
    figs = {
        "released": row_figures(p, W, rows),
        "retrained": row_figures(p, Ws[0], rows),
        "before_removal": row_figures(p, Wb, rows),
    }
    others = [row_figures(p, Wi, rows)["loss"] for Wi in Ws[1:]]
    rel_vs_re = two_sample(figs["released"]["loss"], figs["retrained"]["loss"], level)
    before_vs_re = two_sample(figs["before_removal"]["loss"], figs["retrained"]["loss"], level)
    null_ref = two_sample(others[0], figs["retrained"]["loss"], level)
    # how often the same two-sample test tells two honest retrains apart on these rows
    all_losses = [figs["retrained"]["loss"], *others]
    pair_p = [
        two_sample(all_losses[i], all_losses[j], level)["mannwhitney_p"]
        for i in range(len(all_losses))
        for j in range(i + 1, len(all_losses))
    ]
    means = np.array([float(x.mean()) for x in all_losses])
    membership: dict[str, Any] = {
        "sample": n,
        "removed_rows": int(len(removed)),
        "level": level,
        "draws": draws,
        "test": (
            "two-sided Mann-Whitney U on the sampled removed rows' losses (unpaired; KS "
            "alongside), each model against the retrain with draw 1"
        ),
        "released_vs_retrained": rel_vs_re,
        "before_removal_vs_retrained": before_vs_re,
        "retrained_vs_retrained": null_ref,
        "retrain_pairs_distinguishable": float(np.mean([q < level for q in pair_p])),
        "across_draws_test": (
            "the mean loss of the sampled removed rows under one model against its values "
            f"under the {draws} retrains (two-sided prediction-interval t test on its "
            "logarithm): it accounts for the draw-to-draw variation the two-sample test "
            "cannot see"
        ),
        "retrain_mean_losses": [float(x) for x in means],
        "released_across_draws": across_draws(float(figs["released"]["loss"].mean()), means, level),
        "before_removal_across_draws": across_draws(
            float(figs["before_removal"]["loss"].mean()), means, level
        ),
        "summary": {k: loss_summary(v) for k, v in figs.items()},
        "losses": {k: [round(float(x), 6) for x in v["loss"]] for k, v in figs.items()},
        "p_true": {k: [round(float(x), 6) for x in v["p_true"]] for k, v in figs.items()},
    }
    # the calibrated test decides (the two-sample test over-rejects for correlated rows)
    membership["has_power"] = bool(membership["before_removal_across_draws"]["distinguishable"])
    W1 = Ws[0]

    # residual
    g0 = grad0(p, W, alive)
    used = target.budget_used
    residual: dict[str, Any] = {
        "accounting": h.accounting,
        "budget_total": target.budget_total,
        "budget_used": used,
        "budget_used_ratio": None if used is None else used / target.budget_total,
        "within_budget": None if used is None else bool(used <= target.budget_total),
        "epoch_check": target.epoch_check,
        "implied_noise": noise_check(target, g0),
        "true_residual": None,
        "true_residual_note": "b is never on disk: computed for a model in memory only",
    }
    if target.noise is not None:
        true = frobenius(g0 + target.noise.to(g0))
        residual["true_residual"] = true
        residual["true_residual_note"] = "||grad L_b(W; D')||_F in float64, b from memory"
        residual["true_residual_within_budget_used"] = bool(used is None or true <= used)

    verdict: dict[str, Any] = {
        "distance_within_spread": distances["within_spread"],
        "released_indistinguishable_from_retrained": not membership["released_across_draws"][
            "distinguishable"
        ],
        "released_two_sample_distinguishable": rel_vs_re["distinguishable"],
        "before_removal_distinguishable": membership["has_power"],
        "budget_respected": residual["within_budget"],
        "independent_bound_within_budget": (target.epoch_check or {}).get("within_budget"),
        "noise_consistent": residual["implied_noise"].get("consistent"),
    }
    if target.noise is not None:
        verdict["true_residual_within_budget_used"] = residual["true_residual_within_budget_used"]
    verdict["pass"] = bool(
        verdict["distance_within_spread"]
        and verdict["released_indistinguishable_from_retrained"]
        and verdict["budget_respected"] is not False
        and verdict["independent_bound_within_budget"] is not False
        and verdict["noise_consistent"] is not False
        and verdict.get("true_residual_within_budget_used") is not False
    )
    return {
        "notice": NOTICE,
        "internal_only": True,
        "target": {
            "source": target.source,
            "label": target.label,
            "version": target.version,
            "certified": target.certified,
            "rows": int(alive.numel()),
            "rows_alive": int(n_alive),
            "rows_removed": int(len(removed)),
            "features": int(shape[0]),
            "classes": target.classes,
            "binary": target.binary,
            "lam": h.lam,
            "sigma": h.sigma,
            "epsilon": h.epsilon,
            "delta": h.delta,
            "ledger": target.ledger,
            **target.extra,
        },
        "seed": seed,
        "fit_residuals": fits,
        "test_accuracy": {
            "released": accuracy(target, W),
            "unperturbed": accuracy(target, W0),
            "retrained": accuracy(target, W1),
            "before_removal": accuracy(target, Wb),
        },
        "distances": distances,
        "membership": membership,
        "residual": residual,
        "verdict": verdict,
        "seconds": round(time.monotonic() - started, 3),
    }


def audit(
    state_dir: Path,
    *,
    release: int | None = None,
    model: str | None = None,
    release_dir: Path | None = None,
    sample: int = DEFAULT_SAMPLE,
    draws: int = DEFAULT_DRAWS,
    seed: int | None = None,
    level: float = LEVEL,
    outs: Sequence[Path] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """Audit the current model of ``state_dir`` (or release ``release``) and write ``outs``
    (.json: every figure; .png: the picture). Returns the report.

    Raises:
        AuditError: see :func:`check_outs`, the ``target_from_*`` functions and
            :func:`run_audit`.
    """
    check_outs(outs)
    check_numbers(sample, draws, level)
    if release is None:
        target = target_from_state(state_dir, device=device)
    else:
        target = target_from_release(
            state_dir, release, model=model, release_dir=release_dir, device=device
        )
    report = run_audit(target, sample=sample, draws=draws, seed=seed, level=level)
    for out in outs:
        if FORMATS[Path(out).suffix.lower()] == "json":
            write_json(report, out)
        else:
            draw_png(report, out)
    return report
