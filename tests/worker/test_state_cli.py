"""``certremove state verify|snapshots|recover``, ``certremove train`` on a populated directory and
the worker's start-up checks: a damaged, tampered or rolled-back state is refused, and recovery
never undoes a removal (real files and the real ledger; no mocks)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import core
from core.snapshots import current_snapshot
from tests.conftest import make_state, rewrite_manifest
from worker.cli import app
from worker.errors import StateDamagedError, StateMissingError
from worker.integrity import current_problem
from worker.ledger import LEDGER_NAME, Answer, Ledger
from worker.runtime import load_model
from worker.settings import Settings

runner = CliRunner()
#: the ids each of two batches removed (int ids; one named as a digit string, as clients may)
BATCHES: list[list[Any]] = [list(range(0, 30)), [*range(30, 59), "59"]]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshot 1: trained; 2: ids 0-29 removed; 3: ids 30-59 removed too. The ledger (written
    as the worker does, after each persist) lists ids 0-59."""
    state = make_state(tmp_path_factory.mktemp("statecli") / "state")
    model = core.load_model(state, device="cpu")
    ledger = Ledger(redis.Redis(), "statecli", state / LEDGER_NAME)  # the file only: no Redis
    for k, ids in enumerate(BATCHES):
        rows, unknown = model.rows_for_ids(ids)
        assert not unknown
        model.remove(rows)
        model.save(state)
        ledger.record([Answer(f"req{k}", "applied", "newton", model.version, removed_ids=ids)])
    return state


@pytest.fixture
def state(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "state"))


@pytest.fixture
def threads() -> Iterator[None]:
    """worker.runtime.load_model sets torch's thread count: restore it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def worker_load(state: Path) -> Any:
    return load_model(Settings(state_dir=state, device="cpu", torch_threads=1))


def ledger_rows(model: core.Model) -> np.ndarray:
    """Rows of the ledger's ids, recomputed independently of core's id index."""
    wanted = np.array([int(v) for ids in BATCHES for v in ids], dtype=np.int64)
    return np.flatnonzero(np.isin(model.ids, wanted))


def digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".worker.lock"  # recover holds the worker lock
    }


def newest_snapshot(state: Path) -> Path:
    return max((state / "snapshots").iterdir(), key=lambda p: int(p.name))


def train_args(state: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset",
        "synthetic:n=200,d=4,classes=2,seed=0",
        "--state",
        str(state),
        "--seed",
        "1",
        "--max-removals",
        "none",
        "--device",
        "cpu",
        *extra,
    ]


# ------------------------------------------------------------------------------ train
@pytest.mark.parametrize("contents", ["populated", "no CURRENT", "ledger only", "dataset only"])
def test_train_never_overwrites_a_populated_directory(
    state: Path, tmp_path: Path, contents: str
) -> None:
    if contents == "no CURRENT":
        (state / "CURRENT").unlink()
    elif contents == "ledger only":
        state = tmp_path / "ledger-only"
        state.mkdir()
        (state / "ledger-000001.jsonl.gz").write_bytes(b"segment")
    elif contents == "dataset only":
        for p in [*state.iterdir()]:
            if p.name != "datasets":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = digest(state)
    out = runner.invoke(app, train_args(state))
    assert out.exit_code == 2, out.output
    assert "already holds a model's state" in out.output
    assert "would bring removed rows back" in out.output
    assert digest(state) == before
    assert runner.invoke(app, train_args(state, "--overwrite")).exit_code == 0


# ------------------------------------------------------------------------------ worker start
def test_the_worker_starts_on_a_sound_state(state: Path, threads: None) -> None:
    model = worker_load(state)
    assert model.n_alive == 540


def test_a_lost_current_says_recover_never_train(state: Path, threads: None) -> None:
    (state / "CURRENT").unlink()
    with pytest.raises(StateDamagedError) as info:
        worker_load(state)
    message = str(info.value)
    assert f"certremove state recover --state {state}" in message
    assert "certremove train" not in message
    assert current_problem(state) == message  # the `certremove worker` pre-check says the same
    out = runner.invoke(app, ["worker", "--state", str(state)])
    assert out.exit_code != 0 and "state recover" in out.output
    assert "certremove train" not in out.output


def test_only_a_new_directory_is_told_to_train(tmp_path: Path, threads: None) -> None:
    with pytest.raises(StateMissingError, match="run `certremove train") as info:
        worker_load(tmp_path)
    assert not isinstance(info.value, StateDamagedError)
    (tmp_path / LEDGER_NAME).write_text("")
    with pytest.raises(StateDamagedError, match="restore the state directory from a backup"):
        worker_load(tmp_path)


def test_a_consistent_looking_tamper_is_caught_by_the_ledger_check(
    state: Path, threads: None
) -> None:
    """A removed row brought back with state.json's n_alive and the manifest rewritten to
    match: checksums and invariants pass, the ledger says the row was removed."""
    snap = newest_snapshot(state)
    tensors = load_file(str(snap / "model.safetensors"))
    tensors["alive"][[40, 7]] = 1
    save_file(tensors, str(snap / "model.safetensors"))
    data = json.loads((snap / "state.json").read_text())
    data["n_alive"] += 2
    (snap / "state.json").write_text(json.dumps(data))
    rewrite_manifest(snap)
    assert core.load_model(state, device="cpu").n_alive == 542  # the files look sound
    with pytest.raises(StateDamagedError) as info:
        worker_load(state)
    message = str(info.value)
    assert "has 2 rows alive that the ledger says were removed" in message
    assert f"certremove state recover --state {state}" in message
    out = runner.invoke(app, ["state", "verify", "--state", str(state)])
    assert out.exit_code == 1 and "2 rows alive" in out.output
    out = runner.invoke(app, ["state", "recover", "--state", str(state), "--yes", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["rows_re_removed"] == 2 and summary["snapshot"] == snap.name
    recovered = worker_load(state)
    assert not recovered.alive[ledger_rows(recovered)].any()


# ------------------------------------------------------------------------------ verify, list
def test_verify_exit_codes(state: Path) -> None:
    out = runner.invoke(app, ["state", "verify", "--state", str(state)])
    assert out.exit_code == 0, out.output
    assert (
        "3 of 3 snapshots valid" in out.output and "60 removed ids, 0 of them alive" in out.output
    )
    oldest = min((state / "snapshots").iterdir(), key=lambda p: int(p.name))
    (oldest / "state.json").write_text("{}")  # an older snapshot damaged: reported, still 0
    out = runner.invoke(app, ["state", "verify", "--state", str(state)])
    assert out.exit_code == 0, out.output
    assert f"problem: snapshot {oldest.name}:" in out.output and "state.json" in out.output
    newest = newest_snapshot(state)
    (newest / "model.safetensors").write_bytes(b"")
    out = runner.invoke(app, ["state", "verify", "--state", str(state), "--json"])
    assert out.exit_code == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False and report["current"] == newest.name
    assert any(str(newest / "model.safetensors") in p for p in report["problems"])
    out = runner.invoke(app, ["state", "snapshots", "--state", str(state), "--json"])
    assert out.exit_code == 0
    listed = json.loads(out.stdout)["snapshots"]
    assert [(s["seq"], s["valid"], s["current"]) for s in listed] == [
        (3, False, True),
        (2, True, False),
        (1, False, False),
    ]


# ------------------------------------------------------------------------------ recover
def test_recover_after_losing_current(state: Path, threads: None) -> None:
    (state / "CURRENT").unlink()
    assert runner.invoke(app, ["state", "verify", "--state", str(state)]).exit_code == 1
    out = runner.invoke(app, ["state", "recover", "--state", str(state), "--yes"])
    assert out.exit_code == 0, out.output
    assert "recovering from snapshot 000000000003" in out.output
    assert "0 rows removed again" in out.output
    assert current_snapshot(state) == "000000000004"
    model = worker_load(state)
    assert model.version == 2 and model.n_alive == 540
    assert runner.invoke(app, ["state", "verify", "--state", str(state)]).exit_code == 0
    out = runner.invoke(app, ["state", "recover", "--state", str(state), "--yes"])
    assert out.exit_code == 0 and "nothing to do" in out.output


def test_recover_after_damaging_the_newest_snapshot_removes_the_rows_again(
    state: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recovery retrains with fresh noise; on 600 rows one draw in many moves the test
    # accuracy by more than 0.05 (CI met one: 0.967 -> 0.892). The draw is not what this test
    # checks, so it is made reproducible here (the model stays certified: no seed is given).
    import core.epoch  # noqa: PLC0415

    monkeypatch.setattr(core.epoch, "generator", lambda seed: np.random.default_rng(seed or 7))
    reference = core.load_model(state, device="cpu")
    ds = reference.dataset
    assert ds is not None
    before = reference.accuracy(ds.X_test, ds.y_test)
    newest = newest_snapshot(state)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StateDamagedError, match="state recover"):
        worker_load(state)
    ledger_before = (state / LEDGER_NAME).read_bytes()
    out = runner.invoke(app, ["state", "recover", "--state", str(state), "--yes"])
    assert out.exit_code == 0, out.output
    assert "recovering from snapshot 000000000002" in out.output
    assert "30 rows alive in it that the ledger says were removed" in out.output
    assert "version 2" in out.output
    assert (state / LEDGER_NAME).read_bytes() == ledger_before  # never touches the ledger
    model = worker_load(state)  # passes the checksums, invariants and the ledger check
    rows = ledger_rows(model)
    assert len(rows) == 60
    assert not model.alive[torch.as_tensor(rows)].any()
    assert model.n_alive == 540 and model.version == 2
    assert model.certified  # a retrain with fresh noise
    after = model.accuracy(ds.X_test, ds.y_test)
    assert after > 0.8 and abs(after - before) < 0.05, (before, after)
    assert current_snapshot(state) == "000000000004"
    assert len(list((state / "snapshots").iterdir())) == 4  # recover deletes nothing


def test_recover_carries_the_journal_of_the_snapshot_it_recovers_from(state: Path) -> None:
    model = core.load_model(state, device="cpu")
    journal = {"answers": [{"rid": "r9", "s": "applied", "x": [70]}], "state_id": "abc"}
    model.remove(model.rows_for_ids([70])[0])
    model.save(state, journal=journal)
    (state / "CURRENT").unlink()
    out = runner.invoke(app, ["state", "recover", "--state", str(state), "--yes"])
    assert out.exit_code == 0, out.output
    assert current_snapshot(state) == "000000000005"
    assert core.read_journal(state) == journal


def test_recover_refuses_without_a_valid_snapshot(state: Path) -> None:
    (dataset,) = (state / "datasets").glob("*.npz")
    dataset.write_bytes(dataset.read_bytes()[:100])
    before = digest(state)
    out = runner.invoke(app, ["state", "recover", "--state", str(state), "--yes"])
    assert out.exit_code == 1
    assert "no valid snapshot" in out.output and dataset.name in out.output
    assert digest(state) == before


def test_recover_asks_before_writing(state: Path) -> None:
    (state / "CURRENT").unlink()
    before = digest(state)
    out = runner.invoke(app, ["state", "recover", "--state", str(state)], input="n\n")
    assert out.exit_code == 1 and "nothing written" in out.output
    assert digest(state) == before
