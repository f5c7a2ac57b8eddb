"""What the audit writes (see :mod:`worker.audit`): the JSON report, a few human lines, and the
PNG picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.audit_base import NOTICE, AuditError


def write_json(report: dict[str, Any], out: Path) -> None:
    try:
        Path(out).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot write {out}: {exc}") from exc


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines of a report."""
    t, d, m, r, v = (
        report["target"],
        report["distances"],
        report["membership"],
        report["residual"],
        report["verdict"],
    )
    rel, bef = m["released_vs_retrained"], m["before_removal_vs_retrained"]
    rel_x, bef_x = m["released_across_draws"], m["before_removal_across_draws"]

    def said(test: dict[str, Any]) -> str:
        return "distinguishable" if test["distinguishable"] else "not distinguishable"

    lines = [
        f"audit of {t['label']} (version {t['version']}): {t['rows_removed']} rows removed, "
        f"{t['rows_alive']} remaining; {m['draws']} retrains with fresh noise",
        f"distance released-retrained {d['released_vs_draws']['total']:.4g} (mean over the "
        f"draws) against two retrains' spread {d['draw_spread']['total']:.4g} (predicted "
        f"{d['predicted_spread']['total']:.4g}, allowed {d['allowed']:.4g}): "
        + ("within" if d["within_spread"] else "OUTSIDE"),
        f"membership, {m['sample']} removed rows at level {m['level']:g}: released vs retrained "
        f"Mann-Whitney p {rel['mannwhitney_p']:.3g} ({said(rel)}), across draws p "
        f"{rel_x['p']:.3g} ({said(rel_x)}); before removal vs retrained p "
        f"{bef['mannwhitney_p']:.3g} ({said(bef)}), across draws p {bef_x['p']:.3g} "
        f"({said(bef_x)}); two honest retrains told apart by Mann-Whitney in "
        f"{m['retrain_pairs_distinguishable']:.0%} of pairs",
    ]
    if not m["has_power"]:
        lines.append(
            "  (the model before removal is not distinguishable either: the membership test "
            "has little power on this removal)"
        )
    used = r["budget_used"]
    line = "residual: budget used " + ("unknown" if used is None else f"{used:.4g}")
    line += f" of {r['budget_total']:.4g}"
    ec = r.get("epoch_check") or {}
    if ec.get("available"):
        line += (
            f"; independent bound from snapshot {ec['from_snapshot']} "
            f"{ec['independent_bound']:.4g} ("
            + ("within the budget" if ec["within_budget"] else "OVER THE BUDGET")
            + ")"
        )
    if r.get("true_residual") is not None:
        line += f"; true residual {r['true_residual']:.4g}"
    n = r["implied_noise"]
    if n.get("ratio") is not None:
        line += f"; implied noise norm {n['ratio']:.3f} x sigma sqrt(dK)"
    lines.append(line)
    lines.append(f"verdict: {'pass' if v['pass'] else 'FAIL'}. {NOTICE}")
    return lines


def draw_png(report: dict[str, Any], out: Path) -> None:
    """Histograms of the removed rows' losses under the three models, their mean loss against
    the retrains', the distances against the spread of two retrains, and the residual against
    the budget, in one image."""
    import matplotlib  # noqa: PLC0415 - only this command needs it

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415

    t, d, m, r, v = (
        report["target"],
        report["distances"],
        report["membership"],
        report["residual"],
        report["verdict"],
    )
    fig = Figure(figsize=(12, 9), dpi=90, layout="constrained")
    (loss_ax, prob_ax), (dist_ax, res_ax) = fig.subplots(2, 2)
    colours = {"released": "tab:green", "retrained": "tab:blue", "before_removal": "tab:red"}
    names = {
        "released": "released",
        "retrained": "retrained without them (fresh noise)",
        "before_removal": "before removal (retrained with them)",
    }
    losses = {k: np.asarray(m["losses"][k]) for k in colours}
    pooled = np.concatenate([x for x in losses.values() if len(x)])
    low, top = float(np.quantile(pooled, 0.0)), float(np.quantile(pooled, 0.995))
    top = top if top > low else low + 1.0
    bins = np.linspace(low, top, 40)
    for k, c in colours.items():
        loss_ax.hist(
            np.clip(losses[k], low, top),
            bins=bins,
            histtype="step",
            lw=1.6,
            color=c,
            label=names[k],
        )
    rel, bef = m["released_vs_retrained"], m["before_removal_vs_retrained"]
    loss_ax.set_title(
        f"Losses of {m['sample']} removed rows (of {m['removed_rows']}); Mann-Whitney p\n"
        f"released vs retrained {rel['mannwhitney_p']:.3g}, "
        f"before vs retrained {bef['mannwhitney_p']:.3g} (level {m['level']:g})",
        loc="left",
        fontsize=10,
    )
    loss_ax.set_xlabel("one-vs-rest logistic loss of the row")
    loss_ax.set_ylabel("rows")
    loss_ax.legend(fontsize=8)
    # the mean removed-row loss of each model, against the retrains' values
    means = np.asarray(m["retrain_mean_losses"])
    rel_x, bef_x = m["released_across_draws"], m["before_removal_across_draws"]
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(means))
    prob_ax.scatter(
        means,
        jitter,
        color="tab:blue",
        s=30,
        label=f"{len(means)} retrains (fresh noise)",
        zorder=3,
    )
    prob_ax.axvline(rel_x["value"], color="tab:green", lw=2.0, label="released")
    prob_ax.axvline(bef_x["value"], color="tab:red", lw=2.0, label="before removal")
    low_band, high_band = rel_x["band"]
    prob_ax.axvspan(
        low_band,
        high_band,
        color="tab:blue",
        alpha=0.12,
        lw=0,
        label=f"a retrain's {1 - m['level']:.0%} band",
    )
    prob_ax.set_ylim(-1, 1)
    span = [
        *means,
        rel_x["value"],
        bef_x["value"],
        low_band,
        high_band,
    ]
    pad = 0.05 * (max(span) - min(span) or 1.0)
    prob_ax.set_xlim(min(span) - pad, max(span) + pad)
    prob_ax.set_yticks([])
    prob_ax.set_xlabel("mean loss of the sampled removed rows")
    prob_ax.set_title(
        f"Mean loss of the removed rows across draws (t test, level {m['level']:g}):\n"
        f"released p {rel_x['p']:.3g}, before removal p {bef_x['p']:.3g}; Mann-Whitney\n"
        f"tells two retrains apart in {m['retrain_pairs_distinguishable']:.0%} of pairs",
        loc="left",
        fontsize=10,
    )
    prob_ax.legend(fontsize=8, loc="lower right")

    # distances per class and in total
    groups = [f"class {c}" for c in t["classes"]] if not t["binary"] else []
    groups.append("total")

    def vals(x: dict[str, Any]) -> list[float]:
        return [*x["per_class"], x["total"]]

    series = [
        ("released vs retrains (mean)", vals(d["released_vs_draws"]), "tab:green"),
        ("retrain vs retrain (spread, mean)", vals(d["draw_spread"]), "tab:blue"),
        ("predicted spread", vals(d["predicted_spread"]), "tab:gray"),
        ("before removal vs retrains (mean)", vals(d["before_removal_vs_draws"]), "tab:red"),
    ]
    if t["binary"]:
        series = [(a, [v_[-1]], c) for a, v_, c in series]
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for i, (label, heights, c) in enumerate(series):
        dist_ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, color=c, label=label)
    dist_ax.axhline(d["allowed"], color="black", ls="--", lw=1.0, label="allowed (total)")
    dist_ax.set_xticks(x, groups, rotation=45 if len(groups) > 4 else 0, fontsize=8)
    dist_ax.set_ylabel("||W_a - W_b|| (Frobenius)")
    dist_ax.set_title(
        "Distance of the released weights to retrains, against the\nspread of two retrains: "
        + ("within" if d["within_spread"] else "OUTSIDE")
        + f" (allowed {d['allowed']:.3g})",
        loc="left",
        fontsize=10,
    )
    dist_ax.legend(fontsize=7, ncols=2)

    # residual against the budget
    bars: list[tuple[str, float, str]] = []
    if r["budget_used"] is not None:
        bars.append(("budget used\n(recorded)", r["budget_used"], "tab:green"))
    ec = r.get("epoch_check") or {}
    if ec.get("available"):
        bars.append(("independent bound\n(from snapshots)", ec["independent_bound"], "tab:purple"))
    if r.get("true_residual") is not None:
        bars.append(("true residual\n||U|| (memory)", r["true_residual"], "tab:orange"))
    bars.append(("budget", r["budget_total"], "black"))
    res_ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars], width=0.6)
    res_ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    for i, (_, val, _) in enumerate(bars):
        res_ax.annotate(f"{val:.3g}", (i, val), ha="center", va="bottom", fontsize=8)
    noise = r["implied_noise"]
    note = ""
    if noise.get("ratio") is not None:
        note = f"\nimplied noise b-U: norm {noise['ratio']:.3f}x sigma sqrt(dK), KS p {noise['ks_p']:.2g}"
    res_ax.set_title(
        f"Gradient residual against the budget ({r['accounting']} accounting){note}",
        loc="left",
        fontsize=10,
    )
    res_ax.set_ylabel("||U||_F")
    acc = report["test_accuracy"]
    acc_text = ", ".join(
        f"{k.replace('_', ' ')} {val:.3f}" for k, val in acc.items() if val is not None
    )
    fig.suptitle(
        f"certremove audit: {t['label']}, version {t['version']}, {t['rows_removed']:,} rows "
        f"removed, {t['rows_alive']:,} remaining; lam {t['lam']:g}, sigma {t['sigma']:g}, "
        f"(eps, delta) = ({t['epsilon']:g}, {t['delta']:g}): "
        + ("PASS" if v["pass"] else "FAIL")
        + (f"\ntest accuracy: {acc_text}" if acc_text else "")
        + f"\n{NOTICE}.",
        fontsize=11,
    )
    try:
        fig.savefig(out)
    except OSError as exc:
        raise AuditError(f"cannot write {out}: {exc}") from exc
