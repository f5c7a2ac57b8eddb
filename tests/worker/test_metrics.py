from __future__ import annotations

import math
import threading
import time
import urllib.request
from concurrent.futures import Future

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer import Client, schema
from worker.launcher import free_port
from worker.metrics import ServiceMetrics
from worker.phases import PHASES

DESIGN_NAMES = {
    "certremove_budget_limit",
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
}
#: metrics added since the first design (docs/design.md "Metrics", README "Metrics")
EXTRA_NAMES = {
    "certremove_retrain_wait_seconds",
    "certremove_infrastructure_errors",
    "certremove_infrastructure_backoff_seconds",
    "certremove_entry_failures",
    "certremove_stream_trimmed_entries",
    "certremove_epoch_removals",
    "certremove_epoch_max_removals",
    "certremove_epoch_removals_ratio",
    "certremove_retrain_failures",
    "certremove_last_retrain_timestamp_seconds",
    "certremove_heartbeat_timestamp_seconds",
    "certremove_build",
    "certremove_releases",
    "certremove_release_failures",
    "certremove_last_release_timestamp_seconds",
    "certremove_unreleased_requests",
    "certremove_drain_phase_seconds",
    "certremove_background_refactors",
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


def test_every_retrain_reason_is_pre_initialised() -> None:
    reg = CollectorRegistry()
    ServiceMetrics(reg)
    for reason in ("max_removals", "budget", "numerical", "extractor"):
        assert reg.get_sample_value("certremove_retrains_total", {"reason": reason}) == 0


def test_extractor_gauge_only_with_an_extractor() -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    assert "certremove_extractor_removals_remaining" not in generate_latest(reg).decode()
    m.set_extractor_remaining(7)
    m.set_extractor_remaining(6)
    assert reg.get_sample_value("certremove_extractor_removals_remaining") == 6


def test_epoch_gauges_with_and_without_a_count_trigger() -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    m.set_epoch(25, 100)
    assert reg.get_sample_value("certremove_epoch_removals") == 25
    assert reg.get_sample_value("certremove_epoch_max_removals") == 100
    assert reg.get_sample_value("certremove_epoch_removals_ratio") == 0.25
    m.set_epoch(3, None)
    assert reg.get_sample_value("certremove_epoch_max_removals") == math.inf
    assert reg.get_sample_value("certremove_epoch_removals_ratio") == 0.0
    assert "certremove_epoch_max_removals +Inf" in generate_latest(reg).decode()


def test_retrain_failures_last_retrain_heartbeat_and_build_info() -> None:
    reg = CollectorRegistry()
    now = [1000.0]
    m = ServiceMetrics(reg, clock=lambda: now[0])
    assert reg.get_sample_value("certremove_last_retrain_timestamp_seconds") == 0
    assert reg.get_sample_value("certremove_heartbeat_timestamp_seconds") == 0
    m.on_retrain(None, 0.0)  # did not run
    assert reg.get_sample_value("certremove_last_retrain_timestamp_seconds") == 0
    m.on_retrain("max_removals", 1.5)
    assert reg.get_sample_value("certremove_last_retrain_timestamp_seconds") == 1000.0
    m.on_retrain_failure()
    assert reg.get_sample_value("certremove_retrain_failures_total") == 1
    now[0] = 1002.0
    m.beat()
    assert reg.get_sample_value("certremove_heartbeat_timestamp_seconds") == 1002.0
    m.set_build_info(version="1.2", torch="2.0", device="cpu", model="digits")
    labels = {"version": "1.2", "torch": "2.0", "device": "cpu", "model": "digits"}
    assert reg.get_sample_value("certremove_build_info", labels) == 1


def test_process_metrics_when_asked() -> None:
    reg = CollectorRegistry()
    ServiceMetrics(reg, process=True)
    assert reg.get_sample_value("process_start_time_seconds") is not None


def test_backlog_is_read_at_scrape_time(
    rclient: redis.Redis, broker_url: str, model_name: str
) -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg, clock=time.time)
    m.watch_backlog(rclient, model_name)
    assert reg.get_sample_value("certremove_backlog_stream_length") == 0
    Client(broker_url, model=model_name).enqueue_many([[1], [2], [3]])
    rclient.xadd(schema.dead_letter_key(model_name), {"request_id": "x", "reason": "r"})
    assert reg.get_sample_value("certremove_backlog_stream_length") == 3
    assert reg.get_sample_value("certremove_backlog_undelivered") == 3
    assert reg.get_sample_value("certremove_backlog_pending") == 0
    assert reg.get_sample_value("certremove_dead_letters") == 1
    age = reg.get_sample_value("certremove_backlog_oldest_age_seconds")
    assert age is not None and 0 <= age < 60


def test_a_redis_error_at_scrape_time_leaves_the_backlog_out() -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    m.model_version.set(3)
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    m.watch_backlog(nowhere, "m")
    text = generate_latest(reg).decode()  # the scrape goes on
    assert "certremove_model_version 3.0" in text
    assert "certremove_backlog" not in text and "certremove_dead_letters" not in text


def test_beating_while_a_blocking_retrain_runs() -> None:
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    with m.beating(0.05):
        time.sleep(0.2)
        first = reg.get_sample_value("certremove_heartbeat_timestamp_seconds")
        assert first is not None and first > 0
        time.sleep(0.2)
        assert reg.get_sample_value("certremove_heartbeat_timestamp_seconds") > first
    last = reg.get_sample_value("certremove_heartbeat_timestamp_seconds")
    time.sleep(0.2)  # the thread stopped with the block
    assert reg.get_sample_value("certremove_heartbeat_timestamp_seconds") == last


def test_pending_entries_of_a_trimmed_stream_are_still_pending(
    rclient: redis.Redis, broker_url: str, model_name: str
) -> None:
    # XTRIM MAXLEN 0 (or trimming past delivered entries) leaves an empty stream whose group
    # still holds delivered, unacknowledged entries: the worker will claim and answer them, so
    # they are pending work, not an empty backlog.
    key, group = schema.stream_key(model_name), schema.group_name(model_name)
    Client(broker_url, model=model_name).enqueue_many([[1], [2]])
    rclient.xgroup_create(key, group, id="0")
    rclient.xreadgroup(group, "w", {key: ">"}, count=2)
    rclient.xtrim(key, maxlen=0)
    reg = CollectorRegistry()
    ServiceMetrics(reg).watch_backlog(rclient, model_name)
    assert reg.get_sample_value("certremove_backlog_stream_length") == 0
    assert reg.get_sample_value("certremove_backlog_pending") == 2
    assert reg.get_sample_value("certremove_backlog_undelivered") == 0
    age = reg.get_sample_value("certremove_backlog_oldest_age_seconds")
    assert age is not None and 0 <= age < 60


def test_an_empty_stream_with_a_group_has_no_backlog(rclient: redis.Redis, model_name: str) -> None:
    key, group = schema.stream_key(model_name), schema.group_name(model_name)
    rclient.xgroup_create(key, group, id="$", mkstream=True)
    reg = CollectorRegistry()
    ServiceMetrics(reg).watch_backlog(rclient, model_name)
    for name in ("stream_length", "undelivered", "pending", "oldest_age_seconds"):
        assert reg.get_sample_value(f"certremove_backlog_{name}") == 0, name


def test_waiting_at_an_epoch_boundary_for_the_background_fit_keeps_beating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A drain that waits for the next epoch's background fit holds the event loop (minutes when
    # the fit started late): like a blocking retrain it is serving, so `certremove health` must
    # not call it wedged (an orchestrator would restart it and lose the fit).
    from worker import epochs

    monkeypatch.setattr(epochs, "WAIT_BEAT_S", 0.05, raising=False)
    reg = CollectorRegistry()
    m = ServiceMetrics(reg)
    m.beat()
    runner = epochs.NextEpoch(0.5, m)
    fut: Future[tuple[object, float]] = Future()
    model = object()
    runner._next = (fut, model)  # type: ignore[assignment]
    beats: list[float] = []

    def fit_ends_later() -> None:
        for _ in range(2):
            time.sleep(0.3)
            beats.append(reg.get_sample_value("certremove_heartbeat_timestamp_seconds") or 0.0)
        fut.set_result(("prepared", 1.0))

    threading.Thread(target=fit_ends_later, daemon=True).start()
    taken = runner.take(model)  # type: ignore[arg-type]
    assert taken is not None and taken[0] == "prepared"
    assert beats[1] > beats[0]


def test_drain_phases_are_pre_initialised_and_timed_also_when_a_phase_raises() -> None:
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    counts = {
        s.labels["phase"]: s.value
        for s in reg.collect()
        for s in s.samples
        if s.name == "certremove_drain_phase_seconds_count"
    }
    assert counts == dict.fromkeys(PHASES, 0.0)
    with metrics.phases.timed("plan"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), metrics.phases.timed("persist"):
        raise RuntimeError("disk full")
    metrics.phases.observe("step", 0.25)
    value = reg.get_sample_value
    assert value("certremove_drain_phase_seconds_count", {"phase": "plan"}) == 1
    assert 0.01 <= value("certremove_drain_phase_seconds_sum", {"phase": "plan"}) < 5
    assert value("certremove_drain_phase_seconds_count", {"phase": "persist"}) == 1
    assert value("certremove_drain_phase_seconds_sum", {"phase": "step"}) == 0.25
    assert value("certremove_drain_phase_seconds_count", {"phase": "answer"}) == 0
    with pytest.raises(KeyError):
        metrics.phases.observe("lunch", 1.0)  # a typo is an error, not a new series
