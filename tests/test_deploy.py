"""No Docker engine here: parse docker-compose.yml and the Prometheus/Grafana files instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from worker.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_and_wiring() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "train", "worker", "prometheus", "grafana"} <= set(services)
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    assert worker["environment"]["CERTREMOVE_METRICS_PORT"] == "9820"
    assert "ports" not in worker  # the operator endpoint is never published
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).exists(), volume


def test_prometheus_scrapes_the_worker() -> None:
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = [
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert "worker:9820" in targets


def test_grafana_dashboard_uses_real_metrics_and_the_datasource() -> None:
    prov = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    uid = prov["datasources"][0]["uid"]
    dash = json.loads((ROOT / "deploy/grafana/dashboards/certremove.json").read_text())
    reg = CollectorRegistry()
    ServiceMetrics(reg)
    known = {s.name for fam in reg.collect() for s in fam.samples} | {m.name for m in reg.collect()}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"certremove_[a-z_]+", e)}
    assert used and used <= known, used - known
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {uid}
