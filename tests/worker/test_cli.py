from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import app, parse_max_removals

runner = CliRunner()


def test_train_writes_a_state_and_refuses_to_overwrite(tmp_path: Path) -> None:
    args = [
        "train",
        "--dataset",
        "synthetic:n=300,d=4,classes=2,seed=0",
        "--state",
        str(tmp_path / "s"),
        "--seed",
        "1",
        "--max-removals",
        "20",
        "--device",
        "cpu",
        "--json",
    ]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["rows"] == 300 and summary["max_removals"] == 20
    assert summary["certified"] is False and summary["version"] == 1
    assert (tmp_path / "s" / "CURRENT").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already holds a model" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--dataset", "nope", "--state", "x"], "unknown dataset"),
        (
            ["train", "--dataset", "digits", "--state", "x", "--max-removals", "lots"],
            "max-removals",
        ),
        (["worker", "--state", "/nonexistent/state"], "no model in"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(args: list[str], message: str) -> None:
    out = runner.invoke(app, args)
    assert out.exit_code != 0
    assert message in out.output


def test_parse_max_removals() -> None:
    assert parse_max_removals("auto") == "auto"
    assert parse_max_removals("none") is None
    assert parse_max_removals("12") == 12
    assert parse_max_removals("0.25") == 0.25


def test_extractor_is_mounted() -> None:
    out = runner.invoke(app, ["extractor", "--help"])
    assert out.exit_code == 0
    assert "extractor" in out.output.lower()
