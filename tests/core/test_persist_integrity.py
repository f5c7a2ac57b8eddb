"""A damaged or tampered state is refused with a StateError naming the file, never served.

Real files throughout: a small state is saved, then one of its files is damaged on disk.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import core
import core.durable as durable
from core.errors import StateDamagedError
from core.loading import list_snapshots, read_journal
from core.snapshots import current_snapshot
from tests.conftest import make_state, rewrite_manifest

JOURNAL = {"batch": [1, 2, 3], "note": "crash recovery record"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two snapshots: the trained model (1), then 20 rows removed, saved with a journal (2)."""
    state = make_state(tmp_path_factory.mktemp("integrity") / "state")
    model = core.load_model(state, device="cpu")
    model.remove(list(range(20)))
    model.save(state, journal=JOURNAL)
    return state


@pytest.fixture
def state(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "state"))


def snap_dir(state: Path) -> Path:
    return state / "snapshots" / current_snapshot(state)


def target(state: Path, which: str) -> Path:
    """The file ``which`` names: a file of the current snapshot, CURRENT or the dataset file."""
    if which == "CURRENT":
        return state / "CURRENT"
    if which == "dataset":
        (path,) = (state / "datasets").glob("*.npz")
        return path
    return snap_dir(state) / which


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (0, len(data) // 3, len(data) // 2, len(data) - 2):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 3)


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": truncate,
    "emptied": empty,
    "flipped": flip,
    "deleted": delete,
    "garbage": garbage,
}
FILES = ["model.safetensors", "state.json", "journal.json", "manifest.json", "CURRENT", "dataset"]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("which", FILES)
def test_every_damage_of_every_file_is_refused_naming_the_file(
    state: Path, which: str, damage: str
) -> None:
    path = target(state, which)
    DAMAGES[damage](path)
    with pytest.raises(core.StateError) as info:
        core.load_model(state, device="cpu")
    assert isinstance(info.value, StateDamagedError), repr(info.value)
    message = str(info.value)
    assert str(path) in message and info.value.path == str(path), message
    if which == "dataset":  # every snapshot on it needs it: no snapshot to fall back to
        assert "from a backup" in message, message
    else:
        assert f"certremove state recover --state {state}" in message, message


def test_a_flipped_checksum_in_the_manifest_names_both_files(state: Path) -> None:
    snap = snap_dir(state)
    text = (snap / "manifest.json").read_text()
    sha = json.loads(text)["files"]["state.json"]["sha256"]
    (snap / "manifest.json").write_text(text.replace(sha, sha[::-1]))
    with pytest.raises(StateDamagedError) as info:
        core.load_model(state, device="cpu")
    assert str(snap / "state.json") in str(info.value)
    assert f"{snap.relative_to(state)}/manifest.json" in str(info.value)


def test_an_older_snapshot_still_loads_when_the_newest_is_damaged(state: Path) -> None:
    older, newest = sorted(p.name for p in (state / "snapshots").iterdir())
    flip(snap_dir(state) / "model.safetensors")
    model = core.load_model(state, device="cpu", snapshot=older)
    assert model.n_alive == 600 and model.version == 1
    infos = list_snapshots(state)
    assert [(i.name, i.valid, i.current) for i in infos] == [
        (newest, False, True),
        (older, True, False),
    ]
    assert "model.safetensors" in (infos[0].problem or "")


def test_a_removed_row_brought_back_is_caught_with_or_without_the_manifest_rewritten(
    state: Path,
) -> None:
    snap = snap_dir(state)
    tensors = load_file(str(snap / "model.safetensors"))
    assert int(tensors["alive"][5]) == 0  # removed in snapshot 2
    tensors["alive"][5] = 1
    save_file(tensors, str(snap / "model.safetensors"))
    with pytest.raises(StateDamagedError, match="does not match its checksum"):
        core.load_model(state, device="cpu")
    rewrite_manifest(snap)  # consistent checksums: the alive count gives it away
    with pytest.raises(StateDamagedError, match="581 rows alive but state.json says n_alive=580"):
        core.load_model(state, device="cpu")


def test_nan_weights_with_a_fixed_manifest_are_refused(state: Path) -> None:
    snap = snap_dir(state)
    tensors = load_file(str(snap / "model.safetensors"))
    tensors["weights"][3, 0] = float("nan")
    save_file(tensors, str(snap / "model.safetensors"))
    rewrite_manifest(snap)
    with pytest.raises(StateDamagedError, match="non-finite weights") as info:
        core.load_model(state, device="cpu")
    assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("budget_used", float("nan"), "budget_used"),
        ("budget_used", -1.0, "budget_used"),
        ("budget_total", float("inf"), "budget_total"),
        ("version", -3, "version"),
        ("version", "7", "version"),
        ("n_rows", 599, "n_rows"),
        ("classes", [0], "classes"),
        ("hyper", {"lam": 1.0}, "hyper"),
        ("dataset_file", "../../elsewhere.npz", "dataset file"),
        ("dataset_sha256", "0" * 64, "fingerprint"),
        ("format", 9, "format"),
    ],
)
def test_state_json_invariants_hold_even_with_a_fixed_manifest(
    state: Path, field: str, value: object, message: str
) -> None:
    snap = snap_dir(state)
    data = json.loads((snap / "state.json").read_text())
    data[field] = value
    (snap / "state.json").write_text(json.dumps(data))
    rewrite_manifest(snap)
    with pytest.raises(StateDamagedError, match=message) as info:
        core.load_model(state, device="cpu")
    assert "state.json" in str(info.value) or "datasets" in str(info.value)


def test_weights_of_the_wrong_shape_are_refused(state: Path) -> None:
    snap = snap_dir(state)
    tensors = load_file(str(snap / "model.safetensors"))
    tensors["weights"] = torch.zeros(7, 1, dtype=torch.float64)
    save_file(tensors, str(snap / "model.safetensors"))
    rewrite_manifest(snap)
    with pytest.raises(StateDamagedError, match=r"shape \(7, 1\)"):
        core.load_model(state, device="cpu")


def test_a_file_not_in_the_manifest_is_refused(state: Path) -> None:
    (snap_dir(state) / "extra.bin").write_bytes(b"x")
    with pytest.raises(StateDamagedError, match="extra.bin"):
        core.load_model(state, device="cpu")


def test_current_naming_a_missing_snapshot_is_refused(state: Path) -> None:
    (state / "CURRENT").write_text("snapshots/000000000099\n")
    with pytest.raises(StateDamagedError, match="000000000099, which does not exist"):
        core.load_model(state, device="cpu")


def test_a_new_directory_is_not_found_not_damaged(tmp_path: Path) -> None:
    with pytest.raises(core.StateNotFoundError, match="no model there"):
        core.load_model(tmp_path)


def test_snapshots_without_a_manifest_written_before_it_existed_load_with_a_warning(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 1 (no manifest): accepted unverified, with a warning; invariants still hold and
    the next save writes a verified snapshot."""
    snap = snap_dir(state)
    (snap / "manifest.json").unlink()
    (snap / "journal.json").unlink()
    data = json.loads((snap / "state.json").read_text())
    data["format"] = 1
    (snap / "state.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="certremove.core"):
        model = core.load_model(state, device="cpu")
    assert model.n_alive == 580
    assert any("unverified" in r.getMessage() for r in caplog.records)
    assert read_journal(state) is None
    # the invariants still apply to such a snapshot, and its dataset errors are StateErrors
    truncate(target(state, "dataset"))
    with pytest.raises(StateDamagedError, match="not a readable dataset file"):
        core.load_model(state, device="cpu")


def test_keep_n_snapshots_and_load_any_of_them(state: Path) -> None:
    model = core.load_model(state, device="cpu")
    for k in range(4):
        model.remove([100 + k])
        model.save(state, keep=3, journal={"k": k})
    infos = list_snapshots(state)
    assert len(infos) == 3 and [i.seq for i in infos] == sorted(
        (i.seq for i in infos), reverse=True
    )
    assert all(i.valid and i.problem is None for i in infos)
    assert infos[0].current and not any(i.current for i in infos[1:])
    assert [i.n_alive for i in infos] == [576, 577, 578]
    assert [i.version for i in infos] == [model.version] * 3  # removals keep the version
    assert read_journal(state) == {"k": 3}
    assert read_journal(state, infos[2].name) == {"k": 1}
    oldest = core.load_model(state, device="cpu", snapshot=infos[2].name)
    assert oldest.n_alive == 578 and bool(oldest.alive[101]) is False
    assert len(list((state / "datasets").glob("*.npz"))) == 1


def test_journal_round_trip_and_verification(state: Path) -> None:
    assert read_journal(state) == JOURNAL
    older = sorted(p.name for p in (state / "snapshots").iterdir())[0]
    assert read_journal(state, older) is None  # saved without one
    path = snap_dir(state) / "journal.json"
    path.write_text(json.dumps({"batch": [9]}))
    with pytest.raises(StateDamagedError, match="journal.json"):
        read_journal(state)


def test_save_refuses_bad_arguments_and_non_finite_models(state: Path) -> None:
    model = core.load_model(state, device="cpu")
    before = (state / "CURRENT").read_text()
    with pytest.raises(core.InvalidInputError, match="JSON"):
        model.save(state, journal={"x": object()})
    with pytest.raises(core.InvalidInputError, match="keep"):
        model.save(state, keep=0)
    model._W[0, 0] = float("nan")
    with pytest.raises(core.StateError, match="non-finite"):
        model.save(state)
    assert (state / "CURRENT").read_text() == before
    assert len(list((state / "snapshots").iterdir())) == 2


def test_a_save_never_blesses_a_dataset_file_damaged_since_it_was_verified(state: Path) -> None:
    model = core.load_model(state, device="cpu")
    flip(target(state, "dataset"))
    model.remove([300])
    model.save(state)  # the manifest carries the dataset's checksum forward, not the damage
    with pytest.raises(StateDamagedError, match="does not match its checksum") as info:
        core.load_model(state, device="cpu")
    assert target(state, "dataset").name in str(info.value)


def test_fsync_together_syncs_every_path_and_raises_after_all_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [tmp_path / f"f{i}" for i in range(5)]
    for f in files:
        f.write_bytes(b"x")
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        real(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(durable.os, "fsync", record)
    durable.fsync_together(files, [tmp_path])
    assert sorted(synced) == sorted(str(p) for p in [*files, tmp_path])
    synced.clear()
    with pytest.raises(FileNotFoundError):
        durable.fsync_together([*files, tmp_path / "gone"])
    assert sorted(synced) == sorted(str(p) for p in files)  # the others were still synced
    durable.fsync_together([files[0]])  # one alone: no thread needed


def _fsync_in_child(paths: list[str], out: Any) -> None:
    durable.fsync_together([Path(p) for p in paths])
    out.put("done")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fsync_together_works_in_a_forked_child_of_a_process_that_used_it(tmp_path: Path) -> None:
    # the parent's pool threads do not exist in a forked child: a pool inherited as is would
    # queue the child's fsyncs for threads that never run them, and wait forever
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"x")
    durable.fsync_together(files)  # the pool exists in this process now
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_fsync_in_child, args=([str(p) for p in files], out))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("fsync_together hung in a forked child")
    assert child.exitcode == 0 and out.get(timeout=5) == "done"
