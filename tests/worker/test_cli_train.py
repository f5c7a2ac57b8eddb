"""``certremove train`` as the real console script: MNIST from ``--data-dir`` (tiny IDX files in
the real format), ``--calibration``, ``--accounting`` choices, help texts, the progress display on
a terminal, the noise warning; and core's checks behind them (device, ``max_removals``)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest
import torch

import core
from core.budget import CALIBRATIONS
from core.errors import InvalidInputError
from core.problem import ACCOUNTINGS, resolve_device
from core.trigger import parse_max_removals
from tests.core.fixtures_images import write_mnist_idx
from tests.test_cli_oneline import assert_one_line_error, certremove_command, run_cli
from worker import cli
from worker.training import NOISE_WARN_RATIO

SMALL = "synthetic:n=300,d=4,classes=2,seed=0"


def test_mnist_from_data_dir(tmp_path: Path) -> None:
    root = write_mnist_idx(tmp_path / "data", n_train=96, n_test=32)
    args = ["train", "--dataset", "mnist", "--data-dir", str(root), "--max-removals", "10",
            "--lam", "1e-2", "--sigma", "1", "--json"]  # fmt: skip
    out = run_cli([*args, "--state", str(tmp_path / "s")])
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["rows"], summary["features"], summary["max_removals"]) == (96, 784, 10)
    assert summary["classes"] == list(range(10))
    assert core.load_model(tmp_path / "s", device="cpu").n_rows == 96


def test_mnist_download_finds_the_files_and_binary_classes(tmp_path: Path) -> None:
    """--download with no --data-dir reads ./data, fetching nothing when the files are there."""
    write_mnist_idx(tmp_path / "data", n_train=96, n_test=32)
    args = ["train", "--dataset", "mnist", "--download", "--binary-classes", "3,8",
            "--max-removals", "5", "--lam", "1e-2", "--sigma", "1", "--json"]  # fmt: skip
    out = run_cli([*args, "--state", str(tmp_path / "s38")], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["classes"] == [3, 8]


def test_mnist_without_data_dir_names_the_options(tmp_path: Path) -> None:
    out = run_cli(["train", "--dataset", "mnist", "--state", str(tmp_path / "s")])
    line = assert_one_line_error(out, 2)
    assert "--data-dir" in line and "--download" in line


def test_calibration_analytic_allows_a_large_epsilon(tmp_path: Path) -> None:
    out = run_cli(["train", "--dataset", SMALL, "--state", str(tmp_path / "s"), "--epsilon", "5",
                   "--calibration", "analytic", "--max-removals", "20", "--json"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    budget = json.loads(out.stdout)["budget_total"]
    assert budget == pytest.approx(core.budget_total(10.0, 5.0, 1e-4, "analytic"))
    refused = run_cli(["train", "--dataset", SMALL, "--state", str(tmp_path / "t"),
                       "--epsilon", "5"])  # fmt: skip
    assert "--calibration analytic" in assert_one_line_error(refused, 2)
    assert not (tmp_path / "t").exists()


def test_choices_are_core_s() -> None:
    assert tuple(a.value for a in cli.Accounting) == ACCOUNTINGS
    assert tuple(c.value for c in cli.Calibration) == CALIBRATIONS


def test_every_train_option_has_help() -> None:
    import typer.main

    command = typer.main.get_command(cli.app).commands["train"]  # type: ignore[attr-defined]
    missing = [p.name for p in command.params if not getattr(p, "help", None)]
    assert missing == []
    out = run_cli(["train", "-h"], COLUMNS="200")
    assert out.returncode == 0, out.stderr
    for text in ("exact", "bound", "classical", "analytic", "MNIST-size", "--lam 1e-2 --sigma 1",
                 "--data-dir", "--download"):  # fmt: skip
        assert text in out.stdout, text


def test_noise_warning_on_small_data_with_the_defaults(tmp_path: Path) -> None:
    base = ["train", "--dataset", "digits", "--max-removals", "50", "--json"]
    out = run_cli([*base, "--state", str(tmp_path / "defaults")])
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["noise_ratio"] > NOISE_WARN_RATIO
    line = out.stderr.strip()
    assert line.startswith("warning:") and len(line.splitlines()) == 1
    assert "--lam 1e-2 --sigma 1" in line
    demo = run_cli([*base, "--state", str(tmp_path / "demo"), "--lam", "1e-2", "--sigma", "1"])
    assert demo.returncode == 0 and demo.stderr.strip() == ""
    tuned = json.loads(demo.stdout)
    assert tuned["noise_ratio"] < NOISE_WARN_RATIO
    assert tuned["test_accuracy"] > summary["test_accuracy"] + 0.1


def _run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; return (status, stdout, terminal text)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "200", "CERTREMOVE_DEVICE": "cpu"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [*certremove_command(), *args], stdout=subprocess.PIPE, stderr=slave, env=env, text=True
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read() if proc.stdout else ""
    return proc.wait(timeout=120), stdout, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only(tmp_path: Path) -> None:
    args = ["train", "--dataset", SMALL, "--lam", "1e-2", "--sigma", "1"]
    code, stdout, terminal = _run_on_a_terminal([*args, "--state", str(tmp_path / "s")])
    assert code == 0, terminal
    for stage in ("loading the dataset", "fitting the model", "estimating max_removals",
                  "saving the state"):  # fmt: skip
        assert stage in terminal, terminal
    assert "Traceback" not in terminal and "rows: 300" in stdout
    code, stdout, terminal = _run_on_a_terminal([*args, "--state", str(tmp_path / "j"), "--json"])
    assert code == 0 and "loading" not in terminal and json.loads(stdout)["rows"] == 300
    piped = run_cli([*args, "--state", str(tmp_path / "p")])
    assert piped.returncode == 0 and "loading" not in piped.stderr


@pytest.mark.parametrize("text", ["0", "-1", " 0 "])
def test_max_removals_zero_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="max_removals"):
        parse_max_removals(text)


def test_core_train_refuses_zero_max_removals() -> None:
    X = torch.nn.functional.normalize(torch.randn(20, 3), dim=1) * 0.99
    y = torch.arange(20) % 2
    with pytest.raises(InvalidInputError, match="max_removals"):
        core.train(X, y, max_removals=0, device="cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    for bad in ("foo", "", "meta", "cuda:x"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="no usable CUDA device"):
            resolve_device("cuda")
        assert resolve_device(None).type == "cpu"
