"""Choosing lam, sigma and the accounting: accuracy, certified removals and fit time on a grid.

    python benchmarks/params.py [--datasets digits,synthetic:n=12000,d=784,classes=2]
                                [--lams 1e-3,1e-2] [--sigmas 0.1,1,10] [--epsilon 1]
                                [--delta 1e-4] [--accountings exact,bound] [--batch-fraction 0.01]
                                [--draws 1] [--threads 1] [--device cpu] [--output FILE]
                                [--append] [--json]
    python benchmarks/params.py --from-json benchmarks/results-params-cpu.json   # the table

For every dataset, ``lam``, ``sigma`` and accounting it reports, over ``--draws`` independent
noise draws (OS entropy, as the service draws it; the median, and the range when there are
several):

- ``budget``: ``sigma * epsilon / sqrt(2 ln(1.5 / delta))`` (``core.budget_total``);
- ``acc``: test accuracy right after training;
- ``auto``: the per-epoch ``max_removals`` that ``max_removals="auto"`` resolves to (two shadow
  runs with their own noise; half the smaller crossing point, at most 25 % of the rows);
- ``to budget``: rows removed before the budget check stops a chain (a model trained with
  ``max_removals=None``, rows removed in a random order in batches of ``--batch-fraction`` of the
  training rows, one request per row so the safety net's halving can commit part of a batch;
  each draw its own order), searched up to half of the rows (``>=`` when the budget was not
  reached there): the kind of crossing point ``"auto"`` estimates by its shadow runs (in its own
  batches) and halves. A service with a count trigger stops each epoch before it (docs/theory.md
  "The retrain trigger"); one that reaches it meets the safety net;
- ``reached``: the draws whose chain met the budget within half of the rows, and ``below
  auto``: the draws whose chain met it before the count ``"auto"`` chose in the same draw's
  (independent) auto training, i.e. where a service with that count would have seen the budget
  safety net fire;
- ``train s``: ``core.train`` with ``max_removals="auto"`` (fit plus shadow runs), and
  ``retrain s``: ``model.retrain()`` on the rows left after the chain (fresh noise, warm start:
  what a blocking retrain costs).

Each cell trains its own models; ``"bound"`` charges the a-priori bound, which grows much faster
than the anchored exact residual. The timings depend on the machine and its load (``--threads``
torch threads). Prints a markdown table; ``--output`` also writes the JSON (``--append`` adds
this run's rows to those already in that file, e.g. for a second dataset run with other
``--draws``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core  # noqa: E402

DEFAULT_DATASETS = "digits,synthetic:n=12000,d=784,classes=2"


def floats(text: str) -> list[float]:
    """``"1e-3,1e-2"`` -> ``[0.001, 0.01]``."""
    return [float(x) for x in text.split(",") if x.strip()]


def chain_to_budget(
    model: core.Model, order: list[int], batch: int, search: int
) -> tuple[int, bool, str | None, int]:
    """Remove ``order`` in batches of ``batch`` rows (one group per row) until the model asks for
    a retrain or ``search`` rows are gone. Returns (rows removed, whether the chain stopped before
    ``search``, the retrain reason, Newton steps called)."""
    done, steps = 0, 0
    while done < search:
        rows = order[done : min(search, done + batch)]
        res = model.remove(rows, groups=[1] * len(rows))
        steps += 1
        done += len(res.removed)
        if res.needs_retrain:
            return done, True, res.retrain_reason, steps
    return done, False, None, steps


def run_cell(
    ds: core.Dataset,
    *,
    lam: float,
    sigma: float,
    epsilon: float,
    delta: float,
    accounting: str,
    batch_fraction: float,
    device: str,
    order_seed: int,
) -> dict[str, Any]:
    """One grid cell: train with ``"auto"``, then a chain to the budget on a model trained with
    ``max_removals=None``, then one retrain."""
    X, y = ds.X_train, ds.y_train
    setting = dict(lam=lam, sigma=sigma, epsilon=epsilon, delta=delta, accounting=accounting)
    t0 = time.perf_counter()
    auto = core.train(X, y, **setting, device=device, max_removals="auto")  # type: ignore[arg-type]
    train_auto = time.perf_counter() - t0
    acc = auto.accuracy(ds.X_test, ds.y_test)
    chosen = auto.max_removals
    del auto

    t0 = time.perf_counter()
    model = core.train(X, y, **setting, device=device, max_removals=None)  # type: ignore[arg-type]
    train_plain = time.perf_counter() - t0
    n = len(y)
    order = np.random.default_rng(order_seed).permutation(n).tolist()
    batch = max(1, math.ceil(batch_fraction * n))
    t0 = time.perf_counter()
    removed, reached, reason, steps = chain_to_budget(model, order, batch, n // 2)
    chain_seconds = time.perf_counter() - t0
    acc_after = model.accuracy(ds.X_test, ds.y_test)
    t0 = time.perf_counter()
    model.retrain()
    retrain = time.perf_counter() - t0
    return {
        "dataset": ds.name,
        "n_train": n,
        "d": int(X.shape[1]),
        "classes": len(model.classes),
        "lam": lam,
        "sigma": sigma,
        "epsilon": epsilon,
        "delta": delta,
        "accounting": accounting,
        "budget": core.budget_total(sigma, epsilon, delta),
        "accuracy": acc,
        "auto_max_removals": chosen,
        "auto_fraction": (chosen or 0) / n,
        "removals_to_budget": removed,
        "budget_reached": reached,
        "stop_reason": reason,
        "chain_batch_rows": batch,
        "chain_steps": steps,
        "chain_seconds": chain_seconds,
        "accuracy_after_chain": acc_after,
        "train_auto_seconds": train_auto,
        "train_plain_seconds": train_plain,
        "retrain_seconds": retrain,
    }


def aggregate(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """One grid cell over its noise draws: the settings, the medians (and ranges) of the
    figures, and every draw."""
    first = draws[0]
    out = {k: first[k] for k in ("dataset", "n_train", "d", "classes", "lam", "sigma",
                                 "epsilon", "delta", "accounting", "budget",
                                 "chain_batch_rows")}  # fmt: skip
    for key in ("accuracy", "auto_max_removals", "removals_to_budget", "train_auto_seconds",
                "train_plain_seconds", "retrain_seconds", "accuracy_after_chain"):  # fmt: skip
        values = [float(d[key]) for d in draws]
        out[key] = float(np.median(values))
        out[key + "_min"], out[key + "_max"] = min(values), max(values)
    out["n_draws"] = len(draws)
    out["budget_reached"] = all(d["budget_reached"] for d in draws)
    out["budget_reached_draws"] = sum(bool(d["budget_reached"]) for d in draws)
    # draws whose chain met the budget before the count "auto" chose (in another draw of the
    # same distribution): a service with that count would have seen the safety net fire
    out["below_auto_draws"] = sum(
        bool(d["budget_reached"]) and d["removals_to_budget"] < (d["auto_max_removals"] or 0)
        for d in draws
    )
    out["draws"] = draws
    return out


def _fig(row: dict[str, Any], key: str, fmt: str) -> str:
    """``median`` or ``median (min-max)`` of ``key``."""
    mid, lo, hi = row[key], row[key + "_min"], row[key + "_max"]
    text = format(mid, fmt)
    return text if lo == hi else f"{text} ({format(lo, fmt)}-{format(hi, fmt)})"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the grid."""
    out = [
        "| dataset | lam | sigma | budget | accounting | acc | auto | to budget | reached | "
        "below auto | train s (auto) | retrain s |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = r["dataset"]
        if name.startswith("synthetic"):
            name = f"synthetic n={r['n_train']}, d={r['d']}"
        to_budget = _fig(r, "removals_to_budget", ",.0f")
        if r["budget_reached_draws"] == 0:
            to_budget = ">= " + to_budget
        n = r["n_draws"]
        out.append(
            f"| {name} | {r['lam']:g} | {r['sigma']:g} | {r['budget']:.4f} | {r['accounting']} "
            f"| {_fig(r, 'accuracy', '.3f')} | {_fig(r, 'auto_max_removals', ',.0f')} "
            f"| {to_budget} | {r['budget_reached_draws']}/{n} | {r['below_auto_draws']}/{n} "
            f"| {r['train_auto_seconds']:.2f} | {r['retrain_seconds']:.2f} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=DEFAULT_DATASETS, help="comma-separated; a "
                        "synthetic spec's own commas are kept (split on ',synthetic' / ',digits')")  # fmt: skip
    parser.add_argument("--lams", default="1e-3,1e-2")
    parser.add_argument("--sigmas", default="0.1,1,10")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-4)
    parser.add_argument("--accountings", default="exact,bound")
    parser.add_argument("--batch-fraction", type=float, default=0.01,
                        help="rows per Newton step of the chain, as a fraction of the rows")  # fmt: skip
    parser.add_argument("--draws", type=int, default=1, help="noise draws per grid cell")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--order-seed", type=int, default=0,
                        help="removal order of the chain's first draw (draw i uses seed + i)")  # fmt: skip
    parser.add_argument("--output", help="also write the JSON object to this file")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to those already in --output")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the JSON object instead")
    parser.add_argument("--from-json", metavar="FILE",
                        help="print the table of a results file (its draws) and exit")  # fmt: skip
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(table([aggregate(r["draws"]) for r in saved["rows"]]))
        return 0
    torch.set_num_threads(max(1, args.threads))
    datasets = split_datasets(args.datasets)
    rows: list[dict[str, Any]] = []
    started = time.time()
    for name in datasets:
        ds = core.load_dataset(name)
        for lam in floats(args.lams):
            for sigma in floats(args.sigmas):
                for accounting in [a.strip() for a in args.accountings.split(",") if a.strip()]:
                    draws = []
                    for draw in range(max(1, args.draws)):
                        row = run_cell(
                            ds,
                            lam=lam,
                            sigma=sigma,
                            epsilon=args.epsilon,
                            delta=args.delta,
                            accounting=accounting,
                            batch_fraction=args.batch_fraction,
                            device=args.device,
                            order_seed=args.order_seed + draw,
                        )
                        draws.append(row)
                        print(
                            f"# {row['dataset']} lam={lam:g} sigma={sigma:g} {accounting}: "
                            f"acc {row['accuracy']:.3f}, auto {row['auto_max_removals']}, "
                            f"to budget {row['removals_to_budget']}"
                            f"{'' if row['budget_reached'] else ' (not reached)'}, "
                            f"train {row['train_auto_seconds']:.2f} s, "
                            f"retrain {row['retrain_seconds']:.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                    rows.append(aggregate(draws))
    run = {
        "command": " ".join(["python", "benchmarks/params.py", *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": args.device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "seconds": time.time() - started,
        "draws": args.draws,
        "batch_fraction": args.batch_fraction,
        "epsilon": args.epsilon,
        "delta": args.delta,
    }
    out: dict[str, Any] = {"runs": [run], "rows": rows}
    if args.output and args.append and Path(args.output).exists():
        old = json.loads(Path(args.output).read_text())
        out = {"runs": old.get("runs", []) + [run], "rows": old.get("rows", []) + rows}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(table(out["rows"]))
    return 0


def split_datasets(text: str) -> list[str]:
    """Split ``"digits,synthetic:n=12000,d=784,classes=2"`` into dataset names: a comma starts a
    new name only when what follows is not a ``key=value`` option of a synthetic spec."""
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if names and names[-1].startswith("synthetic") and "=" in part and ":" not in part:
            names[-1] += "," + part
        else:
            names.append(part)
    return names


if __name__ == "__main__":
    raise SystemExit(main())
