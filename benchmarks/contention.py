"""What a background fit costs the Newton steps beside it, in a thread or in a process.

    python benchmarks/contention.py [--steps N] [--batch B] [--rounds R] [--json] [--output F]

The worker serves requests with Newton steps on its drain's thread while the next noise epoch is
fitted (and an ``"auto"`` trigger estimated) on background threads of the same process
(docs/design.md "Background noise epochs"). On two cores each has a core, but they share the
memory bandwidth and, between torch's calls (which release it), Python's GIL. This measures the
steps of the load test's shape (``synthetic:n=100000,d=64,classes=2``, one torch thread, batches
of ``--batch`` rows) in three settings, in turn, ``--rounds`` times:

- ``none``: nothing beside them;
- ``thread``: a fit (``core.train`` on 75,000 rows of the same shape, over and over) on a thread
  of this process at nice 10, as the worker runs its background fits;
- ``process``: the same fits in a process of their own (spawned, nice 10): no GIL shared.

Per setting and round: the step's wall time (median, mean, p90, max; ms) and its thread's CPU
time (median): wall minus CPU is the time the step waited (for the GIL; the memory it shares
shows in its CPU time instead).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("none", "thread", "process")


def _fits(stop: Any) -> None:
    """Fit a 75,000-row model over and over until ``stop`` is set, at nice 10, one thread."""
    import torch  # noqa: PLC0415

    from core.data import synthetic  # noqa: PLC0415
    from core.train import train  # noqa: PLC0415

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(1)
    ds = synthetic(n=75_000, d=64, classes=2, seed=5)
    while not stop.is_set():
        train(ds.X_train, ds.y_train, seed=2, max_removals=None)


def measure(setting: str, steps: int, batch: int) -> dict[str, Any]:
    """``steps`` Newton steps of ``batch`` rows on a fresh model with ``setting`` beside them."""
    import torch  # noqa: PLC0415

    from core.data import synthetic  # noqa: PLC0415
    from core.train import train  # noqa: PLC0415

    torch.set_num_threads(1)
    ds = synthetic(n=100_000, d=64, classes=2, seed=0)
    model = train(ds.X_train, ds.y_train, seed=1, max_removals=None)
    order = np.random.default_rng(0).permutation(ds.X_train.shape[0])
    ctx = mp.get_context("spawn")
    stop: Any = ctx.Event() if setting == "process" else threading.Event()
    runner: Any = None
    if setting == "thread":
        runner = threading.Thread(target=_fits, args=(stop,), daemon=True)
    elif setting == "process":
        runner = ctx.Process(target=_fits, args=(stop,), daemon=True)
    if runner is not None:
        runner.start()
        time.sleep(3.0)  # the fits under way (a spawned process imports torch first)
    wall, cpu = [], []
    try:
        for i in range(steps):
            rows = order[i * batch : (i + 1) * batch].tolist()
            t, c = time.perf_counter(), time.thread_time()
            model.remove(rows)
            wall.append(1000 * (time.perf_counter() - t))
            cpu.append(1000 * (time.thread_time() - c))
    finally:
        stop.set()
        if runner is not None:
            runner.join(timeout=120)
    return {
        "setting": setting,
        "wall_median_ms": float(np.median(wall)),
        "wall_mean_ms": float(np.mean(wall)),
        "wall_p90_ms": float(np.quantile(wall, 0.9)),
        "wall_max_ms": float(np.max(wall)),
        "cpu_median_ms": float(np.median(cpu)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=270)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--output", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.steps * args.batch > 90_000:
        ap.error("--steps x --batch must stay below 90,000 rows (of 100,000)")
    runs = [
        measure(setting, args.steps, args.batch) for _ in range(args.rounds) for setting in SETTINGS
    ]
    report = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "batch": args.batch,
        "runs": runs,
    }
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.steps} steps of {args.batch} rows, n = 100,000, d = 64, one torch thread (ms)"
        )
        print(f"{'beside':8} {'median':>8} {'mean':>8} {'p90':>8} {'max':>8} {'cpu med':>8}")
        for r in runs:
            print(
                f"{r['setting']:8} {r['wall_median_ms']:8.1f} {r['wall_mean_ms']:8.1f} "
                f"{r['wall_p90_ms']:8.1f} {r['wall_max_ms']:8.1f} {r['cpu_median_ms']:8.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
