"""End to end: producer -> Redis -> ``certremove worker`` subprocess -> core.

The path of docs/design.md "Request life cycle".
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

import core
from producer import Client, schema
from tests.conftest import make_state
from tests.integration.conftest import StartWorker, make_settings, run_to_exit
from worker.launcher import metrics_text

pytestmark = pytest.mark.integration


def removed_ids(state: Path) -> set[int]:
    model = core.load_model(state, device="cpu")
    return {int(model.ids[i]) for i in (~model.alive).nonzero().flatten().tolist()}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text(port)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ledger_ids(state: Path) -> list[str]:
    lines = (state / "ledger.jsonl").read_text().splitlines()
    return [rid for line in lines for rid in json.loads(line)["ids"]]


@pytest.fixture(scope="module")
def big_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_state(tmp_path_factory.mktemp("big") / "state", n=2000, d=8, max_removals=1500)


def test_500_requests_bad_input_celery_client_and_metrics(
    big_template: Path,
    tmp_path: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,
) -> None:
    state = Path(shutil.copytree(big_template, tmp_path / "state"))
    worker = start_worker_process(state, broker_url, model_name)
    client = Client(broker_url, model=model_name)

    # 500 single-id requests, sent in pipelined chunks while the worker drains
    ids = list(range(500))
    rids = []
    for start in range(0, 500, 50):
        rids += client.enqueue_many([[i] for i in ids[start : start + 50]])
    st = client.wait(rids, timeout=60)
    assert [s["status"] for s in st.values()] == ["applied"] * 500
    assert {s["method"] for s in st.values()} == {"newton"}
    assert removed_ids(state) == set(ids)

    # bad input is answered and the worker keeps running
    key = schema.stream_key(model_name)
    redis_ = client.redis
    dup = client.enqueue([1000], request_id=rids[0])
    unknown = client.enqueue([600, 987_654])
    gone = client.enqueue([5, 601])
    empty = client.enqueue([])
    big = client.enqueue(list(range(10_001)))
    redis_.xadd(key, {"request_id": "malformed-1", "sample_ids": "not json"})
    redis_.xadd(key, {"request_id": "malformed-2", "sample_ids": '{"a": 1}'})
    redis_.xadd(key, {"sample_ids": "[602]"})
    client.ring()
    bad = [unknown, gone, empty, big, "malformed-1", "malformed-2"]
    st2 = client.wait(bad, timeout=30)
    assert st2[unknown]["status"] == "applied" and st2[unknown]["unknown_ids"] == [987_654]
    assert st2[gone]["status"] == "applied" and st2[gone]["already_removed_ids"] == [5]
    for rid, word in [
        (empty, "empty"),
        (big, "oversized"),
        ("malformed-1", "JSON"),
        ("malformed-2", "list"),
    ]:
        assert st2[rid]["status"] == "rejected" and word in st2[rid]["reason"], st2[rid]
    assert client.status(dup)["method"] == "newton"  # the repeat changed nothing

    # a plain Celery client enqueues through certremove.remove
    plain = Celery(broker=broker_url)
    plain.conf.update(task_serializer="json", accept_content=["json"])
    plain.send_task(
        "certremove.remove",
        kwargs={"request_id": "celery-1", "sample_ids": [700, 701], "requested_at": time.time()},
        queue=f"certremove.{model_name}",
    )
    assert client.wait(["celery-1"], timeout=30)["celery-1"]["status"] == "applied"
    plain.close()

    # an entry appended without ringing is found by the periodic check (every 2 s here)
    redis_.xadd(
        key, {"request_id": "silent", "sample_ids": "[702]", "requested_at": repr(time.time())}
    )
    assert client.wait(["silent"], timeout=15)["silent"]["status"] == "applied"

    time.sleep(0.3)
    assert removed_ids(state) == set(ids) | {600, 601, 700, 701, 702}
    assert len(redis_.xrange(schema.dead_letter_key(model_name))) == 1
    assert 1000 not in removed_ids(state)

    # the metrics endpoint agrees with the statuses
    m = scrape(worker.port)
    assert m[("certremove_requests_total", (("outcome", "applied"),))] == 500 + 2 + 1 + 1
    assert m[("certremove_requests_total", (("outcome", "rejected"),))] == 4
    assert m[("certremove_requests_total", (("outcome", "duplicate"),))] == 1
    assert m[("certremove_removals_total", (("method", "newton"),))] == 505
    assert m[("certremove_training_samples", ())] == 2000 - 505
    assert 0 <= m[("certremove_budget_used", ())] <= m[("certremove_budget_limit", ())]
    assert m[("certremove_request_latency_seconds_count", ())] == 504
    assert 0 < m[("certremove_test_accuracy", ())] <= 1
    assert worker.proc.poll() is None


def _send_in_waves(client: Client, n: int) -> list[str]:
    rids: list[str] = []
    for start in range(0, n, 30):
        rids += client.enqueue_many([[i] for i in range(start, start + 30)])
        time.sleep(0.3)
    return rids


def test_small_max_removals_forces_retrains_folding_pending_requests(
    tmp_path: Path, broker_url: str, model_name: str, start_worker_process: StartWorker
) -> None:
    """Background retrains off: each retrain blocks and folds the pending requests in."""
    state = make_state(tmp_path / "state", n=800, d=8, max_removals=25)
    start_worker_process(state, broker_url, model_name, retrain_lead=0.0)
    client = Client(broker_url, model=model_name)
    rids = _send_in_waves(client, 150)
    st = client.wait(rids, timeout=90)
    assert [s["status"] for s in st.values()] == ["applied"] * 150
    methods = [s["method"] for s in st.values()]
    assert "retrain" in methods and "newton" in methods
    versions = [s["model_version"] for s in st.values()]
    assert max(versions) >= 2 and versions == sorted(versions)  # versions never go back
    assert removed_ids(state) == set(range(150))
    assert sorted(ledger_ids(state)) == sorted(rids)  # each request answered exactly once


def test_background_retrains_take_over_with_a_catch_up_step(
    tmp_path: Path, broker_url: str, model_name: str, start_worker_process: StartWorker
) -> None:
    """Default: the next epoch fits in the background and takes over at the count; every request
    is a Newton step, versions climb, nothing is applied twice, the budget holds."""
    state = make_state(tmp_path / "state", n=800, d=8, max_removals=25)
    worker = start_worker_process(state, broker_url, model_name)
    client = Client(broker_url, model=model_name)
    rids = _send_in_waves(client, 150)
    st = client.wait(rids, timeout=90)
    assert [s["status"] for s in st.values()] == ["applied"] * 150
    assert {s["method"] for s in st.values()} == {"newton"}
    versions = [s["model_version"] for s in st.values()]
    assert versions == sorted(versions) and max(versions) >= 1 + 150 // 25 - 1
    assert removed_ids(state) == set(range(150))
    assert sorted(ledger_ids(state)) == sorted(rids)
    m = scrape(worker.port)
    assert m[("certremove_retrains_total", (("reason", "max_removals"),))] >= 5
    assert m[("certremove_removals_total", (("method", "newton"),))] == 150
    assert m[("certremove_removals_total", (("method", "retrain"),))] == 0
    assert m[("certremove_retrain_wait_seconds_count", ())] >= 5
    assert m[("certremove_model_version", ())] == max(versions)
    assert 0 <= m[("certremove_budget_used", ())] <= m[("certremove_budget_limit", ())]
    loaded = core.load_model(state, device="cpu")
    assert loaded.version == max(versions) and loaded.removed_in_epoch <= loaded.max_removals


def test_sigkill_mid_stream_then_restart_applies_everything_once(
    big_template: Path,
    tmp_path: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,
) -> None:
    state = Path(shutil.copytree(big_template, tmp_path / "state"))
    worker = start_worker_process(state, broker_url, model_name, max_batch=10)
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in range(1200)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.status(rids[50]).get("status") != "applied":
        time.sleep(0.005)
    worker.stop(kill=True)
    done = sum(1 for s in client.statuses(rids).values() if s["status"] == "applied")
    assert 0 < done < 1200, "the kill should land mid-stream"
    start_worker_process(state, broker_url, model_name, max_batch=200)
    st = client.wait(rids, timeout=90)
    assert [s["status"] for s in st.values()] == ["applied"] * 1200
    assert removed_ids(state) == set(range(1200))
    answered = ledger_ids(state)
    assert len(answered) == len(set(answered)) == 1200  # exactly once


def test_a_second_worker_on_the_same_state_refuses_to_start(
    state: Path,
    tmp_path: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,
) -> None:
    """Two workers persisting one state directory would undo each other's removals."""
    first = start_worker_process(state, broker_url, model_name)
    settings = make_settings(state, broker_url, model_name, consumer=f"{model_name}-second")
    code, text, _ = run_to_exit(settings, tmp_path / "second.log", timeout=60)
    assert code != 0
    assert "another worker" in text and f"pid {first.proc.pid}" in text
    client = Client(broker_url, model=model_name)  # the first one still serves
    rid = client.enqueue([3])
    assert client.wait([rid], timeout=30)[rid]["status"] == "applied"
    first.stop(kill=True)  # the lock goes with the process, also on SIGKILL
    start_worker_process(state, broker_url, model_name)
    rid = client.enqueue([4])
    assert client.wait([rid], timeout=30)[rid]["status"] == "applied"


def test_two_models_share_one_redis(
    small_state_template: Path,
    tmp_path: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,
) -> None:
    states = {}
    for suffix in ("a", "b"):
        states[suffix] = Path(shutil.copytree(small_state_template, tmp_path / suffix))
        start_worker_process(states[suffix], broker_url, f"{model_name}{suffix}")
    rids = {
        "a": Client(broker_url, model=f"{model_name}a").enqueue_many([[i] for i in range(0, 40)]),
        "b": Client(broker_url, model=f"{model_name}b").enqueue_many([[i] for i in range(20, 60)]),
    }
    for suffix, ids in (("a", range(0, 40)), ("b", range(20, 60))):
        st = Client(broker_url, model=f"{model_name}{suffix}").wait(rids[suffix], timeout=30)
        assert {s["status"] for s in st.values()} == {"applied"}
        assert removed_ids(states[suffix]) == set(ids)
