"""Releases and receipts end to end: producer -> Redis -> ``certremove worker`` subprocess ->
release directory, releases stream, statuses, receipts; the release client follows and predicts
as the model does (docs/operations.md "Releases and receipts")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import core
from producer import Client, schema
from producer.receipts import InvalidReceipt, matches_sample_ids, verify_receipt, without_salt
from producer.release_client import ReleaseClient, ReleaseIntegrityError
from tests.integration.conftest import StartWorker
from worker.launcher import REPO_ROOT
from worker.receipts import init_keys, read_receipts
from worker.releases import list_releases, read_latest

pytestmark = pytest.mark.integration


def digits_state(path: Path, max_removals: int = 40) -> Path:
    ds = core.load_dataset("digits")
    model = core.train(
        ds.X_train,
        ds.y_train,
        lam=1e-2,
        sigma=1.0,
        ids=ds.ids_train,
        device="cpu",
        seed=0,
        max_removals=max_removals,
    )
    model.save(path, dataset=ds)
    return path


def train_ids() -> list[int]:
    return [int(i) for i in core.load_dataset("digits").ids_train]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what or check}")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_epoch_policy_statuses_receipts_client_and_restart(
    tmp_path: Path, broker_url: str, model_name: str, start_worker_process: StartWorker
) -> None:
    state = digits_state(tmp_path / "state")
    rel = tmp_path / "public"
    priv, pub = init_keys(tmp_path / "keys")
    worker = start_worker_process(
        state, broker_url, model_name, release_dir=rel, receipt_key=priv
    )  # the default policy: epoch
    assert worker.settings.release_policy == "epoch"
    wait_for(lambda: read_latest(rel, model_name) == 1, what="the release at start")
    client = Client(broker_url, model=model_name)
    follower = ReleaseClient(client.redis, model_name, release_dir=rel, public_key=pub)
    assert follower.latest().number == 1

    ids = train_ids()[:150]
    rids: list[str] = []
    for start in range(0, len(ids), 10):  # several epochs (max_removals 40)
        rids += client.enqueue_many([[i] for i in ids[start : start + 10]])
        client.wait(rids[-10:], timeout=60)
    st = client.wait(rids, timeout=60)
    assert {s["status"] for s in st.values()} == {"applied"}
    manifests = list_releases(rel, model_name)
    versions = [m["model_version"] for m in manifests]
    assert len(manifests) >= 3, versions
    assert len(versions) == len(set(versions))  # never two releases of one noise epoch
    assert len({m["noise_epoch"] for m in manifests}) == len(manifests)
    stream = client.redis.xrange(schema.releases_key(model_name))
    assert [int(f[b"release"]) for _, f in stream] == [m["release"] for m in manifests]

    # a request gets the first release containing its removal
    st = client.statuses(rids)
    released = [s for s in st.values() if s.get("released_version")]
    assert released, "no request was released"
    by_number = {m["release"]: m for m in manifests}
    for s in released:
        assert by_number[s["released_version"]]["model_version"] >= s["model_version"]
        assert s["released_at"] >= s["applied_at"]

    # the follower sees the releases through the stream and predicts as the model did
    seen = [r.number for r in follower.follow(timeout=0.5)]
    assert seen == [m["release"] for m in manifests[1:]]
    latest = follower.current
    assert latest is not None and latest.number == manifests[-1]["release"]

    # receipts verify, and fail after any change; they name no sample id
    receipts = {r["request_id"]: r for r in read_receipts(state)}
    released_rids = [rid for rid, s in st.items() if s.get("released_version")]
    assert set(released_rids) <= set(receipts)
    pem = pub.read_bytes()
    rid0 = released_rids[0]
    r0 = receipts[rid0]
    verify_receipt(r0, pem)
    assert matches_sample_ids(r0, [ids[rids.index(rid0)]])
    assert r0["release"] == st[rid0]["released_version"]
    for name, value in r0.items():
        if name in ("signature", "salt"):  # the salt is kept beside the signed fields
            continue
        bad = {**r0, name: (value + 1) if isinstance(value, int | float) else f"{value}0"}
        with pytest.raises(InvalidReceipt):
            verify_receipt(bad, pem)
    receipt_file = tmp_path / "r.json"
    receipt_file.write_text(json.dumps(r0))
    ok = cli("receipt", "verify", str(receipt_file), "--public-key", str(pub))
    assert ok.returncode == 0 and ok.stdout.startswith("valid"), ok.stderr
    receipt_file.write_text(json.dumps({**r0, "release": r0["release"] + 1}))
    bad = cli("receipt", "verify", str(receipt_file), "--public-key", str(pub))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    shown = cli("receipt", "show", rid0, "--state", str(state))
    assert shown.returncode == 0 and json.loads(shown.stdout) == without_salt(r0)
    salted = cli("receipt", "show", rid0, "--state", str(state), "--with-salt")
    assert salted.returncode == 0 and json.loads(salted.stdout) == r0

    # a restart keeps every receipt, issues no second one, and does not release epoch again
    count = len(list(read_receipts(state)))
    worker.stop()
    worker2 = start_worker_process(state, broker_url, model_name, release_dir=rel, receipt_key=priv)
    time.sleep(1.0)
    assert len(list(read_receipts(state))) == count
    assert [m["release"] for m in list_releases(rel, model_name)] == list(by_number)
    more = client.enqueue_many([[i] for i in train_ids()[200:260]])  # another epoch at least
    client.wait(more, timeout=60)
    wait_for(
        lambda: len(list_releases(rel, model_name)) > len(manifests), what="a release after restart"
    )
    # its receipts are issued when it is announced, just after its files are written
    wait_for(lambda: len(list(read_receipts(state))) > count, what="receipts after restart")
    after = list(read_receipts(state))
    assert len({r["request_id"] for r in after}) == len(after) > count
    versions = [m["model_version"] for m in list_releases(rel, model_name)]
    assert len(versions) == len(set(versions))
    worker2.stop()

    # one byte changed in the weights or the manifest: refused
    newest = list_releases(rel, model_name)[-1]
    wpath = Path(newest["path"]) / "weights.safetensors"
    data = bytearray(wpath.read_bytes())
    data[len(data) // 2] ^= 0x01
    wpath.write_bytes(bytes(data))
    with pytest.raises(ReleaseIntegrityError):
        ReleaseClient(rel, model_name).latest()
    data[len(data) // 2] ^= 0x01
    wpath.write_bytes(bytes(data))
    ReleaseClient(rel, model_name, public_key=pub).latest()  # restored: verifies again
    mpath = Path(newest["path"]) / "manifest.json"
    text = mpath.read_text()
    i = text.index('"feature_dim": ') + len('"feature_dim": ')
    mpath.write_text(text[:i] + str(int(text[i]) ^ 1) + text[i + 1 :])
    with pytest.raises(ReleaseIntegrityError):
        ReleaseClient(rel, model_name).latest()


def test_every_interval_manual_and_predictions(
    tmp_path: Path, broker_url: str, model_name: str, start_worker_process: StartWorker
) -> None:
    rclient = redis.Redis.from_url(broker_url)
    # every: each persisted version; the client predicts as the persisted model
    state = digits_state(tmp_path / "every", max_removals=1000)
    rel = tmp_path / "pub-every"
    w = start_worker_process(state, broker_url, model_name, release_dir=rel, release_policy="every")
    client = Client(broker_url, model=model_name)
    for i in train_ids()[:3]:
        client.wait([client.enqueue([i])], timeout=30)
    wait_for(lambda: read_latest(rel, model_name) == 4, what="4 releases")
    w.stop()
    model = core.load_model(state, device="cpu")
    rc = ReleaseClient(rel, model_name)
    latest = rc.latest()
    assert latest.manifest["snapshot"] == model.save_seq
    X = model.dataset.X_test
    assert np.array_equal(rc.predict(X.numpy()), model.predict(X).numpy())
    assert rc.predict_proba(X.numpy()).argmax(1).tolist() == rc.predict(X.numpy()).tolist()
    assert len({m["noise_epoch"] for m in list_releases(rel, model_name)}) == 1

    # interval:2: at most one release per 2 s, the latest version once the interval ran out
    m2 = f"{model_name}i"
    state2 = digits_state(tmp_path / "interval", max_removals=1000)
    rel2 = tmp_path / "pub-interval"
    start_worker_process(state2, broker_url, m2, release_dir=rel2, release_policy="interval:2")
    c2 = Client(broker_url, model=m2)
    wait_for(lambda: read_latest(rel2, m2) == 1, what="the release at start")
    rids = []
    for i in train_ids()[:6]:
        rids.append(c2.enqueue([i]))
        time.sleep(0.3)
    c2.wait(rids, timeout=30)
    wait_for(
        lambda: all(s.get("released_version") for s in c2.statuses(rids).values()),
        timeout=15,
        what="every request released",
    )
    times = [m["created_at"] for m in list_releases(rel2, m2)]
    assert all(b - a >= 2.0 for a, b in zip(times, times[1:], strict=False)), times

    # manual: nothing until `certremove release`
    m3 = f"{model_name}m"
    state3 = digits_state(tmp_path / "manual", max_removals=1000)
    rel3 = tmp_path / "pub-manual"
    start_worker_process(state3, broker_url, m3, release_dir=rel3, release_policy="manual")
    c3 = Client(broker_url, model=m3)
    rid = c3.enqueue([train_ids()[7]])
    c3.wait([rid], timeout=30)
    time.sleep(0.5)
    assert read_latest(rel3, m3) is None
    out = cli("release", "--model", m3, "--broker-url", broker_url)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: read_latest(rel3, m3) == 1, what="the manual release")
    wait_for(lambda: c3.status(rid).get("released_version") == 1, what="the status")
    listed = cli("releases", "list", "--dir", str(rel3), "--model", m3, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["latest"] == 1
    entries = rclient.xrange(schema.releases_key(m3))
    assert [int(f[b"release"]) for _, f in entries] == [1]
