"""A model on DP-extractor features (tiny MNIST IDX files): past the extractor's group privacy the
worker runs a full-pipeline retrain (extractor, features, head) without the removed rows, or,
when the operator disabled it, rejects with a reason. Real Redis, real core, no Celery."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

import core
from core.extractor import config_for, extract_dataset, train_extractor, write_feature_dataset
from core.images import load_split_with_ids
from core.pipeline import retrain_pipeline
from producer import Client
from tests.core.fixtures_images import write_mnist_idx
from tests.worker.test_service import Sent
from worker.doorbell import Doorbell
from worker.ledger import Ledger
from worker.metrics import ServiceMetrics
from worker.service import RemovalService
from worker.settings import Settings
from worker.stream import RequestStream


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = write_mnist_idx(tmp_path_factory.mktemp("mnist"), n_train=160, n_test=40)
    images, labels, _ = load_split_with_ids("mnist", root, train=True)
    trained = train_extractor(images, labels, config_for("mnist", num_filters=4, groups=2),
                              delta=1e-5, epochs=1, noise_multiplier=1.0, max_grad_norm=1.0,
                              batch_size=32, seed=0, progress=False, device="cpu")  # fmt: skip
    path = tmp_path_factory.mktemp("features") / "features.npz"
    write_feature_dataset(path, **extract_dataset(trained, "mnist", root))
    return root, path


def make_service(state: Path, features: Path, rclient: redis.Redis, model_name: str, pipeline):
    ds = core.load_dataset(str(features))
    eps_dp = float(ds.meta["dp_epsilon"])
    model = core.train(ds.X_train, ds.y_train, lam=1e-2, sigma=1.0, seed=0, max_removals=None,
                       ids=ds.ids_train, extractor_dp=(eps_dp, float(ds.meta["dp_delta"])),
                       extractor_limit=(3.5 * eps_dp, 0.5))  # three rows  # fmt: skip
    model.save(state, dataset=ds)
    sent = Sent()
    service = RemovalService(
        model=core.load_model(state, device="cpu"), state_dir=state,
        stream=RequestStream(rclient, model_name, "w1"),
        ledger=Ledger(rclient, model_name, state / "ledger.jsonl"),
        metrics=ServiceMetrics(CollectorRegistry()), doorbell=Doorbell(rclient, model_name, sent),
        send_task=sent, slice_seconds=30.0, pipeline=pipeline,
        pipeline_off_reason="the operator disabled full-pipeline retrains",
    )  # fmt: skip
    return service, sent, ds


def test_full_pipeline_retrain_when_the_extractor_is_spent(
    tmp_path: Path, features, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    root, path = features
    runs: list[list[int]] = []

    def pipeline(model, rows):
        runs.append(list(rows))
        return retrain_pipeline(model, data_dir=root, pending_rows=rows, device="cpu", seed=5)

    service, sent, ds = make_service(tmp_path / "state", path, rclient, model_name, pipeline)
    ids = [int(i) for i in ds.ids_train[:6]]
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[i] for i in ids])
    service.drain()
    assert service.retrain_due == "extractor" and "certremove.retrain" in sent.names()
    report = service.retrain()
    assert report.retrained and len(runs) == 1 and len(runs[0]) == 3
    st = client.statuses(rids)
    assert [st[r]["method"] for r in rids] == ["newton"] * 3 + ["retrain"] * 3
    assert {st[r]["status"] for r in rids} == {"applied"}
    assert int(st[rids[-1]]["model_version"]) == 2
    loaded = core.load_model(tmp_path / "state", device="cpu")
    assert loaded.version == 2 and loaded.extractor_removed == 0
    assert not set(ids) & set(loaded.ids.tolist())  # every removed row is out of the new data
    assert loaded.dataset.meta["excluded_ids"] == sorted(ids)
    assert service.model.extractor_removals_remaining == 3


def test_requests_past_the_extractor_are_rejected_when_disabled(
    tmp_path: Path, features, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    _, path = features
    service, sent, ds = make_service(tmp_path / "state", path, rclient, model_name, None)
    client = Client(broker_url, model=model_name)
    rids = client.enqueue_many([[int(i)] for i in ds.ids_train[:5]])
    service.drain()
    st = client.statuses(rids)
    assert [st[r]["status"] for r in rids] == ["applied"] * 3 + ["rejected"] * 2
    assert all("operator disabled" in st[r]["reason"] for r in rids[3:])
    assert not service.retrain_due and "certremove.retrain" not in sent.names()


def test_pipeline_settings_from_env(tmp_path: Path) -> None:
    s = Settings.from_env(
        {"CERTREMOVE_DATA_DIR": str(tmp_path), "CERTREMOVE_PIPELINE_RETRAIN": "no"}
    )
    assert s.data_dir == tmp_path and s.pipeline_retrain is False
    assert Settings.from_env({}).pipeline_retrain is True
    with pytest.raises(ValueError, match="PIPELINE_RETRAIN"):
        Settings.from_env({"CERTREMOVE_PIPELINE_RETRAIN": "maybe"})
    again = Settings.from_env(s.to_env())
    assert again.data_dir == tmp_path and again.pipeline_retrain is False
