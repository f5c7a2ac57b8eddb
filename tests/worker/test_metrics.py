from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import ServiceMetrics

DESIGN_NAMES = {
    "certremove_budget_total",
    "certremove_budget_used",
    "certremove_budget_used_ratio",
    "certremove_removals",
    "certremove_requests",
    "certremove_batch_size",
    "certremove_newton_update_seconds",
    "certremove_request_latency_seconds",
    "certremove_retrains",
    "certremove_safety_retrains",
    "certremove_retrain_seconds",
    "certremove_retrain_in_progress",
    "certremove_test_accuracy",
    "certremove_model_version",
    "certremove_training_samples",
    "certremove_extractor_removals_remaining",
}
#: metrics added since the first design (docs/design.md "Metrics", README "Metrics")
EXTRA_NAMES = {
    "certremove_retrain_wait_seconds",
    "certremove_infrastructure_errors",
    "certremove_infrastructure_backoff_seconds",
    "certremove_entry_failures",
    "certremove_stream_trimmed_entries",
}


def test_every_design_metric_is_registered() -> None:
    reg = CollectorRegistry()
    ServiceMetrics(reg)
    assert {m.name for m in reg.collect()} == DESIGN_NAMES | EXTRA_NAMES


def test_values_read_back() -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    m.set_model_state(
        budget_total=2.0, budget_used=0.5, version=3, training_samples=99, accuracy=0.9
    )
    m.removals.labels(method="newton").inc(5)
    m.requests.labels(outcome="rejected").inc()
    m.batch_size.observe(5)
    assert reg.get_sample_value("certremove_budget_used_ratio") == 0.25
    assert reg.get_sample_value("certremove_model_version") == 3
    assert reg.get_sample_value("certremove_training_samples") == 99
    assert reg.get_sample_value("certremove_test_accuracy") == 0.9
    assert reg.get_sample_value("certremove_removals_total", {"method": "newton"}) == 5
    assert reg.get_sample_value("certremove_removals_total", {"method": "retrain"}) == 0
    assert reg.get_sample_value("certremove_requests_total", {"outcome": "rejected"}) == 1
    assert reg.get_sample_value("certremove_batch_size_bucket", {"le": "8.0"}) == 1
    assert reg.get_sample_value("certremove_retrains_total", {"reason": "budget"}) == 0


def test_zero_budget_ratio() -> None:
    reg = CollectorRegistry()
    ServiceMetrics(reg).set_model_state(
        budget_total=0.0, budget_used=0.0, version=1, training_samples=1
    )
    assert reg.get_sample_value("certremove_budget_used_ratio") == 0.0


def test_served_over_http() -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    m.model_version.set(7)
    port = m.serve(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["certremove_model_version"] == 7
