"""``certremove report``: draw a state directory's history (``history.jsonl``, :mod:`worker.history`)
into one image for operators.

Three panels: the budget used against its limit over time (noise epochs shaded, retrains marked
by reason, worker starts dotted), the rows removed in the current epoch against ``max_removals``
over time, and the test accuracy of each model version; the title names the model, its guarantee
and accounting. matplotlib (Agg, no display) is imported only here, when the command runs.

**Operator only**, like the history it draws: the budget figures depend on the secret noise.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.history import HISTORY_NAME, HistoryRead, read_history

#: formats ``--out`` may name (by its suffix)
FORMATS = (".png", ".svg", ".pdf")
#: retrain reasons and their colours
REASON_COLOURS = {
    "max_removals": "tab:blue",
    "budget": "tab:red",
    "numerical": "tab:purple",
    "extractor": "tab:orange",
}
OTHER_COLOUR = "tab:gray"


class ReportError(ValueError):
    """The report cannot be drawn; ``code`` is the exit status (1: nothing to draw yet, 2: bad
    arguments)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def load_history(state_dir: Path) -> HistoryRead:
    """The history of ``state_dir``.

    Raises:
        ReportError: no such directory (2), no history or no event in it (1), unreadable (2).
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ReportError(f"{state_dir} is not a directory (give the worker's --state)")
    path = state_dir / HISTORY_NAME
    try:
        read = read_history(path)
    except FileNotFoundError:
        read = HistoryRead()
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    if not read.records:
        raise ReportError(
            f"no history yet in {state_dir}: the worker writes {HISTORY_NAME} while it serves",
            code=1,
        )
    return read


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written before anything is drawn.

    Raises:
        ReportError: an unsupported suffix, a missing or unwritable folder, a directory.
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ReportError(f"--out {out}: name a {', '.join(FORMATS)} file")
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory")
    if not folder.is_dir():
        raise ReportError(f"--out {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ReportError(f"--out {out}: not writable")


def _when(t: float) -> datetime:
    return datetime.fromtimestamp(float(t), tz=UTC)


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _epoch_spans(recs: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """``(version, first t, next version's first t or the last t)`` of each version in turn."""
    spans: list[tuple[int, float, float]] = []
    for rec in recs:
        v, t = int(rec.get("version") or 0), float(rec["t"])
        if spans and spans[-1][0] == v:
            spans[-1] = (v, spans[-1][1], t)
        else:
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], t)
            spans.append((v, t, t))
    return spans


def summarise(read: HistoryRead) -> dict[str, Any]:
    """Figures of a history: model, versions, retrains by reason, rows removed, time range."""
    recs = read.records
    retrains: dict[str, int] = {}
    for r in recs:
        if r.get("event") == "retrain":
            key = str(r.get("reason") or "unknown")
            retrains[key] = retrains.get(key, 0) + 1
    last = recs[-1]
    return {
        "model": last.get("model"),
        "lines": len(recs),
        "first_at": recs[0]["t"],
        "last_at": last["t"],
        "versions": sorted({int(r.get("version") or 0) for r in recs}),
        "retrains": retrains,
        "rows_removed": sum(int(r.get("rows") or 0) for r in recs),
        "starts": sum(1 for r in recs if r.get("event") == "start"),
        "compacted": read.summary,
    }


def write_report(state_dir: Path, out: Path) -> dict[str, Any]:
    """Draw the history of ``state_dir`` into ``out`` (png, svg or pdf); return
    :func:`summarise`'s figures with ``out``.

    Raises:
        ReportError: see :func:`load_history` and :func:`check_out`; or the file cannot be
            written (2).
    """
    read = load_history(state_dir)
    check_out(out)
    import matplotlib  # noqa: PLC0415 - only this command needs it

    matplotlib.use("Agg")
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    recs = read.records
    info = summarise(read)
    times = [_when(r["t"]) for r in recs]
    fig = Figure(figsize=(11, 10), dpi=100, layout="constrained")
    budget_ax, count_ax, acc_ax = fig.subplots(3, 1, height_ratios=[3, 2, 2])
    count_ax.sharex(budget_ax)

    # Noise epochs: alternate shading, labelled while few enough to read.
    spans = _epoch_spans(recs)
    wide = 0.04 * max(1e-9, recs[-1]["t"] - recs[0]["t"])  # a label needs this much room
    for i, (v, t0, t1) in enumerate(spans):
        for ax in (budget_ax, count_ax):
            if i % 2:
                ax.axvspan(_when(t0), _when(t1), color="0.92", zorder=0, lw=0)
        if t1 - t0 >= wide:
            budget_ax.annotate(
                f"v{v}",
                xy=(_when(t0 + (t1 - t0) / 2), 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, -3),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=8,
                color="0.35",
            )

    # Retrains (by reason) and worker starts.
    reasons_seen: dict[str, str] = {}
    for r, when in zip(recs, times, strict=True):
        if r.get("event") == "retrain":
            reason = str(r.get("reason") or "unknown")
            colour = REASON_COLOURS.get(reason, OTHER_COLOUR)
            reasons_seen[reason] = colour
            for ax in (budget_ax, count_ax):
                ax.axvline(when, color=colour, lw=1.0, alpha=0.7, zorder=1)
        elif r.get("event") == "start":
            for ax in (budget_ax, count_ax):
                ax.axvline(when, color="black", lw=1.0, ls=":", zorder=1)

    # Panel 1: budget used against its limit.
    used = [_num(r.get("budget_used")) for r in recs]
    limit = [_num(r.get("budget_limit")) for r in recs]
    budget_ax.plot(times, used, drawstyle="steps-post", color="tab:green", lw=1.6, zorder=3)
    budget_ax.plot(times, limit, drawstyle="steps-post", color="black", ls="--", lw=1.0, zorder=3)
    budget_ax.set_ylabel("gradient-residual budget")
    top = max([x for x in used + limit if not math.isnan(x)], default=1.0)
    budget_ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)  # room for the version labels
    budget_ax.set_title("Budget used by the current noise epoch, against its limit", loc="left")
    handles: list[Any] = [
        Line2D([], [], color="tab:green", lw=1.6, label="budget used"),
        Line2D([], [], color="black", ls="--", lw=1.0, label="budget limit"),
        Patch(
            facecolor="0.92",
            edgecolor="0.8",
            label="noise epochs, shaded in turn\n(vN: model version N)",
        ),
    ]
    handles += [
        Line2D([], [], color=c, lw=1.0, label=f"retrain: {reason}")
        for reason, c in reasons_seen.items()
    ]
    if info["starts"]:
        handles.append(Line2D([], [], color="black", ls=":", lw=1.0, label="worker start"))
    budget_ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )

    # Panel 2: rows removed in the epoch against max_removals.
    removed = [_num(r.get("removed_in_epoch")) for r in recs]
    cap = [_num(r.get("max_removals")) for r in recs]
    count_ax.plot(times, removed, drawstyle="steps-post", color="tab:blue", lw=1.6, zorder=3)
    count_handles = [Line2D([], [], color="tab:blue", lw=1.6, label="removed in epoch")]
    if any(not math.isnan(c) for c in cap):
        count_ax.plot(times, cap, drawstyle="steps-post", color="black", ls="--", lw=1.0, zorder=3)
        count_handles.append(Line2D([], [], color="black", ls="--", lw=1.0, label="max_removals"))
    else:
        count_handles.append(Line2D([], [], color="none", label="(no count trigger)"))
    count_ax.set_ylabel("training rows")
    top = max([x for x in removed + cap if not math.isnan(x)], default=0.0)
    count_ax.set_ylim(0, max(1.0, top * 1.08))
    count_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    count_ax.set_title("Rows removed in the current noise epoch, against max_removals", loc="left")
    count_ax.legend(
        handles=count_handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    locator = AutoDateLocator()
    count_ax.xaxis.set_major_locator(locator)
    count_ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    count_ax.set_xlabel("time (UTC)")
    if recs[-1]["t"] - recs[0]["t"] < 2.0:  # a single moment: a minute around it
        count_ax.set_xlim(_when(recs[0]["t"] - 30), _when(recs[-1]["t"] + 30))
    budget_ax.tick_params(labelbottom=False)

    # Panel 3: test accuracy per version (its latest measurement).
    by_version: dict[int, float] = {}
    for r in recs:
        acc = _num(r.get("accuracy"))
        if not math.isnan(acc):
            by_version[int(r.get("version") or 0)] = acc
    acc_ax.set_title("Test accuracy of each model version (latest measurement)", loc="left")
    acc_ax.set_xlabel("model version (noise epoch)")
    acc_ax.set_ylabel("test accuracy")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_version:
        versions = sorted(by_version)
        values = [by_version[v] for v in versions]
        acc_ax.plot(versions, values, marker="o", ms=4, color="tab:green", lw=1.2)
        low, high = min(values), max(values)
        pad = max(0.01, (high - low) * 0.2)
        acc_ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
        if len(versions) == 1:
            acc_ax.set_xlim(versions[0] - 1, versions[0] + 1)
    else:
        acc_ax.text(
            0.5,
            0.5,
            "no test accuracy recorded (no test split?)",
            ha="center",
            transform=acc_ax.transAxes,
        )
    acc_ax.grid(alpha=0.3)
    budget_ax.grid(alpha=0.3)
    count_ax.grid(alpha=0.3)

    last = recs[-1]
    eps, delta = _num(last.get("epsilon")), _num(last.get("delta"))
    guarantee = "(ε, δ) unknown" if math.isnan(eps + delta) else f"(ε, δ) = ({eps:g}, {delta:g})"
    certified = "certified" if last.get("certified") else "NOT certified (seeded: tests only)"
    if "certified" not in last:
        certified = "certification unknown"
    retrains = sum(info["retrains"].values())
    fig.suptitle(
        f"certremove model {info['model']}: {guarantee}, "
        f"{certified}, {last.get('accounting') or 'unknown'} accounting\n"
        f"{times[0]:%Y-%m-%d %H:%M:%S} to {times[-1]:%Y-%m-%d %H:%M:%S} UTC: "
        f"{info['rows_removed']:,} rows removed, {retrains} retrains, "
        f"versions {min(info['versions'])} to {max(info['versions'])}",
        fontsize=11,
    )
    note = "Operator only: the budget figures depend on the secret noise draw."
    if read.summary:
        note += (
            f" History compacted: {read.summary.get('dropped_lines', 0):,} older lines "
            "summarised (retrains and the last step of each version kept)."
        )
    fig.text(0.995, 0.002, note, fontsize=7, color="0.4", ha="right", va="bottom", wrap=True)
    try:
        fig.savefig(out)
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc}") from exc
    return {**info, "out": str(out)}
