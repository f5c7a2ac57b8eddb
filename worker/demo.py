"""``certremove demo``: train on digits, start a worker, send deletions, print a final report.

With ``CERTREMOVE_BROKER_URL`` unset it starts an embedded Redis on a private unix socket
(``redis+socket://``), so it runs on a fresh machine with nothing else installed.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer import Client, schema
from producer.urls import redact_url
from worker.embedded_redis import start_redis
from worker.launcher import free_port, metrics_text, start_worker, stop_worker, wait_ready
from worker.settings import Settings
from worker.training import train_model


def scrape(port: int) -> dict[str, float]:
    """Metric samples as ``{"name{label=value}": value}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text(port)):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def run_demo(
    *, requests: int = 300, max_removals: int = 100, state: Path | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Run the demo; return the final report (also printed unless ``quiet``)."""
    console = Console(quiet=quiet)
    work = Path(tempfile.mkdtemp(prefix="certremove-demo-"))
    state = state or work / "state"
    server = None
    broker = os.environ.get("CERTREMOVE_BROKER_URL")
    if not broker:
        server = start_redis(directory=work / "redis")
        broker = server.url
        console.print(f"embedded Redis on {broker}")
    proc = None
    try:
        console.print("training on digits ...")
        # digits is small (1,438 training rows, d = 64): lam = 1e-2, sigma = 1 keeps test accuracy
        # near 0.90 (the MNIST-tuned defaults lam = 1e-3, sigma = 10 leave about 0.7).
        summary = train_model(
            "digits", state, overwrite=True, max_removals=max_removals, lam=1e-2, sigma=1.0
        )
        console.print(
            f"trained: {summary['rows']} rows, classes {summary['classes']}, "
            f"test accuracy {summary['test_accuracy']:.3f}, budget {summary['budget_total']:.3f}"
        )
        port = free_port()
        model = f"demo{os.getpid()}"
        settings = Settings(broker_url=broker, model=model, state_dir=state, metrics_port=port)
        proc = start_worker(settings, work / "worker.log")
        wait_ready(proc, port)
        import core  # noqa: PLC0415

        ids = [int(i) for i in core.load_dataset("digits").ids_train.tolist()]
        chosen = random.Random(0).sample(ids, min(requests, len(ids) - 20))
        statuses = send_and_wait(console, Client(broker, model=model), chosen)
        m = scrape(port)
        report = {
            "requests": len(chosen),
            "applied": sum(1 for s in statuses.values() if s.get("status") == "applied"),
            "applied_newton": sum(1 for s in statuses.values() if s.get("method") == "newton"),
            "applied_retrain": sum(1 for s in statuses.values() if s.get("method") == "retrain"),
            "rejected": sum(1 for s in statuses.values() if s.get("status") == "rejected"),
            "retrains": int(
                sum(v for k, v in m.items() if k.startswith("certremove_retrains_total"))
            ),
            "model_version": int(m.get("certremove_model_version", 0)),
            "budget_used": m.get("certremove_budget_used"),
            "budget_total": m.get("certremove_budget_limit"),
            "accuracy_before": summary["test_accuracy"],
            "accuracy_after": m.get("certremove_test_accuracy"),
            "metrics_url": f"http://127.0.0.1:{port}/metrics",
            "state_dir": str(state),
            "broker_url": redact_url(broker),
        }
        table = Table(title="certremove demo: final report")
        table.add_column("")
        table.add_column("value", justify="right")
        for key, value in report.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
        console.print("(the metrics endpoint is an operator endpoint; it closes with the demo)")
        return report
    finally:
        if proc is not None:
            stop_worker(proc)
        if server is not None:
            server.stop()
            shutil.rmtree(work / "redis", ignore_errors=True)


def send_and_wait(
    console: Console, client: Client, sample_ids: list[int], timeout: float = 120.0
) -> dict[str, dict[str, Any]]:
    """Send one request per id with a progress bar, then wait for every status."""
    final = {schema.STATUS_APPLIED, schema.STATUS_REJECTED}
    rids: list[str] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        sent = progress.add_task("deletions sent", total=len(sample_ids))
        done = progress.add_task("certified removed", total=len(sample_ids))
        for start in range(0, len(sample_ids), 10):
            rids += client.enqueue_many([[i] for i in sample_ids[start : start + 10]])
            progress.update(sent, completed=len(rids))
            time.sleep(0.1)
        deadline = time.monotonic() + timeout
        while True:
            statuses = client.statuses(rids)
            finished = sum(1 for s in statuses.values() if s.get("status") in final)
            progress.update(done, completed=finished)
            if finished == len(rids) or time.monotonic() > deadline:
                return statuses
            time.sleep(0.1)
