"""``certremove audit`` (``worker/audit.py``): on digits (lam 1e-2, sigma 1), with removals done by
``core.Model.remove`` and written as the worker writes them (``Model.save`` after each step, then
the ledger line with the removed sample ids): the released model is as close to a retrain as two
retrains are, its removed rows' losses do not tell it from a retrain, a targeted removal of a
whole class leaves the model before removal clearly different, the residual stays within the
budget; bad input exits non-zero with one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from safetensors.torch import save as save_tensors
from typer.testing import CliRunner

import core
from worker.audit import run_audit, target_from_model
from worker.cli import app
from worker.ledger import LEDGER_NAME, Answer, Ledger

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
LEVEL = 0.01


def served(path: Path, ids: list[Any], *, step: int, seed: int) -> core.Model:
    """Train on digits into ``path`` and remove ``ids`` ``step`` at a time as the worker does:
    a Newton step, the state saved, the ledger line written; a step the budget's safety net
    refuses is folded into a retrain with fresh noise (seeded here)."""
    ds = core.load_dataset("digits")
    model = core.train(
        ds.X_train,
        ds.y_train,
        ids=ds.ids_train,
        lam=1e-2,
        sigma=1.0,
        seed=seed,
        device="cpu",
        max_removals=1000,
    )
    model.save(path, dataset=ds)
    ledger = Ledger(redis.Redis(), "audit", path / LEDGER_NAME)  # the file only: no Redis
    for k in range(0, len(ids), step):
        batch = ids[k : k + step]
        rows, unknown = model.rows_for_ids(batch)
        assert not unknown
        res = model.remove(rows)
        method = "newton"
        if res.needs_retrain:
            model.retrain(exclude=res.pending, seed=seed + 1 + k)
            method = "retrain"
        model.save(path)
        ledger.record([Answer(f"r{k}", "applied", method, model.version, removed_ids=batch)])
    return model


@pytest.fixture(scope="module")
def scattered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, core.Model]:
    """300 random rows removed by three Newton steps of 100 (one noise epoch)."""
    path = tmp_path_factory.mktemp("audit") / "scattered"
    ids = core.load_dataset("digits").ids_train
    chosen = np.random.default_rng(0).choice(ids, 300, replace=False).tolist()
    return path, served(path, chosen, step=100, seed=0)


@pytest.fixture(scope="module")
def whole_class(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, core.Model]:
    """Every row of class 3 removed (155 rows): more than the budget lets Newton steps remove,
    so the worker's way applies: the safety net leaves them for a retrain with fresh noise."""
    path = tmp_path_factory.mktemp("audit") / "class3"
    ds = core.load_dataset("digits")
    ids = ds.ids_train[(ds.y_train == 3).numpy()].tolist()
    return path, served(path, ids, step=100, seed=1)


def audit_json(state: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "audit.json"
    png = tmp_path / "audit.png"
    res = runner.invoke(
        app,
        [
            "audit",
            "--state",
            str(state),
            "--seed",
            "7",
            "--out",
            str(out),
            "--out",
            str(png),
            *extra,
        ],
    )
    assert res.exit_code == 0, res.output
    assert "INTERNAL ONLY" in res.output
    assert png.read_bytes().startswith(PNG) and 20_000 < png.stat().st_size < 300_000
    report = json.loads(out.read_text())
    assert report["internal_only"] is True and "never publish" in report["notice"]
    return report


def test_scattered_removals_look_like_a_retrain(
    scattered: tuple[Path, core.Model], tmp_path: Path
) -> None:
    state, model = scattered
    report = audit_json(state, tmp_path)
    t, d, m, r = report["target"], report["distances"], report["membership"], report["residual"]
    assert t["rows_removed"] == 300 and t["ledger"]["rows"] == 300 and t["version"] == 1
    assert t["ledger"]["dead_rows_not_in_ledger"] == 0
    # as close to a retrain as two retrains are to each other
    assert d["within_spread"]
    assert 0.8 < d["released_vs_draws"]["total"] / d["draw_spread"]["total"] < 1.25
    assert len(d["released_vs_draws"]["per_class"]) == 10
    # the removed rows' losses do not tell the released model from a retrain
    assert m["level"] == LEVEL and m["sample"] == 300
    assert m["released_vs_retrained"]["mannwhitney_p"] >= LEVEL
    assert not m["released_vs_retrained"]["distinguishable"]
    assert not m["released_across_draws"]["distinguishable"]
    # the residual: the recorded budget used, and the bound recomputed from the snapshots alone
    assert r["budget_used"] == pytest.approx(model.budget_used, rel=1e-9)
    assert 0 < r["budget_used"] <= r["budget_total"]
    check = r["epoch_check"]
    assert check["available"] and check["within_budget"]
    assert check["independent_bound"] >= r["budget_used"] * (1 - 1e-9)
    assert 0.9 < r["implied_noise"]["ratio"] < 1.1 and r["implied_noise"]["consistent"]
    assert report["verdict"]["pass"]


def test_a_whole_class_removed_is_clearly_gone(
    whole_class: tuple[Path, core.Model], tmp_path: Path
) -> None:
    state, _ = whole_class
    report = audit_json(state, tmp_path)
    d, m = report["distances"], report["membership"]
    assert report["target"]["rows_removed"] == 155
    # before removal (retrained with the class) vs retrained without it: clearly different
    assert m["before_removal_vs_retrained"]["mannwhitney_p"] < 1e-10
    assert m["before_removal_across_draws"]["p"] < LEVEL and m["has_power"]
    assert m["summary"]["before_removal"]["loss_mean"] < m["summary"]["retrained"]["loss_mean"] - 1
    # the released model is a retrain's like: within the spread, and across draws
    assert d["within_spread"]
    assert not m["released_across_draws"]["distinguishable"]
    assert report["verdict"]["pass"]


def test_a_model_in_memory_shows_its_true_residual(scattered: tuple[Path, core.Model]) -> None:
    """With ``b`` still in memory the audit computes ``||U||_F`` itself: within the budget used
    (which the exact accounting makes nearly tight)."""
    _, model = scattered
    assert model.noise is not None
    report = run_audit(target_from_model(model), seed=3, draws=4, sample=100)
    r = report["residual"]
    assert 0 < r["true_residual"] <= r["budget_used"] <= r["budget_total"]
    assert r["true_residual"] == pytest.approx(r["budget_used"], rel=1e-3)
    assert report["verdict"]["true_residual_within_budget_used"]
    assert report["membership"]["sample"] == 100 and report["membership"]["draws"] == 4


def test_a_release_is_audited_and_a_tampered_one_refused(
    scattered: tuple[Path, core.Model], tmp_path: Path
) -> None:
    state = Path(shutil.copytree(scattered[0], tmp_path / "state"))
    W = core.load_model(state, device="cpu").weights.contiguous()
    release = state / "releases" / "default" / "00000001"
    release.mkdir(parents=True)
    blob = save_tensors({"weights": W})
    (release / "weights.safetensors").write_bytes(blob)
    manifest = {"model": "default", "release": 1, "model_version": 1, "created_at": 4e9}
    manifest["content_sha256"] = hashlib.sha256(blob).hexdigest()
    (release / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["audit", "--state", str(state), "--release", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["target"]["label"] == "release 1 of model default"
    assert report["target"]["rows_removed"] == 300 and report["verdict"]["pass"]
    assert report["target"]["ledger"]["rows_from"] == "snapshot 000000000004"
    assert report["residual"]["epoch_check"]["within_budget"]
    # weights no kept snapshot holds: the remaining rows come from the ledger up to created_at
    blob = save_tensors({"weight": W + 1e-6})
    (release / "weights.safetensors").write_bytes(blob)
    manifest["content_sha256"] = hashlib.sha256(blob).hexdigest()
    (release / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["audit", "--state", str(state), "--release", "1", "--json"])
    assert res.exit_code == 0, res.output
    target = json.loads(res.stdout)["target"]
    assert target["ledger"]["rows_from"] == "ledger up to created_at"
    assert target["rows_removed"] == 300 and target["ledger"]["rows"] == 300
    # a release whose weights no longer match their manifest is refused, in one line
    (release / "weights.safetensors").write_bytes(save_tensors({"weights": W + 1e-3}))
    res = runner.invoke(app, ["audit", "--state", str(state), "--release", "1"])
    assert res.exit_code == 1 and "does not match its manifest" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("no state dir", 2, "is not a directory"),
        ("no model", 1, "no model in"),
        ("no removals yet", 1, "no rows removed yet"),
        ("bad suffix", 2, "name a .json or .png file"),
        ("missing out folder", 2, "does not exist"),
        ("bad sample", 2, "--sample must be >= 1"),
        ("no such release", 2, "releases"),
        ("model name of dots", 2, "invalid model name"),
    ],
)
def test_bad_input_exits_with_one_line(
    state: Path, tmp_path: Path, case: str, code: int, words: str
) -> None:
    """``state`` (tests/conftest.py): a trained model, nothing removed yet."""
    args = ["audit", "--state", str(state)]
    if case == "no state dir":
        args[2] = str(tmp_path / "nowhere")
    elif case == "no model":
        (tmp_path / "empty").mkdir()
        args[2] = str(tmp_path / "empty")
    elif case == "bad suffix":
        args += ["--out", str(tmp_path / "audit.txt")]
    elif case == "missing out folder":
        args += ["--out", str(tmp_path / "no" / "audit.png")]
    elif case == "bad sample":
        args += ["--sample", "0"]
    elif case == "no such release":
        args += ["--release", "3"]
    elif case == "model name of dots":  # never the release directory's parent
        (state / "releases").mkdir(exist_ok=True)
        args += ["--release", "1", "--model", ".."]
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert words in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert isinstance(res.exception, SystemExit)


def test_the_help_says_internal_only() -> None:
    res = runner.invoke(app, ["audit", "--help"])
    assert res.exit_code == 0 and "INTERNAL ONLY" in " ".join(res.output.split())
