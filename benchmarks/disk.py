"""How long the state directory's durable writes take on this machine's disk, without the service.

    python benchmarks/disk.py [--dir DIR] [--count N] [--interval S] [--keep K] [--json]
        [--output FILE]

The worker persists each Newton step (a snapshot, or a record of a snapshot's step log) and
certifies the step's requests only once it is durable (docs/design.md "State directory"), so a
persist that waits on the disk holds up every request behind it: at 5,000 requests/s a 150 ms
wait alone puts about 750 requests past 100 ms, about 1 % of the load test's steady part
(``benchmarks/loadtest.py``, whose output counts the drain's batches with a phase over 100 ms).
This measures the same writes alone, at the drain's pace:

1. **snapshot**: ``Model.save`` of a model trained on ``synthetic:n=100000,d=64,classes=2`` (the
   load test's shape: its weights, alive mask and a journal of 150 answers), ``--keep 3`` as the
   worker keeps them by default (the oldest snapshot deleted at each save; a ``--keep`` above
   ``--count`` deletes none), every ``--interval`` seconds;
2. **fsync**: one 4 KiB file rewritten and fsynced, at the same pace (the disk's own latency).

Per kind: mean, p50, p99, max and how many took more than 50 and 100 ms. The state directory is
``--dir`` (default: a new directory under the system's temporary directory, removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core  # noqa: E402


def summary(seconds: list[float]) -> dict[str, Any]:
    """Mean, p50, p99 and max in ms, and the counts over 50 and 100 ms."""
    ms = np.asarray(seconds) * 1000.0
    return {
        "count": int(ms.size),
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "over_50ms": int((ms > 50).sum()),
        "over_100ms": int((ms > 100).sum()),
    }


def snapshots(directory: Path, count: int, interval: float, keep: int = 3) -> list[float]:
    """``count`` saves of a load-test-shaped model with a journal, ``interval`` s apart, the
    newest ``keep`` kept."""
    ds = core.load_dataset("synthetic:n=100000,d=64,classes=2")
    model = core.train(ds.X_train, ds.y_train, lam=1e-3, sigma=10.0, seed=0, max_removals=None)
    model.dataset = ds
    answer = {"request_id": "0" * 32, "status": "applied", "requested_at": time.time()}
    journal = {"format": 2, "records": [answer] * 150}
    model.save(directory, journal=journal, keep=keep)  # the dataset file, once
    out = []
    for _ in range(count):
        start = time.perf_counter()
        model.save(directory, journal=journal, keep=keep)
        out.append(time.perf_counter() - start)
        time.sleep(interval)
    return out


def fsyncs(directory: Path, count: int, interval: float) -> list[float]:
    """``count`` rewrites of one 4 KiB file, each fsynced, ``interval`` s apart."""
    path = directory / "fsync-probe"
    data = os.urandom(4096)
    out = []
    for _ in range(count):
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        out.append(time.perf_counter() - start)
        time.sleep(interval)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    ap.add_argument("--count", type=int, default=500, help="writes of each kind")
    ap.add_argument("--interval", type=float, default=0.03, help="seconds between writes")
    ap.add_argument("--keep", type=int, default=3, help="snapshots kept (the worker's default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--output", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.count < 1 or args.interval < 0 or args.keep < 1:
        ap.error("--count and --keep must be at least 1 and --interval at least 0")
    root = Path(tempfile.mkdtemp(prefix="certremove-disk-")) if args.dir is None else args.dir
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = {
            "machine": platform.processor() or platform.machine(),
            "dir": str(root),
            "count": args.count,
            "interval_s": args.interval,
            "keep": args.keep,
            "snapshot": summary(snapshots(root / "state", args.count, args.interval, args.keep)),
            "fsync": summary(fsyncs(root, args.count, args.interval)),
        }
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.count} writes of each kind, {args.interval * 1000:.0f} ms apart, in {root}")
    for kind in ("snapshot", "fsync"):
        s = result[kind]
        print(
            f"{kind:>8}: mean {s['mean_ms']:.1f} p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} "
            f"max {s['max_ms']:.1f} ms; over 50 ms: {s['over_50ms']}, over 100 ms: "
            f"{s['over_100ms']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
