"""Releases and receipts on the removal service (a real core model, a real Redis; no Celery):
the policies, what each release covers, the client's verification, receipts, restarts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

import core
from producer import Client, schema
from producer.receipts import RECEIPT_FIELDS, InvalidReceipt, matches_sample_ids, verify_receipt
from producer.release_client import ReleaseClient, ReleaseIntegrityError
from tests.conftest import make_state
from worker.doorbell import Doorbell
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.receipts import ReceiptSigner, init_keys, read_receipts
from worker.release_gate import ReleaseOptions
from worker.releases import ReleasePolicy, list_releases, read_latest
from worker.service import RemovalService
from worker.stream import RequestStream


def _sent(name: str, queue: str) -> None:
    pass


def build(
    state: Path,
    rclient: redis.Redis,
    model_name: str,
    policy: str,
    release_dir: Path,
    key: Path | None = None,
    **kw: Any,
) -> RemovalService:
    signer = None if key is None else ReceiptSigner(key)
    return RemovalService(
        model=core.load_model(state, device="cpu"),
        state_dir=state,
        stream=RequestStream(rclient, model_name, "w1"),
        ledger=Ledger(rclient, model_name, state / "ledger.jsonl"),
        metrics=ServiceMetrics(CollectorRegistry()),
        doorbell=Doorbell(rclient, model_name, _sent),
        send_task=_sent,
        reload=lambda: core.load_model(state, device="cpu"),
        releases=ReleaseOptions(release_dir, ReleasePolicy.parse(policy), signer),
        **{"slice_seconds": 30.0, "retrain_lead": 0.0, **kw},
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 600 rows, a retrain every 20 removed rows
    return make_state(tmp_path_factory.mktemp("rel") / "state", max_removals=20)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return init_keys(tmp_path / "keys")


def serve_all(service: RemovalService) -> None:
    for _ in range(20):
        service.drain()
        if service.retrain_due:
            service.retrain()
        elif not service.stream.has_work():
            return


def test_policy_parse() -> None:
    assert str(ReleasePolicy.parse("interval:2.5")) == "interval:2.5"
    assert ReleasePolicy.parse(" EPOCH ").kind == "epoch"
    for bad in ("sometimes", "interval:", "interval:0", "interval:-1", "interval:x"):
        with pytest.raises(ValueError):
            ReleasePolicy.parse(bad)


def test_every_releases_each_persisted_version(
    template: Path, tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "every", rel)
    assert read_latest(rel, model_name) == 1  # the trained model, at start
    client = Client(broker_url, model=model_name)
    for i in range(3):
        rid = client.enqueue([i])
        service.drain()
        assert client.status(rid)["released_version"] == 2 + i
    manifests = list_releases(rel, model_name)
    assert [m["release"] for m in manifests] == [1, 2, 3, 4]
    assert len({m["noise_epoch"] for m in manifests}) == 1  # one noise draw: the leak of every
    assert [m["rows_removed_since_training"] for m in manifests] == [0, 1, 2, 3]
    entries = rclient.xrange(schema.releases_key(model_name))
    assert [int(f[b"release"]) for _, f in entries] == [1, 2, 3, 4]


def test_epoch_releases_once_per_noise_epoch_and_statuses(
    template: Path, tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "epoch", rel)
    client = Client(broker_url, model=model_name)
    first = client.enqueue([0, 1])
    service.drain()
    assert "released_version" not in client.status(first)  # epoch 1 is out already (start)
    assert read_latest(rel, model_name) == 1
    rids = [client.enqueue([i]) for i in range(2, 40)]  # past max_removals: retrains
    serve_all(service)
    manifests = list_releases(rel, model_name)
    versions = [m["model_version"] for m in manifests]
    assert len(versions) == len(set(versions)) >= 2, versions  # never two of one epoch
    assert len({m["noise_epoch"] for m in manifests}) == len(manifests)
    st = client.statuses([first, *rids])
    released = {rid: s.get("released_version") for rid, s in st.items()}
    assert released[first] == 2  # the first release after its removal
    # every request released is in a release whose version is at least the one that applied it
    by_number = {m["release"]: m for m in manifests}
    for s in st.values():
        if s.get("released_version") is not None:
            assert by_number[s["released_version"]]["model_version"] >= s["model_version"]
            assert s["released_at"] >= s["applied_at"]
    # the model of the latest release predicts as the persisted model
    model = core.load_model(state, device="cpu")
    rc = ReleaseClient(rel, model_name)
    latest = rc.latest()
    if latest.model_version == model.version:
        X = model.dataset.X_test
        assert np.array_equal(rc.predict(X.numpy()), model.predict(X).numpy())


def test_interval_and_manual(
    template: Path, tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    now = [1000.0]
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "interval:60", rel, clock=lambda: now[0])
    client = Client(broker_url, model=model_name)
    assert read_latest(rel, model_name) == 1
    a = client.enqueue([0])
    service.drain()
    assert read_latest(rel, model_name) == 1  # within the interval
    now[0] += 61
    service.release_tick()
    assert read_latest(rel, model_name) == 2
    assert client.status(a)["released_version"] == 2
    now[0] += 61
    service.release_tick()
    assert read_latest(rel, model_name) == 2  # nothing new to release
    service.close()

    state2 = Path(shutil.copytree(template, tmp_path / "state2"))
    rel2 = tmp_path / "releases2"
    m2 = f"{model_name}m"
    manual = build(state2, rclient, m2, "manual", rel2)
    c2 = Client(broker_url, model=m2)
    assert read_latest(rel2, m2) is None  # manual: not even at start
    b = c2.enqueue([0])
    manual.drain()
    assert read_latest(rel2, m2) is None
    rclient.set(schema.release_request_key(m2), "1")
    manual.release_tick()
    assert read_latest(rel2, m2) == 1
    assert c2.status(b)["released_version"] == 1
    assert rclient.get(schema.release_request_key(m2)) is None


def test_failed_release_loses_nothing(
    template: Path, tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    rel.write_text("not a directory")  # every release fails
    service = build(state, rclient, model_name, "every", rel)
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([3])
    service.drain()
    assert client.status(rid)["status"] == "applied"  # removals go on
    assert service.releaser is not None and service.releaser.failures >= 2
    reg = service.metrics.registry
    assert reg.get_sample_value("certremove_release_failures_total") == service.releaser.failures
    assert reg.get_sample_value("certremove_releases_total") == 0
    assert reg.get_sample_value("certremove_unreleased_requests") == 1  # applied, not released
    rel.unlink()
    rid2 = client.enqueue([4])
    service.drain()
    st = client.statuses([rid, rid2])
    assert st[rid]["released_version"] == st[rid2]["released_version"] == 1
    assert reg.get_sample_value("certremove_releases_total") == 1
    assert reg.get_sample_value("certremove_unreleased_requests") == 0
    assert reg.get_sample_value("certremove_last_release_timestamp_seconds") > 0


def test_receipts_and_tampering(
    template: Path,
    tmp_path: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    keys: tuple[Path, Path],
) -> None:
    priv, pub = keys
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "every", rel, key=priv)
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([5, 7, 999_999])  # 999999 is unknown: not removed
    service.drain()
    receipts = list(read_receipts(state))
    assert [r["request_id"] for r in receipts] == [rid]
    r = receipts[0]
    pem = pub.read_bytes()
    verify_receipt(r, pem)
    assert r["release"] == 2 and r["method"] == "newton" and r["requested_at"] is not None
    assert matches_sample_ids(r, [7, "5"]) and not matches_sample_ids(r, [5])
    assert set(r) == {*RECEIPT_FIELDS, "salt"}  # no sample id, only the salted digest
    for name in RECEIPT_FIELDS:  # every signed field (the salt beside them is not signed)
        if name in ("signature",):
            continue
        changed = dict(r)
        value = changed[name]
        changed[name] = (value + 1) if isinstance(value, int | float) else f"{value}x"
        with pytest.raises(InvalidReceipt):
            verify_receipt(changed, pem)
    # a restart issues no second receipt and keeps the first
    service.close()
    service2 = build(state, rclient, model_name, "every", rel, key=priv)
    assert [x["request_id"] for x in read_receipts(state)] == [rid]
    rid2 = client.enqueue([8])
    service2.drain()
    assert [x["request_id"] for x in read_receipts(state)] == [rid, rid2]

    # the client verifies the signed manifest and refuses tampered releases
    rc = ReleaseClient(rel, model_name, public_key=pub)
    latest = rc.latest()
    model = core.load_model(state, device="cpu")
    X = model.dataset.X_test
    assert np.array_equal(rc.predict(X.numpy()), model.predict(X).numpy())
    proba = rc.predict_proba(X.numpy())
    assert proba.shape == (len(X), 2) and np.allclose(proba.sum(1), 1)
    weights = latest.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ReleaseIntegrityError):
        ReleaseClient(rel, model_name).latest()
    manifest_path = list_releases(rel, model_name)[0]["path"]
    mpath = Path(manifest_path) / "manifest.json"
    mpath.write_text(mpath.read_text().replace('"certified": false', '"certified": true'))
    with pytest.raises(ReleaseIntegrityError):
        ReleaseClient(rel, model_name).load(1)


def test_one_vs_rest_digits_predictions(
    tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    ds = core.load_dataset("digits")
    model = core.train(
        ds.X_train, ds.y_train, lam=1e-2, sigma=1.0, ids=ds.ids_train, device="cpu", seed=0
    )
    state = tmp_path / "state"
    model.save(state, dataset=ds)
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "epoch", rel)
    rc = ReleaseClient(rel, model_name)
    X = ds.X_test
    assert np.array_equal(rc.predict(X.numpy()), service.model.predict(X).numpy())
    proba = rc.predict_proba(X.numpy())
    assert proba.shape == (len(X), 10)
    assert np.array_equal(proba.argmax(1), rc.predict(X.numpy()))
    assert rc.latest().manifest["input"]["normalisation"] == "none"
    with pytest.raises(ValueError):
        rc.predict(torch.zeros(3, 5).numpy())


def test_unreleased_requests_survive_a_restart(
    template: Path,
    tmp_path: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    keys: tuple[Path, Path],
) -> None:
    """Under ``epoch`` the requests of an epoch wait for the next retrain's release; a restart in
    between reads them back from the ledger (one line of several requests: ``xn``)."""
    priv, pub = keys
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "epoch", rel, key=priv)
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[10, 11], [12], [13, 14, 15]])  # one batch, one ledger line
    service.drain()
    lines = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
    assert lines[-1]["xn"] == [2, 1, 3]
    assert list(read_receipts(state)) == []
    service.close()
    service = build(state, rclient, model_name, "epoch", rel, key=priv)
    assert read_latest(rel, model_name) == 1  # same epoch: no second release
    more = client.enqueue_many([[i] for i in range(20, 40)])  # past max_removals: a retrain
    serve_all(service)
    assert read_latest(rel, model_name) >= 2
    st = client.statuses(rids)
    assert {s["released_version"] for s in st.values()} == {2}
    got = {r["request_id"]: r for r in read_receipts(state)}
    pem = pub.read_bytes()
    for rid, ids in zip(rids, [[10, 11], [12], [13, 14, 15]], strict=True):
        verify_receipt(got[rid], pem)
        assert matches_sample_ids(got[rid], ids)
    assert all(client.status(r).get("released_version") for r in more[:5])


def test_a_release_without_its_record_still_counts_for_its_epoch(
    template: Path, tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    """A crash (or a full disk) between the release's rename and its record: the release is
    public, so ``epoch`` must not release that noise epoch again."""
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "epoch", rel)
    assert read_latest(rel, model_name) == 1
    service.close()
    (state / "releases.jsonl").write_text("")  # the record is lost
    client = Client(broker_url, model=model_name)
    service = build(state, rclient, model_name, "epoch", rel)
    rid = client.enqueue([1])
    service.drain()
    assert [m["release"] for m in list_releases(rel, model_name)] == [1]  # not again
    assert "released_version" not in client.status(rid)
    serve_all(service)
    more = client.enqueue_many([[i] for i in range(2, 30)])  # a retrain: the next epoch
    serve_all(service)
    assert read_latest(rel, model_name) == 2
    assert client.status(rid)["released_version"] == 2
    assert client.status(more[0])["released_version"] == 2


def test_a_crash_before_the_announced_line_announces_nothing_twice(
    template: Path,
    tmp_path: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    keys: tuple[Path, Path],
) -> None:
    """A crash after a release's stream entry, statuses and receipts but before its
    ``announced`` line: the restart finishes the announcement without a second stream entry,
    status change or receipt."""
    priv, _pub = keys
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "every", rel, key=priv)
    client = Client(broker_url, model=model_name)
    rid = client.enqueue([5])
    service.drain()
    service.close()
    status = client.status(rid)
    assert status["released_version"] == 2
    record = state / "releases.jsonl"
    lines = record.read_text().splitlines()
    assert json.loads(lines[-1]) == {"announced": 2}
    record.write_text("\n".join(lines[:-1]) + "\n")  # the crash came before that line
    build(state, rclient, model_name, "every", rel, key=priv)
    entries = rclient.xrange(schema.releases_key(model_name))
    assert [int(f[b"release"]) for _, f in entries] == [1, 2]  # not announced twice
    assert [r["request_id"] for r in read_receipts(state)] == [rid]
    assert client.status(rid)["released_at"] == status["released_at"]
    assert json.loads(record.read_text().splitlines()[-1]) == {"announced": 2}


@pytest.mark.parametrize("name", [".", "..", "..."])
def test_a_model_name_of_dots_never_names_a_release_path(tmp_path: Path, name: str) -> None:
    """``..`` would put a model's releases (and its LATEST) in the release directory's
    parent, ``.`` in the release directory itself."""
    from worker.releases import model_release_dir  # noqa: PLC0415

    with pytest.raises(ValueError):
        schema.check_model_name(name)
    with pytest.raises(ValueError):
        model_release_dir(tmp_path, name)
    with pytest.raises(ValueError):
        ReleaseClient(tmp_path, name)
    assert schema.check_model_name("a.b..c") == "a.b..c"


def test_a_release_whose_record_failed_still_covers_its_requests(
    template: Path,
    tmp_path: Path,
    rclient: redis.Redis,
    model_name: str,
    broker_url: str,
    keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record of a release could not be written (full disk, or a crash after the rename):
    the release found on disk is the persisted state, so it is the first release that excludes
    the requests applied since the previous one: their statuses and receipts name it."""
    from worker.releases import ReleaseRecords  # noqa: PLC0415

    priv, pub = keys
    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "every", rel, key=priv)
    client = Client(broker_url, model=model_name)
    real_append = ReleaseRecords.append

    def failing(self: ReleaseRecords, rec: dict[str, Any]) -> None:
        if "announced" not in rec:
            raise OSError(28, "No space left on device")
        real_append(self, rec)

    monkeypatch.setattr(ReleaseRecords, "append", failing)
    rid = client.enqueue([6])
    service.drain()  # release 2 is written, its record is not
    assert [m["release"] for m in list_releases(rel, model_name)] == [1, 2]
    assert "released_version" not in client.status(rid)
    service.close()
    monkeypatch.setattr(ReleaseRecords, "append", real_append)
    build(state, rclient, model_name, "every", rel, key=priv)  # a restart adopts release 2
    assert [m["release"] for m in list_releases(rel, model_name)] == [1, 2]  # not released again
    assert client.status(rid)["released_version"] == 2
    (receipt,) = read_receipts(state)
    verify_receipt(receipt, pub.read_bytes())
    assert receipt["request_id"] == rid and receipt["release"] == 2


def test_following_the_stream_misses_no_release_announced_during_the_first(
    tmp_path: Path, rclient: redis.Redis, model_name: str
) -> None:
    """A release announced while the follower's caller still holds the first one it was given
    (loading it, swapping it in) is the next one the follower yields."""
    from worker.releases import release_path, write_release  # noqa: PLC0415

    rel = tmp_path / "releases"
    manifest = {"model": model_name, "model_version": 1, "classes": [0, 1], "feature_dim": 3}
    manifest["weights"] = {"shape": [3]}

    def announce(number: int) -> None:
        write_release(
            rel, model_name, number, np.full(3, float(number)), {**manifest, "release": number}
        )
        path = str(release_path(rel, model_name, number))
        rclient.xadd(schema.releases_key(model_name), {"release": str(number), "path": path})

    announce(1)
    follower = ReleaseClient(rclient, model_name).follow(timeout=2.0)
    assert next(follower).number == 1
    announce(2)  # while the caller works with release 1
    assert [r.number for r in follower] == [2]


def test_epoch_releases_background_epochs_once_each(
    template: Path, tmp_path: Path, rclient: redis.Redis, model_name: str, broker_url: str
) -> None:
    """Noise epochs fitted in the background (``retrain_lead``) and adopted between batches are
    released once each, like retrains; a restart releases none of them again."""
    import time  # noqa: PLC0415

    state = Path(shutil.copytree(template, tmp_path / "state"))
    rel = tmp_path / "releases"
    service = build(state, rclient, model_name, "epoch", rel, retrain_lead=0.5)
    client = Client(broker_url, model=model_name)
    rids = []
    for i in range(45):
        rids.append(client.enqueue([i]))
        service.drain()
        if service.retrain_due:
            service.retrain()
        time.sleep(0.05)  # lets a background fit finish now and then
    serve_all(service)
    manifests = list_releases(rel, model_name)
    versions = [m["model_version"] for m in manifests]
    assert len(versions) >= 3 and len(set(versions)) == len(versions), versions
    assert len({m["noise_epoch"] for m in manifests}) == len(manifests)
    service.close()
    build(state, rclient, model_name, "epoch", rel, retrain_lead=0.5)
    assert [m["model_version"] for m in list_releases(rel, model_name)] == versions
    by_number = {m["release"]: m for m in manifests}
    for s in client.statuses(rids).values():
        if s.get("released_version") is not None:
            assert by_number[s["released_version"]]["model_version"] >= s["model_version"]
