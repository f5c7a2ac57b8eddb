"""DP feature extractor (Opacus), its dataset files, group privacy and the extractor CLI.

Everything runs on CPU on tiny MNIST IDX / SVHN .mat files written by the tests.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from core.errors import InvalidInputError
from core.extractor import (
    NORM_SCALE,
    check_dp_compatible,
    config_for,
    extract_dataset,
    extract_features,
    load_extractor,
    save_extractor,
    train_extractor,
    write_feature_dataset,
)
from core.group_privacy import (
    combined_guarantee,
    extractor_removals_allowed,
    extractor_removals_remaining,
    group_privacy,
)
from core.images import load_mnist_images, load_svhn_images
from tests.core.fixtures_images import write_mnist_idx, write_svhn_mat
from worker.extractor_cli import app

SMALL = {"num_filters": 8, "groups": 4}
FAST = {"batch_size": 32, "device": "cpu", "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_mnist_idx(tmp_path_factory.mktemp("mnist"), n_train=128, n_test=64)


@pytest.fixture(scope="module")
def trained(mnist_dir):
    images, labels = load_mnist_images(mnist_dir, train=True)
    return train_extractor(
        images, labels, config_for("mnist", **SMALL), delta=1e-3, epochs=1,
        target_epsilon=3.0, accountant="rdp", **FAST,
    )  # fmt: skip


# --- training ---------------------------------------------------------------------------------


def test_one_epoch_reports_epsilon_within_target(trained):
    assert 0 < trained.epsilon <= 3.0
    p = trained.config.privacy
    assert p["epsilon"] == trained.epsilon and p["delta"] == 1e-3 and p["accountant"] == "rdp"
    assert p["sample_rate"] == pytest.approx(32 / 128) and p["n_train"] == 128
    assert trained.noise_multiplier > 0 and not trained.model.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trained.model.modules())


def test_fixed_noise_multiplier_paper_setting_on_svhn(tmp_path):
    write_svhn_mat(tmp_path, splits=("train",), n=96)
    images, labels = load_svhn_images(tmp_path, split="train")
    out = train_extractor(
        images, labels, config_for("svhn", **SMALL), delta=1e-5, epochs=1,
        noise_multiplier=6.0, max_grad_norm=4.0, accountant="rdp",
        max_physical_batch_size=8, **FAST,
    )  # fmt: skip
    assert out.noise_multiplier == 6.0 and out.config.privacy["max_grad_norm"] == 4.0
    assert 0 < out.epsilon < 1.0  # 3 steps at sigma = 6: a small epsilon
    assert out.config.privacy["target_epsilon"] is None


def test_exactly_one_of_target_and_noise(trained):
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(InvalidInputError, match="exactly one"):
        train_extractor(x, y, trained.config, delta=1e-5, epochs=1, **FAST)
    with pytest.raises(InvalidInputError, match="exactly one"):
        train_extractor(
            x, y, trained.config, delta=1e-5, epochs=1, target_epsilon=1.0,
            noise_multiplier=1.0, **FAST,
        )  # fmt: skip


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5)
        self.norm = nn.BatchNorm2d(4)
        self.classifier = nn.Linear(4 * 12 * 12, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return nn.functional.max_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_batchnorm_rejected_with_clear_message(mnist_dir):
    images, labels = load_mnist_images(mnist_dir, train=True)
    with pytest.raises(InvalidInputError, match=r"BatchNorm.*GroupNorm.*fix=True"):
        train_extractor(
            images, labels, config_for("mnist"), delta=1e-3, epochs=1, target_epsilon=3.0,
            model=BatchNormNet(), **FAST,
        )  # fmt: skip


def test_batchnorm_fixed_with_warning_then_trained(mnist_dir):
    images, labels = load_mnist_images(mnist_dir, train=True)
    with pytest.warns(UserWarning, match="BatchNorm -> GroupNorm"):
        out = train_extractor(
            images, labels, config_for("mnist"), delta=1e-3, epochs=1, target_epsilon=3.0,
            model=BatchNormNet(), fix_batchnorm=True, accountant="rdp", **FAST,
        )  # fmt: skip
    assert 0 < out.epsilon <= 3.0
    kinds = {type(m) for m in out.model.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds
    assert check_dp_compatible(out.model) is out.model  # valid now: returned as is


# --- save, load, features, dataset file -------------------------------------------------------


def test_save_load_round_trip(trained, mnist_dir, tmp_path):
    path = save_extractor(tmp_path / "ext.pt", trained)
    loaded = load_extractor(path, device="cpu")
    assert loaded.config == trained.config and loaded.epsilon == trained.epsilon
    images, _ = load_mnist_images(mnist_dir, train=False)
    assert torch.equal(
        extract_features(trained.model, images), extract_features(loaded.model, images)
    )
    payload = torch.load(path, weights_only=True)  # tensors and strings only: no pickle
    assert isinstance(payload["config"], str)


def test_load_rejects_pickled_objects_and_garbage(tmp_path):
    torch.save({"arch": object()}, tmp_path / "evil.pt")
    with pytest.raises(InvalidInputError, match="cannot load"):
        load_extractor(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InvalidInputError, match="cannot load"):
        load_extractor(tmp_path / "junk.pt")


def test_features_are_unit_rows_in_float32(trained, mnist_dir):
    images, _ = load_mnist_images(mnist_dir, train=False)
    feats = extract_features(trained.model, images, batch_size=10)
    assert feats.dtype == torch.float32 and feats.shape == (
        64,
        config_for("mnist", **SMALL).feature_dim,
    )
    norms = feats.double().norm(dim=1)
    assert torch.all(norms <= 1.0) and torch.allclose(norms, torch.full_like(norms, NORM_SCALE))


def test_dataset_file_meta_round_trips(trained, mnist_dir, tmp_path):
    arrays = extract_dataset(trained, "mnist", mnist_dir, binary_classes=(3, 8))
    path = write_feature_dataset(tmp_path / "f.npz", **arrays)
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    assert data["X_train"].dtype == np.float32 and data["y_train"].dtype == np.int64
    assert data["ids_train"].dtype == np.int64 and data["ids_test"].dtype == np.int64
    meta = json.loads(str(data["meta"]))
    assert meta["dp_epsilon"] == trained.epsilon and meta["dp_delta"] == 1e-3
    assert meta["noise_multiplier"] == trained.noise_multiplier and meta["binary_classes"] == [3, 8]
    # ids are row indices in the source split: the labels there match.
    _, labels = load_mnist_images(mnist_dir, train=True)
    assert np.array_equal(labels.numpy()[data["ids_train"]], data["y_train"])
    assert set(np.unique(data["y_train"])) == {3, 8}
    # A full-pipeline retrain drops removed rows from the training split only.
    removed = data["ids_train"][:3]
    fewer = extract_dataset(trained, "mnist", mnist_dir, binary_classes=(3, 8), exclude_ids=removed)
    assert np.array_equal(fewer["ids_train"], data["ids_train"][3:])
    assert (
        len(fewer["ids_test"]) == len(data["ids_test"])
        and fewer["meta"]["excluded_train_rows"] == 3
    )
    with pytest.raises(InvalidInputError, match="differ in length"):
        write_feature_dataset(tmp_path / "bad.npz", **{**arrays, "y_test": arrays["y_test"][1:]})


# --- group privacy (hand-computed values, properties) -----------------------------------------


def test_group_privacy_hand_values():
    assert group_privacy(0.1, 1e-5, 1) == pytest.approx((0.1, 1e-5))
    assert group_privacy(0.1, 1e-5, 10) == pytest.approx((1.0, 10 * math.exp(0.9) * 1e-5))
    assert group_privacy(0.1, 1e-5, 10)[1] == pytest.approx(2.459603111e-4)
    assert group_privacy(0.1, 1e-5, 10, tight=True)[1] == pytest.approx(1.633799e-4, rel=1e-6)
    assert group_privacy(0.5, 0.0, 4) == (2.0, 0.0) and group_privacy(0.5, 1e-5, 0) == (0.0, 0.0)
    assert combined_guarantee(1.0, 1e-4, 0.1, 1e-5, 10) == pytest.approx(
        (2.0, 1e-4 + 2.4596e-4), rel=1e-4
    )


def test_removals_allowed_hand_values():
    # delta term at eps_dp = 0.1: k = 6 -> 6 e^0.5 1e-5 = 9.89e-5 <= 1e-4; k = 7 -> 1.28e-4.
    assert extractor_removals_allowed(0.1, 1e-5, eps_extra_max=1.0, delta_extra_max=1e-4) == 6
    assert extractor_removals_allowed(0.1, 1e-5, eps_extra_max=1.0, delta_extra_max=1e-3) == 10
    assert extractor_removals_allowed(0.1, 0.0, eps_extra_max=0.3, delta_extra_max=0.0) == 3
    assert extractor_removals_allowed(0.5, 1e-5, eps_extra_max=0.4, delta_extra_max=1.0) == 0
    assert extractor_removals_allowed(0.1, 1e-5, eps_extra_max=1.0, delta_extra_max=0.0) == 0
    assert extractor_removals_remaining(0.1, 1e-5, 4, eps_extra_max=1.0, delta_extra_max=1e-4) == 2
    assert extractor_removals_remaining(0.1, 1e-5, 9, eps_extra_max=1.0, delta_extra_max=1e-4) == 0
    with pytest.raises(InvalidInputError):
        extractor_removals_allowed(0.0, 1e-5, eps_extra_max=1.0, delta_extra_max=1e-4)


eps_st = st.floats(1e-4, 2.0)
delta_st = st.floats(0.0, 1e-3)
limit_eps = st.floats(0.0, 20.0)
limit_delta = st.floats(0.0, 0.1)


@settings(max_examples=200, deadline=None)
@given(eps_st, delta_st, st.integers(0, 300))
def test_group_privacy_monotone_in_k_and_tight_is_smaller(eps, delta, k):
    e1, d1 = group_privacy(eps, delta, k)
    e2, d2 = group_privacy(eps, delta, k + 1)
    assert e2 >= e1 and d2 >= d1
    assert group_privacy(eps, delta, k, tight=True)[1] <= d1 * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(eps_st, delta_st, limit_eps, limit_delta, st.floats(1.0, 3.0))
def test_removals_allowed_is_the_threshold_and_monotone(eps, delta, eps_max, delta_max, factor):
    k = extractor_removals_allowed(eps, delta, eps_extra_max=eps_max, delta_extra_max=delta_max)
    if k > 0:  # k itself is within both limits (up to the 1e-12 relative slack) ...
        e, d = group_privacy(eps, delta, k)
        assert e <= eps_max * (1 + 1e-9) and d <= delta_max * (1 + 1e-9)
    e, d = group_privacy(eps, delta, k + 1)  # ... and k + 1 is not
    assert e > eps_max * (1 - 1e-9) or d > delta_max * (1 - 1e-9)
    looser = extractor_removals_allowed(
        eps, delta, eps_extra_max=eps_max * factor, delta_extra_max=delta_max * factor
    )
    noisier = extractor_removals_allowed(
        eps * factor, delta, eps_extra_max=eps_max, delta_extra_max=delta_max
    )
    assert looser >= k >= noisier


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_train_and_extract_end_to_end(mnist_dir, tmp_path):
    runner = CliRunner()
    model = tmp_path / "ext.pt"
    res = runner.invoke(app, [
        "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--target-epsilon", "4",
        "--delta", "1e-3", "--epochs", "1", "--batch-size", "32", "--num-filters", "8",
        "--device", "cpu", "--seed", "0", "--out", str(model), "--json",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert 0 < report["epsilon"] <= 4.0 and report["accountant"] == "prv" and model.is_file()
    out = tmp_path / "f.npz"
    res = runner.invoke(app, [
        "extract", "--model", str(model), "--dataset", "mnist", "--data-dir", str(mnist_dir),
        "--out", str(out), "--binary-classes", "3,8", "--device", "cpu",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "epsilon" in res.stdout and out.is_file()
    with np.load(out, allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["dp_epsilon"] == report["epsilon"]
    res = runner.invoke(app, [
        "extract", "--model", str(model), "--dataset", "svhn", "--data-dir", str(mnist_dir),
        "--out", str(out),
    ])  # fmt: skip
    assert res.exit_code == 2 and "trained on mnist" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "mnist", "--target-epsilon", "1", "--out", "m.pt"], "--data-dir"),
        (["train", "--dataset", "svhn", "--data-dir", ".", "--target-epsilon", "1", "--out",
          "m.pt"], "--download"),
        (["train", "--dataset", "mnist", "--data-dir", ".", "--out", "m.pt"], "exactly one"),
        (["extract", "--model", "nope.pt", "--dataset", "mnist", "--data-dir", ".", "--out",
          "f.npz"], "not found"),
        (["extract", "--model", "nope.pt", "--dataset", "mnist", "--data-dir", ".", "--out",
          "f.npz", "--binary-classes", "3"], "two different digits"),
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2_with_a_reason(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and message in res.output
