"""Save/load: atomic snapshots, the noise never on disk, the loaded state as the new anchor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import core


@pytest.fixture
def trained(digits):
    # saved with ``dataset=digits``: trained on its ids (a save refuses other ids)
    return core.train(
        digits.X_train, digits.y_train, ids=digits.ids_train, lam=1e-2, sigma=1.0, max_removals=None
    )


def test_round_trip_and_continue(tmp_path, digits, trained):
    trained.remove(list(range(40)), groups=[20, 20])
    trained.save(tmp_path, dataset=digits)
    loaded = core.load_model(tmp_path)
    assert loaded.noise is None
    torch.testing.assert_close(loaded.weights, trained.weights, rtol=0, atol=0)
    assert torch.equal(loaded.alive, trained.alive)
    # the persisted bound plus the rounding margin of the recomputed anchor gradient
    assert trained.budget_used <= loaded.budget_used <= trained.budget_used + 1e-8
    assert loaded.version == trained.version and loaded.removed_in_epoch == 40
    assert loaded.accuracy(digits.X_test, digits.y_test) == trained.accuracy(
        digits.X_test, digits.y_test
    )
    # the same removal on both: the loaded model's anchored figure bounds the true residual too
    a = trained.remove(list(range(40, 60)))
    b = loaded.remove(list(range(40, 60)))
    torch.testing.assert_close(loaded.weights, trained.weights)
    assert b.budget_used >= a.budget_used - 1e-12  # anchored at a bound, never below the truth
    assert b.budget_used <= trained.budget_used + trained.exact_used  # and not much looser


def test_noise_and_anchor_gradient_never_reach_disk(tmp_path, digits, trained):
    trained.save(tmp_path, dataset=digits)
    blob = b"".join(
        p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "dataset.npz"
    )
    noise = trained.noise.cpu().numpy()
    for value in noise.ravel()[:20]:
        assert np.float64(value).tobytes() not in blob
        assert np.float32(value).tobytes() not in blob
    state = json.loads(next(tmp_path.glob("snapshots/*/state.json")).read_text())
    assert "noise" not in json.dumps(state)


def test_snapshots_are_replaced_atomically(tmp_path, digits, trained):
    trained.save(tmp_path, dataset=digits)
    first = (tmp_path / "CURRENT").read_text().strip()
    trained.remove([5])
    trained.save(tmp_path)
    second = (tmp_path / "CURRENT").read_text().strip()
    assert first != second
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names == [first.split("/")[1], second.split("/")[1]]  # the previous one is kept
    assert not core.load_model(tmp_path).alive[5]
    trained.save(tmp_path, keep=1)
    third = (tmp_path / "CURRENT").read_text().strip()
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [third.split("/")[1]]


def test_a_state_dir_refuses_a_different_dataset(tmp_path, digits, trained):
    trained.save(tmp_path, dataset=digits)
    other = core.load_dataset("synthetic:n=200,d=8,classes=2,seed=1")
    m = core.train(other.X_train, other.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    with pytest.raises(core.StateError):
        m.save(tmp_path, dataset=other)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(core.StateError, match="cannot load"):
        core.load_model(tmp_path)


def test_full_pipeline_retrain_replaces_the_dataset_only_when_asked(tmp_path, digits, trained):
    trained.save(tmp_path, dataset=digits)
    other = core.load_dataset("synthetic:n=300,d=8,classes=2,seed=2")
    m = core.train(other.X_train, other.y_train, lam=1e-2, sigma=1.0, max_removals=None)
    m.save(tmp_path, dataset=other, replace_dataset=True)
    loaded = core.load_model(tmp_path)
    assert loaded.n_rows == 300
    # the previous snapshot is kept (something to fall back to), and so is its dataset
    assert len(list((tmp_path / "datasets").glob("*.npz"))) == 2
    assert len(list((tmp_path / "snapshots").iterdir())) == 2
    m.save(tmp_path, keep=1)  # once no kept snapshot uses the old dataset, it goes
    assert len(list((tmp_path / "datasets").glob("*.npz"))) == 1
    assert len(list((tmp_path / "snapshots").iterdir())) == 1


def test_a_save_that_fails_at_current_leaves_no_orphan_snapshot(
    tmp_path, digits, trained, monkeypatch
):
    """A disk that has room for a snapshot but not for CURRENT: the retry must not leave
    snapshots that never became current, and pruning never keeps one in place of history."""
    import errno

    import core.persist as persist

    trained.save(tmp_path, dataset=digits)
    trained.save(tmp_path)
    before = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    real = persist.write_file

    def full_at_current(path, data, **kw):
        if path.name == ".CURRENT.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, **kw)

    monkeypatch.setattr(persist, "write_file", full_at_current)
    for _ in range(3):
        with pytest.raises(OSError):
            trained.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == before
    monkeypatch.setattr(persist, "write_file", real)
    # an orphan left by an older version (a number past CURRENT) is deleted, never kept
    orphan = tmp_path / "snapshots" / "000000009999"
    orphan.mkdir()
    trained.save(tmp_path)
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert "000000009999" not in names and len(names) == 3 and before[0] in names
    assert core.load_model(tmp_path, device="cpu").n_alive == trained.n_alive
