"""Full-pipeline retrain on tiny MNIST IDX files: extractor, features and head without the
removed rows, replacing the dataset in the state directory."""

from __future__ import annotations

import numpy as np
import pytest

import core
from core.extractor import config_for, extract_dataset, train_extractor, write_feature_dataset
from core.images import load_split_with_ids
from core.pipeline import retrain_pipeline
from tests.core.fixtures_images import write_mnist_idx


@pytest.fixture(scope="module")
def feature_state(tmp_path_factory):
    root = write_mnist_idx(tmp_path_factory.mktemp("mnist"), n_train=160, n_test=40)
    images, labels, _ = load_split_with_ids("mnist", root, train=True)
    trained = train_extractor(
        images,
        labels,
        config_for("mnist", num_filters=4, groups=2),
        delta=1e-5,
        epochs=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=32,
        seed=0,
        progress=False,
        device="cpu",
    )
    path = tmp_path_factory.mktemp("feat") / "features.npz"
    write_feature_dataset(path, **extract_dataset(trained, "mnist", root))
    return root, core.load_dataset(str(path))


def test_pipeline_retrain_excludes_every_removed_row(tmp_path, feature_state):
    root, ds = feature_state
    model = core.train(
        ds.X_train,
        ds.y_train,
        lam=1e-2,
        sigma=1.0,
        seed=0,
        max_removals=None,
        ids=ds.ids_train,
        extractor_dp=(ds.meta["dp_epsilon"], ds.meta["dp_delta"]),
        extractor_limit=(100.0, 0.5),
    )
    model.save(tmp_path, dataset=ds)
    res = model.remove([0, 1, 2])
    assert res.applied
    new_ds, new = retrain_pipeline(model, data_dir=root, pending_rows=[5], seed=1, device="cpu")
    removed = {int(model.ids[r]) for r in (0, 1, 2, 5)}
    assert not removed & set(new_ds.ids_train.tolist())
    assert len(new_ds.ids_train) == len(ds.ids_train) - 4
    assert new_ds.meta["excluded_ids"] == sorted(removed)
    assert new.version == model.version + 1 and new.extractor_removed == 0
    new.save(tmp_path, replace_dataset=True)
    loaded = core.load_model(tmp_path)
    assert loaded.n_rows == len(ds.ids_train) - 4
    rows, unknown = loaded.rows_for_ids(sorted(removed))
    assert rows == [] and unknown == sorted(removed)
    # a second pipeline retrain keeps the earlier exclusions
    _, again = retrain_pipeline(loaded, data_dir=root, pending_rows=[0], seed=2, device="cpu")
    assert again.dataset.meta["excluded_ids"] == sorted(removed | {int(loaded.ids[0])})


def test_pipeline_retrain_needs_extractor_meta(digits):
    m = core.train(digits.X_train, digits.y_train, lam=1e-2, sigma=1.0, seed=0, max_removals=None)
    m.dataset = digits
    with pytest.raises(ValueError, match="extractor"):
        retrain_pipeline(m, data_dir=".")
    assert np.isfinite(m.budget_used)
