"""A real Prometheus server scraping a real ``certremove worker`` during a small load.

The worker (a subprocess on the test's Redis, a model with a DP extractor so that every gauge
is exported) serves its metrics page; the test checks that the page names every metric the
Grafana dashboard and the alert rules read and that ``promtool check metrics`` accepts it.
Then ``/usr/bin/prometheus`` (skipped where it is not installed) runs with deploy/prometheus.yml
as shipped (its rule file included), pointed at the worker with a 1 s scrape and evaluation
interval, and its HTTP API must report what the worker did: removals, requests, the epoch and
budget gauges, a backlog drained to zero, and no alert firing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import core
from producer import Client
from tests.conftest import make_state
from tests.integration.conftest import StartWorker
from tests.test_deploy import (
    ALERTS,
    PROMETHEUS,
    alert_rules,
    check_exported,
    dashboard_exprs,
    used_metric_names,
)
from worker.launcher import free_port, metrics_text

pytestmark = pytest.mark.integration

PROMETHEUS_BIN = shutil.which("prometheus")
PROMTOOL_BIN = shutil.which("promtool")
MAX_REMOVALS = 200
N_ROWS = 600
#: rows per request: 1, 2, 3, 1, 2, 3 ... (80 rows in all: below the background-fit lead, so
#: every row is a Newton step of the first noise epoch)
SIZES = [1 + i % 3 for i in range(40)]


@dataclass
class PrometheusServer:
    """A Prometheus process on a loopback port and its HTTP query API."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) of each series of the result."""
        data = self.get("/api/v1/query", query=expr)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float:
        """The value of an instant query that must return exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return result[0][1]

    def wait_for(self, expr: str, ok: Callable[[float], bool], timeout: float = 15.0) -> float:
        """Poll ``expr`` (one series) until ``ok(value)``; its last value."""
        deadline = time.monotonic() + timeout
        last: list[tuple[dict[str, str], float]] = []
        while time.monotonic() < deadline:
            last = self.query(expr)
            if len(last) == 1 and ok(last[0][1]):
                return last[0][1]
            time.sleep(0.25)
        pytest.fail(f"{expr} did not reach the expected value within {timeout} s: {last}")


def prometheus_config(directory: Path, target: str, model: str) -> Path:
    """deploy/prometheus.yml with the container's layout under ``directory`` (the rule file at
    ``rules/alerts.yml``), a 1 s scrape and evaluation interval, and the worker job pointed at
    ``target`` with the label ``model``; the self-scrape job is left out."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "certremove-worker"]
    job["static_configs"] = [{"targets": [target], "labels": {"model": model}}]
    config["scrape_configs"] = [job]
    (directory / "rules").mkdir(parents=True)
    shutil.copy(ALERTS, directory / "rules" / "alerts.yml")
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[str, str], PrometheusServer]]:
    """Start Prometheus (stopped by pid at teardown): ``start(target, model)``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str, model: str) -> PrometheusServer:
        if PROMETHEUS_BIN is None:
            pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
        root = tmp_path / "prometheus"
        config = prometheus_config(root / "etc", target, model)
        port = free_port()
        log = root / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    PROMETHEUS_BIN,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        server = PrometheusServer(proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return server
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus was not ready within 20 s:\n{log.read_text()[-3000:]}")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def page_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_scrapes_a_worker_under_load(
    tmp_path: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,
    start_prometheus: Callable[[str, str], PrometheusServer],
) -> None:
    # eps_dp tiny: the extractor covers thousands of removals, so its gauge is exported and
    # counts down without ever stopping the load
    state = make_state(
        tmp_path / "state", n=N_ROWS, max_removals=MAX_REMOVALS, extractor_dp=(1e-4, 1e-9)
    )
    worker = start_worker_process(state, broker_url, model_name)

    # 1. the worker's page: every metric the dashboard and the alerts read, in valid exposition
    page = metrics_text(worker.port)
    exported = {name for name, _ in page_samples(page)}
    missing = check_exported(used_metric_names(), exported)
    assert not missing, f"the dashboard or the alert rules read metrics the worker lacks: {missing}"
    if PROMTOOL_BIN is not None:
        lint = subprocess.run(
            [PROMTOOL_BIN, "check", "metrics"], input=page, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr

    # 2. Prometheus scrapes it while a small load runs
    prom = start_prometheus(f"127.0.0.1:{worker.port}", model_name)
    sel = f'job="certremove-worker", model="{model_name}"'
    prom.wait_for(f"up{{{sel}}}", lambda v: v == 1)
    client = Client(broker_url, model=model_name)
    rids: list[str] = []
    next_id = 0
    for chunk in range(4):
        batch = []
        for size in SIZES[chunk * 10 : (chunk + 1) * 10]:
            batch.append(list(range(next_id, next_id + size)))
            next_id += size
        rids += client.enqueue_many(batch)
        time.sleep(0.3)
    rows = next_id
    statuses = client.wait(rids, timeout=30)
    assert [s["status"] for s in statuses.values()] == ["applied"] * len(SIZES)
    model = core.load_model(state, device="cpu")
    assert model.n_alive == N_ROWS - rows

    # 3. what Prometheus stored agrees with what the worker did. Each gauge is waited for: the
    # worker updates them one after the other, and a scrape may fall in between.
    def settles(expr: str, expected: float) -> None:
        prom.wait_for(expr, lambda v: math.isclose(v, expected, rel_tol=1e-9, abs_tol=1e-12))

    settles(f'certremove_requests_total{{outcome="applied", {sel}}}', len(SIZES))
    settles(f'certremove_removals_total{{method="newton", {sel}}}', rows)
    settles(f'certremove_removals_total{{method="retrain", {sel}}}', 0)
    # the backlog gauges are read from Redis at scrape time: drained to zero
    settles(f"certremove_backlog_undelivered{{{sel}}}", 0)
    settles(f"certremove_backlog_pending{{{sel}}}", 0)
    settles(f"certremove_backlog_oldest_age_seconds{{{sel}}}", 0)
    settles(f"certremove_backlog_stream_length{{{sel}}}", len(SIZES))  # retention: a day
    settles(f"certremove_dead_letters{{{sel}}}", 0)
    assert model.removed_in_epoch == rows
    settles(f"certremove_epoch_removals{{{sel}}}", rows)
    settles(f"certremove_epoch_max_removals{{{sel}}}", MAX_REMOVALS)
    settles(f"certremove_epoch_removals_ratio{{{sel}}}", rows / MAX_REMOVALS)
    settles(f"certremove_budget_limit{{{sel}}}", model.budget_total)
    settles(f"certremove_budget_used{{{sel}}}", model.budget_used)
    assert 0 < model.budget_used <= model.budget_total
    settles(f"certremove_budget_used_ratio{{{sel}}}", model.budget_used / model.budget_total)
    settles(f"certremove_training_samples{{{sel}}}", N_ROWS - rows)
    remaining = model.extractor_removals_remaining
    assert remaining is not None and remaining > 0
    settles(f"certremove_extractor_removals_remaining{{{sel}}}", remaining)
    settles(f"certremove_request_latency_seconds_count{{{sel}}}", len(SIZES))
    # the drain's phases: each batch read, planned, stepped, persisted and answered; the step
    # phase times the same call as the Newton step histogram (no epoch change in this run)
    steps = prom.value(f"certremove_newton_update_seconds_count{{{sel}}}")
    assert steps >= 1
    for phase in ("read", "plan", "step", "persist", "answer", "release"):
        prom.wait_for(
            f'certremove_drain_phase_seconds_count{{phase="{phase}", {sel}}}', lambda v: v >= steps
        )
    settles(f'certremove_drain_phase_seconds_count{{phase="step", {sel}}}', steps)
    settles(f'certremove_drain_phase_seconds_count{{phase="epoch", {sel}}}', 0)
    settles(f"certremove_retrain_in_progress{{{sel}}}", 0)
    assert prom.value(f"time() - certremove_heartbeat_timestamp_seconds{{{sel}}}") < 15
    ((build, one),) = prom.query(f"certremove_build_info{{{sel}}}")
    assert one == 1 and build["device"] == "cpu"
    assert build.get("exported_model", model_name) == model_name  # the worker's own label
    # the dashboard's p99 query, as Grafana sends it (the $model variable filled in)
    p99 = prom.value(
        "histogram_quantile(0.99, sum by (le) (rate(certremove_request_latency_seconds_bucket"
        f'{{model="{model_name}"}}[1m])))'
    )
    assert math.isfinite(p99) and 0 < p99 <= 60
    # the dashboard's `model` variable: label_values(certremove_build_info, model)
    values = prom.get("/api/v1/label/model/values", **{"match[]": "certremove_build_info"})
    assert values == [model_name]

    # every dashboard query, with Grafana's variables filled in, is valid PromQL that Prometheus
    # answers (the stat and timeseries panels alike)
    for expr in dashboard_exprs():
        filled = (
            expr.replace("$model", model_name)
            .replace("$__rate_interval", "5s")
            .replace("$__range", "1m")
        )
        assert "$" not in filled, expr
        prom.query(filled)

    # 4. the shipped alert rules loaded, evaluate cleanly, and none fires for a healthy worker
    groups = prom.get("/api/v1/rules", type="alert")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
    assert all(r["health"] != "err" for r in rules), [r for r in rules if r["health"] == "err"]
    assert prom.get("/api/v1/alerts")["alerts"] == []
