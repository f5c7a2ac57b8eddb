"""Service load test beside a raw Redis-stream baseline (issue 3 "Benchmark").

    python benchmarks/loadtest.py [--json] [--output FILE]

1. **raw baseline**: the same stream round trip with no model and no Celery: a producer sends
   pipelined ``XADD`` (the service's entry fields), a consumer process reads ``XREADGROUP COUNT
   2048`` and ``XACK``s; latency = ack time - ``requested_at``.
2. **service (a) burst**: ``certremove loadtest`` logic against a running ``certremove worker`` on
   ``synthetic:n=100000,d=64,classes=2``: N single-id requests (distinct ids) as fast as the
   producer sends them. Throughput, latency p50/p95/p99, retrains. Measured ``--burst-pairs``
   times (default 3), each on a fresh worker and right after its own raw baseline (run once the
   worker is ready, so both see the same processes and the same moment of a machine whose speed
   drifts by 10-20 % over seconds); ``burst_vs_raw`` is the median of the pairs' ratios, and
   ``raw`` and ``burst`` are that pair's (every pair is in ``burst_pairs``).
3. **service (b) steady**: a fresh copy of the trained state and a new worker; R requests/s for
   S seconds (distinct ids, capped at 80 % of the training rows), latency percentiles.
4. **drain only** (``--drain-only K``, default 0): K more fresh workers, each after its own raw
   baseline; the burst's requests are appended with no doorbell (the worker does not know of
   them), then one ring: ``throughput`` = requests / (last ``applied_at`` - the ring). The
   worker's own pace, with no producer sharing the cores while it drains (:func:`drain_only`).

Redis: ``--broker-url`` or ``$CERTREMOVE_BROKER_URL``; otherwise a private Redis started here on a
unix socket (used by the baseline and the service alike).

Before and after the runs, ``host_before`` / ``host_after`` probe the machine's speed at what a
removal step is made of (:func:`host_probe`): VMs of the same kind differ by 2-3x there from one
session to the next, and every figure above follows it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from producer import Client, schema  # noqa: E402
from producer.client import (  # noqa: E402
    CHUNK,
    append_requests,
    encode_sample_ids,
    new_request_id,
    redis_py_url,
)
from producer.loadtest import collect, percentile, run_loadtest  # noqa: E402
from worker.embedded_redis import start_redis  # noqa: E402
from worker.launcher import free_port, start_worker, stop_worker, wait_ready  # noqa: E402
from worker.settings import Settings  # noqa: E402


def _raw_consumer(url: str, key: str, n: int, out: Any) -> None:
    r = redis.Redis.from_url(url)
    group = "raw"
    lat: list[float] = []
    last = 0.0
    while len(lat) < n:
        reply = r.xreadgroup(group, "c", {key: ">"}, count=2048, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        r.xack(key, group, *[eid for eid, _ in entries])
        last = time.time()
        lat += [last - float(f[b"requested_at"]) for _, f in entries]
    out.put((lat, last))


def raw_baseline(url: str, n: int) -> dict[str, Any]:
    """Pipelined XADD -> XREADGROUP -> XACK, no model, no Celery."""
    r = redis.Redis.from_url(url)
    key = f"certremove:raw{uuid.uuid4().hex[:6]}:requests"
    r.xgroup_create(key, "raw", id="0", mkstream=True)
    out: Any = mp.get_context("fork").Queue()
    proc = mp.get_context("fork").Process(target=_raw_consumer, args=(url, key, n, out))
    proc.start()
    time.sleep(0.5)
    t0 = time.time()
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        now = repr(time.time())
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(
                key, {"request_id": uuid.uuid4().hex, "sample_ids": f"[{i}]", "requested_at": now}
            )
        pipe.execute()
    lat, last = out.get(timeout=120)
    proc.join(10)
    r.delete(key)
    lat.sort()
    return {
        "requests": n,
        "throughput": n / (last - t0),
        "latency_p50": percentile(lat, 50),
        "latency_p95": percentile(lat, 95),
        "latency_p99": percentile(lat, 99),
    }


def train_state(dataset: str, path: Path, max_removals: Any) -> dict[str, Any]:
    from worker.training import train_model  # noqa: PLC0415 - torch only here

    t0 = time.time()
    summary = train_model(dataset, path, overwrite=True, max_removals=max_removals, device="cpu")
    summary["train_seconds"] = time.time() - t0
    return summary


def service_run(
    url: str,
    template: Path,
    work: Path,
    name: str,
    *,
    requests: int,
    rate: float,
    max_batch: int,
    timeout: float,
    loglevel: str = "WARNING",
    log_dir: Path | None = None,
    env: dict[str, Any] | None = None,
    before: Any = None,
    load: Any = None,
) -> dict[str, Any]:
    """Copy the trained state, start a worker on it, run one load test, stop the worker.
    ``before()``: run once the worker is ready, just before the load test (a raw baseline);
    its result is returned under ``"before"``. ``load(client)``: what to run instead of
    ``run_loadtest`` (:func:`drain_only`); it returns the result's dict."""
    state = work / name
    shutil.copytree(template, state)
    model = f"bench{name}{uuid.uuid4().hex[:4]}"
    port = free_port()
    settings = Settings(
        broker_url=url,
        model=model,
        state_dir=state,
        metrics_port=port,
        max_batch=max_batch,
        **(env or {}),
    )
    log = work / f"{name}.log"
    proc = start_worker(settings, log, loglevel=loglevel)
    try:
        wait_ready(proc, port, timeout=180)
        # the load generator's own garbage (a training run in this process) is collected now,
        # not by a collection in the middle of the burst it sends
        gc.collect()
        gc.freeze()
        first = before() if before is not None else None
        with Client(url, model=model) as client:
            cpu0 = cpu_seconds(client.redis, proc.pid)
            if load is None:
                out = run_loadtest(client, requests=requests, rate=rate, timeout=timeout).as_dict()
            else:
                out = load(client)
            cpu1 = cpu_seconds(client.redis, proc.pid)
        out["cpu_seconds"] = cpu_spent(cpu0, cpu1)
        if first is not None:
            out["before"] = first
        out["drain_phases"] = drain_phases(port)
        return out
    finally:
        stop_worker(proc)
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, log_dir / f"worker-{name}.log")


def drain_only(client: Client, requests: int, timeout: float) -> dict[str, Any]:
    """The worker's own pace: ``requests`` single-id requests (ids 0, 1, ...) appended as the
    producer appends them but with no doorbell, then one ring. ``throughput`` = applied /
    (last ``applied_at`` - the ring); ``started_early``: some request was applied before the
    ring (a wake-up of the worker's own: the figure then flatters it)."""
    client.warm()
    rids = [new_request_id() for _ in range(requests)]
    t0 = time.perf_counter()
    for start in range(0, requests, CHUNK):
        part = rids[start : start + CHUNK]
        append_requests(
            client.redis,
            client.model,
            [(rid, encode_sample_ids([start + k])) for k, rid in enumerate(part)],
        )
    appended = time.perf_counter() - t0
    rang = time.time()
    client.ring()
    statuses = collect(client, rids, timeout)
    applied = [s for s in statuses.values() if s.get("status") == schema.STATUS_APPLIED]
    times = sorted(s["applied_at"] for s in applied if s.get("applied_at") is not None)
    span = times[-1] - rang if times else 0.0
    return {
        "requests": requests,
        "applied": len(applied),
        "not_applied": requests - len(applied),
        "append_seconds": appended,
        "drain_seconds": span,
        "throughput": len(applied) / span if span > 0 else 0.0,
        "batches": len(set(times)),
        "started_early": bool(times) and times[0] < rang,
    }


def cpu_seconds(client: redis.Redis, worker_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the worker process (all its threads, and its children that
    exited), by Redis (``INFO cpu``) and by this process (the load generator: sending, polling
    and the final read of every status): their differences over a run say where its CPU went on
    a machine whose cores they share (Linux; -1 where one cannot be read)."""
    out = {"worker": -1.0, "redis": -1.0, "load_generator": time.process_time()}
    try:
        with open(f"/proc/{worker_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the name
        out["worker"] = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        info = client.info("cpu")
        out["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except (redis.RedisError, KeyError, ValueError):
        pass
    return out


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The CPU seconds between two :func:`cpu_seconds` readings (-1 where either is -1)."""
    return {
        k: -1.0 if min(before[k], after[k]) < 0 else round(after[k] - before[k], 4) for k in before
    }


def drain_phases(port: int) -> dict[str, dict[str, float]]:
    """Per phase of the drain loop (``certremove_drain_phase_seconds``, read from the worker's
    metrics page at the end of a run): batches that went through it, its mean and total seconds,
    its 97th percentile as Prometheus reads it from the buckets (``p97``: a steady p99 is about
    two cycles from the slow end, docs/operations.md "Where a drain's time goes") and the batches
    in which it took more than 100 ms (``over_100ms``: a stall, such as a persist whose fsyncs
    waited on the disk, delays every request behind it)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return phases_of(resp.read().decode())


def phases_of(text: str) -> dict[str, dict[str, float]]:
    """:func:`drain_phases` of a metrics page's text."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "certremove_drain_phase_seconds":
            continue
        for sample in family.samples:
            phase = sample.labels.get("phase")
            if sample.name.endswith("_sum"):
                sums[phase] = sample.value
            elif sample.name.endswith("_count"):
                counts[phase] = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.setdefault(phase, []).append((float(sample.labels["le"]), sample.value))
    return {
        p: {
            "batches": counts[p],
            "mean": sums[p] / counts[p],
            "total": sums[p],
            "p97": bucket_quantile(0.97, buckets.get(p, [])),
            "over_100ms": counts[p] - dict(buckets.get(p, [])).get(0.1, counts[p]),
        }
        for p in counts
        if counts[p]
    }


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram's cumulative ``(le, count)`` buckets, interpolated
    linearly inside its bucket as Prometheus' ``histogram_quantile`` does (None: nothing
    observed)."""
    if not buckets or max(c for _, c in buckets) <= 0:
        return None
    bounds, cumulative = zip(*sorted(buckets), strict=True)
    rank = q * cumulative[-1]
    i = next(k for k, c in enumerate(cumulative) if c >= rank)
    if math.isinf(bounds[i]):
        return bounds[i - 1] if i else 0.0
    low, below = (bounds[i - 1], cumulative[i - 1]) if i else (0.0, 0.0)
    return low + (bounds[i] - low) * (rank - below) / (cumulative[i] - below)


def phase_line(phases: dict[str, dict[str, float]]) -> str:
    """``read 1.2 plan 3.4 ...``: mean milliseconds per batch of each phase, and the batches."""
    if not phases:
        return "-"
    batches = int(max(v["batches"] for v in phases.values()))
    parts = [f"{p} {v['mean'] * 1000:.1f}" for p, v in phases.items()]
    step_p97 = phases.get("step", {}).get("p97")
    tail = "" if step_p97 is None else f"; step p97 {step_p97 * 1000:.0f} ms"
    slow = [f"{p} {int(v['over_100ms'])}" for p, v in phases.items() if v.get("over_100ms")]
    if slow:
        tail += "; batches over 100 ms: " + ", ".join(slow)
    return f"{batches} batches; mean ms per batch: " + ", ".join(parts) + tail


def host_probe(n: int = 100_000, d: int = 64, repeats: int = 15) -> dict[str, Any]:
    """This machine's speed at a removal step's parts, on one thread, at the load test's shape:
    the float32 Hessian-vector product of CG (``core.blocked.hvp`` in the layout measured
    fastest here) and one float64 pass over the rows (a sum, memory-bound), medians of
    ``repeats``, in ms. A step at n = 100,000 makes about three of the first and the
    certificate's widened pass besides."""
    import torch  # noqa: PLC0415 - torch only here

    from core.blocked import calibrate_hvp, hvp  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        X = torch.rand((n, d), generator=g, dtype=torch.float32)
        curvature = torch.rand((n, 1), generator=g, dtype=torch.float32)
        V = torch.rand((d, 1), generator=g, dtype=torch.float64)
        layout = calibrate_hvp(X, 1)
        X64 = X.double()

        def median_ms(fn: Any) -> float:
            return 1000.0 * statistics.median(timed(fn) for _ in range(repeats))

        def timed(fn: Any) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return {
            "shape": [n, d],
            "hvp_layout": layout,
            "hvp_f32_ms": median_ms(lambda: hvp(X, curvature, V, 1.0)),
            "pass_f64_ms": median_ms(lambda: X64.sum()),
        }
    finally:
        torch.set_num_threads(threads)


def probe_line(probe: dict[str, Any]) -> str:
    return (
        f"float32 Hessian-vector product {probe['hvp_f32_ms']:.1f} ms ({probe['hvp_layout']}), "
        f"float64 pass {probe['pass_f64_ms']:.1f} ms"
    )


def fmt(v: float | None, scale: float = 1000.0, unit: str = " ms") -> str:
    return "-" if v is None else f"{v * scale:,.0f}{unit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", default="synthetic:n=100000,d=64,classes=2")
    ap.add_argument("--burst", type=int, default=20_000)
    ap.add_argument(
        "--burst-pairs",
        type=int,
        default=3,
        help="raw baseline + burst pairs, each burst on a fresh worker (the median ratio counts)",
    )
    ap.add_argument(
        "--drain-only",
        type=int,
        default=0,
        help="raw baseline + drain-only runs (the burst preloaded, then one ring), each on a "
        "fresh worker",
    )
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-batch", type=int, default=8192)
    ap.add_argument("--max-removals", default="auto")
    ap.add_argument("--broker-url", default=os.environ.get("CERTREMOVE_BROKER_URL"))
    ap.add_argument("--skip-steady", action="store_true")
    ap.add_argument("--skip-burst", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument(
        "--retrain-lead",
        type=float,
        help="CERTREMOVE_RETRAIN_LEAD of the workers (default: the worker's, 0.2; 0 = blocking)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        help="CERTREMOVE_TORCH_THREADS of the workers (default: the worker's, one less than the CPUs)",
    )
    ap.add_argument(
        "--background-refactor",
        choices=("on", "off"),
        default="on",
        help="the workers' CERTREMOVE_BACKGROUND_REFACTOR (worker.refactor)",
    )
    ap.add_argument("--loglevel", default="WARNING", help="the workers' log level")
    ap.add_argument("--log-dir", type=Path, help="keep the workers' logs here")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--output", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="certremove-bench-"))
    server = None
    url = args.broker_url
    if not url:
        server = start_redis(directory=work / "redis")
        url = server.url
    try:
        report: dict[str, Any] = {
            "loadavg_before": os.getloadavg(),
            "dataset": args.dataset,
            "max_batch": args.max_batch,
            "cpus": os.cpu_count(),
            "host_before": host_probe(),
        }
        if args.skip_burst:
            report["raw"] = raw_baseline(redis_py_url(url), args.burst)
        mr: Any = args.max_removals
        mr = None if mr == "none" else (int(mr) if mr.isdigit() else mr)
        report["train"] = train_state(args.dataset, work / "template", mr)
        env: dict[str, Any] = {}
        if args.retrain_lead is not None:
            env["retrain_lead"] = args.retrain_lead
        if args.torch_threads is not None:
            env["torch_threads"] = args.torch_threads
        env["background_refactor"] = args.background_refactor == "on"
        report["background_refactor"] = args.background_refactor
        report["retrain_lead"] = env.get("retrain_lead", Settings().retrain_lead)
        worker_kw: dict[str, Any] = {"loglevel": args.loglevel, "log_dir": args.log_dir, "env": env}
        rows = int(report["train"]["rows"])
        report["burst"] = None
        if not args.skip_burst:
            pairs = []
            for k in range(max(1, args.burst_pairs)):
                burst = service_run(
                    url,
                    work / "template",
                    work,
                    f"burst{k + 1}",
                    requests=min(args.burst, int(0.8 * rows)),
                    rate=0,
                    max_batch=args.max_batch,
                    timeout=args.timeout,
                    before=lambda: raw_baseline(redis_py_url(url), args.burst),
                    **worker_kw,
                )
                raw = burst.pop("before")
                pairs.append(
                    {"raw": raw, "burst": burst, "ratio": burst["throughput"] / raw["throughput"]}
                )
            report["burst_pairs"] = [
                {
                    "raw_throughput": p["raw"]["throughput"],
                    "burst_throughput": p["burst"]["throughput"],
                    "burst_vs_raw": p["ratio"],
                    "burst_latency_p50": p["burst"]["latency_p50"],
                    "burst_sent_seconds": p["burst"]["sent_seconds"],
                    "burst_batches": p["burst"]["drain_phases"].get("step", {}).get("batches"),
                    "burst_not_applied": p["burst"]["not_applied"],
                    "burst_cpu_seconds": p["burst"]["cpu_seconds"],
                }
                for p in pairs
            ]
            # the median pair (the lower of the two middle ones for an even count)
            median = sorted(pairs, key=lambda p: p["ratio"])[(len(pairs) - 1) // 2]
            report["raw"], report["burst"] = median["raw"], median["burst"]
            report["burst_vs_raw"] = median["ratio"]
        if args.drain_only > 0:
            runs = []
            n_drain = min(args.burst, int(0.8 * rows))
            for k in range(args.drain_only):
                run = service_run(
                    url,
                    work / "template",
                    work,
                    f"drain{k + 1}",
                    requests=n_drain,
                    rate=0,
                    max_batch=args.max_batch,
                    timeout=args.timeout,
                    before=lambda: raw_baseline(redis_py_url(url), args.burst),
                    load=lambda client: drain_only(client, n_drain, args.timeout),
                    **worker_kw,
                )
                raw = run.pop("before")
                run["raw_throughput"] = raw["throughput"]
                run["vs_raw"] = run["throughput"] / raw["throughput"]
                runs.append(run)
            report["drain_only"] = runs
            report["drain_only_vs_raw"] = statistics.median(r["vs_raw"] for r in runs)
        if not args.skip_steady:
            n = min(int(args.rate * args.seconds), int(0.8 * rows))
            report["steady"] = service_run(
                url,
                work / "template",
                work,
                "steady",
                requests=n,
                rate=args.rate,
                max_batch=args.max_batch,
                timeout=args.timeout,
                **worker_kw,
            )
        report["loadavg_after"] = os.getloadavg()
        report["host_after"] = host_probe()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"dataset {report['dataset']}, max_batch {report['max_batch']}, "
        f"{report['train']['rows']} rows, max_removals {report['train']['max_removals']}"
    )
    print(
        f"{'run':<16}{'requests':>10}{'req/s':>10}{'p50':>10}{'p95':>10}{'p99':>10}"
        f"{'not applied':>13}{'retrains':>10}"
    )
    for name in ("raw", "burst", "steady"):
        r = report.get(name)
        if r is None:
            continue
        print(
            f"{name:<16}{r['requests']:>10}{r['throughput']:>10,.0f}{fmt(r['latency_p50']):>10}"
            f"{fmt(r['latency_p95']):>10}{fmt(r['latency_p99']):>10}"
            f"{r.get('not_applied', 0):>13}{r.get('retrains', '-'):>10}"
        )
    if "burst_vs_raw" in report:
        each = " ".join(f"{p['burst_vs_raw']:.3f}" for p in report.get("burst_pairs", []))
        print(
            f"burst throughput / raw baseline = {report['burst_vs_raw']:.3f} "
            f"(median of the pairs: {each})"
        )
    if report.get("drain_only"):
        each = " ".join(
            f"{r['vs_raw']:.3f} ({r['throughput']:,.0f} req/s, {r['batches']} batches)"
            + (" started early" if r["started_early"] else "")
            for r in report["drain_only"]
        )
        print(f"drain only / raw baseline = {report['drain_only_vs_raw']:.3f} (median of: {each})")
    for name in ("burst", "steady"):
        r = report.get(name)
        if r and r.get("rejected_reasons"):
            print(f"{name}: rejected {r['rejected_reasons']}")
    if report.get("steady"):
        tail = report["steady"]["latency_p99_by_second"]
        print("steady p99 per second sent: " + " ".join(fmt(v, unit="") for v in tail))
    for name in ("burst", "steady"):
        r = report.get(name)
        if r and "drain_phases" in r:
            print(f"{name} drain: {phase_line(r['drain_phases'])}")
        if r and "cpu_seconds" in r:
            cpu = r["cpu_seconds"]
            print(
                f"{name} CPU seconds: worker {cpu['worker']:.2f}, Redis {cpu['redis']:.2f}, "
                f"load generator {cpu['load_generator']:.2f}"
            )
    print(f"load average before {report['loadavg_before']}, after {report['loadavg_after']}")
    print(f"host before: {probe_line(report['host_before'])}")
    print(f"host after: {probe_line(report['host_after'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
