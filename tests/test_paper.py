"""benchmarks/paper.py end to end on tiny MNIST IDX and SVHN .mat files (CPU, no download).

The figures these runs produce mean nothing (a few hundred synthetic images); the tests check the
pipeline, the JSON fields, the retrain loop and the extractor's cover against ``core``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from core.group_privacy import combined_guarantee, extractor_removals_allowed
from tests.benchmark_scripts import load_benchmark
from tests.core.fixtures_images import write_mnist_idx, write_svhn_mat

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

QUIET = ["--no-progress", "--device", "cpu"]
SMALL_CNN = ["--epochs", "1", "--num-filters", "8", "--batch-size", "64"]
SMALL_CNN += ["--max-physical-batch-size", "64"]

LOOP_KEYS = {
    "removals", "stopped_at_extractor_cover", "removed_by_newton", "removed_by_retrain", "retrains", "retrain_reasons",
    "safety_retrains", "certified_per_retrain", "certified_per_retrain_mean",
    "certified_per_retrain_min", "certified_in_last_epoch", "max_removals_resolved",
    "removal_seconds_mean", "removal_seconds_total", "retrain_seconds_mean", "retrain_seconds",
    "retrain_seconds_basis", "retrain_over_removal", "train_seconds", "test_accuracy_before",
    "test_accuracy_after", "n_train", "n_test", "features", "classes", "device", "lam", "sigma",
    "epsilon", "delta", "max_removals", "certified", "budget_total", "model_version",
}  # fmt: skip
SVHN_KEYS = {
    "eps_dp", "delta_dp", "noise_multiplier", "max_grad_norm", "accountant", "extractor_epochs",
    "extractor_n_train", "extractor_path", "extractor_train_seconds", "extract_seconds",
    "features_path", "include_extra", "eps_extra_max", "delta_extra_max",
    "extractor_removals_allowed", "rows_removed", "extractor_covers_all_removals",
    "combined_epsilon", "combined_delta", "combined_vacuous", "combined_epsilon_at_allowed",
    "combined_delta_at_allowed",
}  # fmt: skip


@pytest.fixture(scope="module")
def paper() -> ModuleType:
    return load_benchmark("paper")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 400 images, 10 balanced classes: 80 rows of 3 and 8 for training, 20 for testing.
    return write_mnist_idx(tmp_path_factory.mktemp("mnist"), n_train=400, n_test=100)


@pytest.fixture(scope="module")
def svhn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_svhn_mat(tmp_path_factory.mktemp("svhn"), n=200)


@pytest.fixture(scope="module")
def svhn_run(paper, svhn_dir, tmp_path_factory) -> dict:
    """The paper's SVHN settings, except a 1-epoch 8-filter extractor and --max-removals 4."""
    out = tmp_path_factory.mktemp("svhn-out")
    argv = ["svhn", "--data-dir", str(svhn_dir), "--out-dir", str(out), "--removals", "12"]
    return run_json(paper, argv + ["--max-removals", "4", *SMALL_CNN])


def run_json(paper: ModuleType, argv: list[str]) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = paper.main([*argv, "--json", *QUIET])
    assert rc == 0
    return json.loads(buffer.getvalue())


def check_loop(r: dict, removals: int) -> None:
    """Invariants of the removal loop that hold for any noise draw."""
    assert r["removals"] == removals
    assert r["removed_by_newton"] + r["removed_by_retrain"] == removals
    assert r["retrains"] == sum(r["retrain_reasons"].values()) == len(r["certified_per_retrain"])
    assert sum(r["certified_per_retrain"]) + r["certified_in_last_epoch"] == r["removed_by_newton"]
    assert r["model_version"] == 1 + r["retrains"]
    assert len(r["max_removals_resolved"]) == 1 + r["retrains"]
    assert 0 <= r["test_accuracy_before"] <= 1 and 0 <= r["test_accuracy_after"] <= 1
    assert r["certified"] is True and r["budget_total"] > 0
    if r["removed_by_newton"]:
        assert r["removal_seconds_mean"] > 0 and r["retrain_over_removal"] > 0
    assert r["retrain_seconds"] > 0


def test_max_removals_option(paper) -> None:
    assert paper.parse_max_removals("auto") == "auto"
    assert paper.parse_max_removals("None") is None
    assert paper.parse_max_removals("7") == 7
    assert paper.parse_max_removals("0.5") == 0.5  # core's one parser: a fraction of the rows
    for bad in ("-1", "half", "1.5"):
        with pytest.raises(Exception, match="max_removals"):
            paper.parse_max_removals(bad)


def test_mnist_default_trigger(paper, mnist_dir) -> None:
    r = run_json(paper, ["mnist", "--data-dir", str(mnist_dir), "--removals", "12"])
    assert LOOP_KEYS <= set(r)
    assert r["experiment"] == "mnist-3v8" and r["classes"] == [3, 8]
    assert (r["n_train"], r["n_test"], r["features"]) == (80, 20, 784)
    assert (r["lam"], r["sigma"], r["epsilon"], r["delta"]) == (1e-3, 10.0, 1.0, 1e-4)
    assert r["max_removals"] == "auto" and isinstance(r["max_removals_resolved"][0], int)
    assert set(r["retrain_reasons"]) <= {"max_removals", "budget", "numerical"}
    check_loop(r, 12)


def test_mnist_retrains_at_small_max_removals(paper, mnist_dir) -> None:
    argv = ["mnist", "--data-dir", str(mnist_dir), "--removals", "12", "--max-removals", "4"]
    # lam*n = 8 keeps each step far inside the budget, so the safety net never closes an epoch
    # early and the count is exact (at the default lam*n = 0.08 it rarely, but can, on 80 rows).
    r = run_json(paper, [*argv, "--lam", "0.1"])
    check_loop(r, 12)
    # 4 Newton removals per epoch; the 5th request is pending and folded into the retrain.
    assert r["retrains"] == 2 and r["retrain_reasons"] == {"max_removals": 2}
    assert r["certified_per_retrain"] == [4, 4] and r["certified_in_last_epoch"] == 2
    assert r["certified_per_retrain_mean"] == 4 and r["certified_per_retrain_min"] == 4
    assert r["removed_by_retrain"] == 2 and r["max_removals_resolved"] == [4, 4, 4]
    assert r["retrain_seconds_basis"] == "mean of the loop's retrains"
    assert r["retrain_seconds"] == r["retrain_seconds_mean"] > 0


def test_svhn_trains_extractor(paper, svhn_run) -> None:
    r = svhn_run
    assert LOOP_KEYS | SVHN_KEYS <= set(r)
    check_loop(r, 12)
    assert r["experiment"] == "svhn-ovr" and r["classes"] == list(range(10))
    assert (r["n_train"], r["features"]) == (200, 8 * 5 * 5)
    assert (r["lam"], r["sigma"]) == (2e-4, 10.0)
    assert (r["noise_multiplier"], r["max_grad_norm"], r["delta_dp"]) == (6.0, 4.0, 1e-5)
    assert r["extractor_epochs"] == 1 and r["extractor_n_train"] == 200
    # At most 4 Newton removals per noise epoch (the safety net may close one earlier on data
    # this small), so 12 rows need at least 2 retrains.
    assert r["retrains"] >= 2 and max(r["certified_per_retrain"]) <= 4
    assert set(r["retrain_reasons"]) <= {"max_removals", "budget"}
    assert r["stopped_at_extractor_cover"] is False
    assert Path(r["extractor_path"]).is_file()
    with np.load(r["features_path"], allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
    assert meta["dp_epsilon"] == pytest.approx(r["eps_dp"]) and r["eps_dp"] > 0
    allowed = extractor_removals_allowed(r["eps_dp"], 1e-5, eps_extra_max=1.0, delta_extra_max=1e-4)
    assert r["extractor_removals_allowed"] == allowed and r["rows_removed"] == 12
    assert r["extractor_covers_all_removals"] == (12 <= allowed)
    eps, delta = combined_guarantee(1.0, 1e-4, r["eps_dp"], 1e-5, 12)
    assert r["combined_epsilon"] == pytest.approx(eps)
    assert r["combined_delta"] == pytest.approx(delta)


def test_svhn_report_warns_past_the_extractor_cover(paper, svhn_run) -> None:
    # 1 epoch at noise 6 on 200 images gives eps_dp well above 0.1, and delta_dp = 1e-5 alone
    # caps the cover at 9 rows for an extra delta of 1e-4: 12 removals are never covered.
    assert svhn_run["extractor_removals_allowed"] < 12
    assert svhn_run["extractor_covers_all_removals"] is False
    lines = paper.report_lines(svhn_run)
    warning = [line for line in lines if line.startswith("WARNING: 12 rows removed")]
    assert len(warning) == 1 and "full-pipeline retrain" in warning[0]
    assert any(line.startswith("DP extractor: eps_dp = ") for line in lines)


def test_svhn_reuses_extractor(paper, svhn_dir, svhn_run, tmp_path, capsys) -> None:
    """--extractor skips DP-SGD; a generous extra-privacy allowance covers the removals."""
    argv = ["svhn", "--data-dir", str(svhn_dir), "--out-dir", str(tmp_path), "--removals", "4"]
    argv += ["--extractor", svhn_run["extractor_path"], "--max-removals", "none", *QUIET]
    argv += ["--lam", "1e-2", "--eps-extra-max", "100", "--delta-extra-max", "0.5"]
    assert paper.main(argv) == 0
    out = capsys.readouterr().out
    assert f"eps_dp = {svhn_run['eps_dp']:.4g}" in out and "max_removals = none" in out
    assert "test accuracy: before" in out and "s per removal vs" in out
    assert "combined guarantee after 4 removed rows" in out and "WARNING" not in out
    assert not (tmp_path / "svhn_extractor.pt").exists()  # loaded, not retrained
    assert (tmp_path / "svhn_features.npz").is_file()


def test_svhn_enforced_cover_stops_the_run(paper, svhn_dir, svhn_run, tmp_path) -> None:
    """With --enforce-extractor-cover core refuses the row past the cover and the run stops."""
    argv = ["svhn", "--data-dir", str(svhn_dir), "--out-dir", str(tmp_path), "--removals", "12"]
    argv += ["--extractor", svhn_run["extractor_path"], "--enforce-extractor-cover"]
    r = run_json(paper, [*argv, "--lam", "1e-2", "--max-removals", "4"])
    allowed = svhn_run["extractor_removals_allowed"]
    assert r["stopped_at_extractor_cover"] is True
    assert r["rows_removed"] == r["removed_by_newton"] + r["removed_by_retrain"] == allowed
    assert r["extractor_covers_all_removals"] is True
    eps, delta = combined_guarantee(1.0, 1e-4, r["eps_dp"], 1e-5, allowed)
    assert (r["combined_epsilon"], r["combined_delta"]) == (
        pytest.approx(eps),
        pytest.approx(delta),
    )
    lines = paper.report_lines(r)
    assert any(line.startswith(f"stopped after {allowed} of 12 rows") for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)


def test_missing_data(paper, tmp_path, svhn_dir, capsys) -> None:
    assert paper.main(["mnist", *QUIET]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "--download" in err
    assert paper.main(["svhn", "--data-dir", str(tmp_path), *QUIET]) == 2
    assert "train_32x32.mat" in capsys.readouterr().err
    argv = ["svhn", "--data-dir", str(svhn_dir), "--include-extra", *QUIET]
    assert paper.main(argv) == 2
    assert "extra_32x32.mat" in capsys.readouterr().err


def test_too_many_removals(paper, mnist_dir, capsys) -> None:
    assert paper.main(["mnist", "--data-dir", str(mnist_dir), "--removals", "79", *QUIET]) == 2
    assert "--removals must lie in [0, 78] for 80 training rows" in capsys.readouterr().err
