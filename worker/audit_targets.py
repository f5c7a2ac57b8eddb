"""What the audit looks at (see :mod:`worker.audit`): the current model or a snapshot of a state
directory, a release written under it, or a model in memory, with the rows the removals took."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from producer import schema
from worker.audit_base import RELEASES, AuditError, Target
from worker.audit_fits import grad0

if TYPE_CHECKING:
    import torch

    from core.model import Model


def _need_state(state_dir: Path) -> Path:
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise AuditError(f"{state_dir} is not a directory (give the worker's --state)")
    return state_dir


def _ledger_rows(
    state_dir: Path, index: Any, until: float | None = None
) -> tuple[list[int], dict[str, Any]]:
    """Rows of the ids the ledger says were removed (those applied at or before ``until``
    when given), and counts of what it held."""
    from worker.ledger import LedgerDamagedError, read_records  # noqa: PLC0415

    ids: list[Any] = []
    try:
        for rec in read_records(state_dir):
            if until is not None and rec.get("t") is not None and float(rec["t"]) > until:
                continue  # applied after the release (a line without a time is counted)
            ids += rec.get("x") or []
    except LedgerDamagedError as exc:
        raise AuditError(str(exc), 1) from exc
    rows, unknown = index.rows_for_ids(ids)
    return sorted(set(rows)), {"ids": len(ids), "rows": len(set(rows)), "unknown_ids": len(unknown)}


def _load(state_dir: Path, snapshot: str | None, device: str) -> tuple[Any, Any]:
    """(:class:`core.loading.Loaded`, :class:`core.state.ModelParts`) of a snapshot."""
    from core.errors import StateError, StateNotFoundError  # noqa: PLC0415
    from core.loading import read_state  # noqa: PLC0415
    from core.state import decode  # noqa: PLC0415

    try:
        loaded = read_state(state_dir, snapshot)
    except StateNotFoundError as exc:
        raise AuditError(f"no model in {state_dir}: {exc}", 1) from exc
    except (StateError, ValueError) as exc:
        raise AuditError(str(exc), 1) from exc
    return loaded, decode(loaded.state, loaded.dataset, device)


def _removed(alive: torch.Tensor) -> np.ndarray:
    return np.flatnonzero(~alive.cpu().numpy())


def _test_rows(dataset: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if dataset is None or len(dataset.y_test) == 0:
        return None
    return dataset.X_test, dataset.y_test


def target_from_state(
    state_dir: Path, *, snapshot: str | None = None, device: str = "cpu"
) -> Target:
    """The current model of ``state_dir`` (or the snapshot named), with the ledger's removed rows.

    Raises:
        AuditError: no directory (2), no model, a damaged state, a ledger that names rows alive
            in the model (1).
    """
    from core.ids import IdIndex  # noqa: PLC0415

    state_dir = _need_state(state_dir)
    loaded, parts = _load(state_dir, snapshot, device)
    epoch, s = parts.epoch, loaded.state.state
    rows, counts = _ledger_rows(state_dir, IdIndex(loaded.dataset.ids_train))
    alive = epoch.alive
    alive_np = alive.cpu().numpy()
    back = [r for r in rows if alive_np[r]]
    if back:
        raise AuditError(
            f"{len(back)} rows the ledger says were removed are alive in snapshot {loaded.name}: "
            "the state is damaged or rolled back (run certremove state verify)",
            1,
        )
    removed = _removed(alive)
    counts["dead_rows_not_in_ledger"] = int(len(set(removed.tolist()) - set(rows)))
    target = Target(
        source="state",
        label=f"snapshot {loaded.name}",
        problem=parts.problem,
        hyper=parts.hyper,
        binary=parts.coding.binary,
        classes=list(parts.coding.classes),
        W=epoch.W,
        alive=alive,
        removed_rows=removed,
        version=parts.version,
        budget_total=parts.budget_total,
        budget_used=float(s["budget_used"]),
        certified=bool(s["certified"]),
        ledger=counts,
        test=_test_rows(loaded.dataset),
        extra={"snapshot": loaded.name, "removed_in_epoch": int(s["removed_in_epoch"])},
    )
    target.epoch_check = _epoch_check(state_dir, loaded.name, parts, float(s["budget_used"]))
    return target


def target_from_model(model: Model) -> Target:
    """A model in memory (its noise ``b`` included when it still has it: then the audit
    computes the true residual ``||U||_F``). The removed rows are the ones not alive."""
    from core.state import decode  # noqa: PLC0415

    ds = model.dataset
    if ds is None:
        from core.data import Dataset  # noqa: PLC0415

        X, y, ids = model.training_data()
        ds = Dataset(X, y, ids, X[:0], y[:0], None, meta={"name": "in-memory"})
    parts = decode(model.to_state(), ds, model.device)
    return Target(
        source="memory",
        label="model in memory",
        problem=parts.problem,
        hyper=parts.hyper,
        binary=parts.coding.binary,
        classes=list(parts.coding.classes),
        W=parts.epoch.W,
        alive=parts.epoch.alive,
        removed_rows=_removed(parts.epoch.alive),
        version=model.version,
        budget_total=model.budget_total,
        budget_used=model.budget_used,
        certified=model.certified,
        noise=model.noise,
        test=_test_rows(ds),
    )


def release_dirs(
    state_dir: Path, model: str | None, release_dir: Path | None = None
) -> tuple[str, Path]:
    """(model name, its release folder) under ``release_dir`` (default
    ``<state_dir>/releases``).

    Raises:
        AuditError: no releases, or several models and none named (2).
    """
    root = Path(release_dir) if release_dir is not None else Path(state_dir) / RELEASES
    if model is not None:
        try:
            schema.check_model_name(model)
        except ValueError as exc:
            raise AuditError(str(exc)) from None
    models = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if model is None:
        if len(models) != 1:
            what = "no releases" if not models else f"releases of {', '.join(models)}"
            raise AuditError(f"{root}: {what}; name the model with --model")
        model = models[0]
    folder = root / model
    if not folder.is_dir():
        raise AuditError(f"no releases of model {model!r} under {root}")
    return model, folder


def _created_at(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
    return None


def target_from_release(
    state_dir: Path,
    release: int,
    *,
    model: str | None = None,
    release_dir: Path | None = None,
    device: str = "cpu",
) -> Target:
    """Release ``release`` of ``<state_dir>/releases/<model>/``: its weights (verified against
    the manifest's ``content_sha256``) on the state directory's data. Its remaining rows are a
    kept snapshot's with the very same weights when there is one, else every row but those the
    ledger removed at or before the release's ``created_at``.

    Raises:
        AuditError: no such release, a tampered or unreadable one, weights of the wrong shape.
    """
    import torch  # noqa: PLC0415
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load as load_tensors  # noqa: PLC0415

    from core.ids import IdIndex  # noqa: PLC0415
    from core.loading import list_snapshots  # noqa: PLC0415

    state_dir = _need_state(state_dir)
    name, folder = release_dirs(state_dir, model, release_dir)
    path = folder / f"{int(release):08d}"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        blob = (path / "weights.safetensors").read_bytes()
    except FileNotFoundError as exc:
        raise AuditError(
            f"no release {release} of model {name!r} ({exc.filename} missing)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise AuditError(f"release {release} of model {name!r} cannot be read: {exc}", 1) from exc
    if not isinstance(manifest, dict):
        raise AuditError(f"{path / 'manifest.json'} is not a JSON object", 1)
    digest = manifest.get("content_sha256")
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise AuditError(f"{path / 'weights.safetensors'} does not match its manifest", 1)
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError) as exc:
        raise AuditError(f"{path / 'weights.safetensors'} cannot be read: {exc}", 1) from exc
    loaded, parts = _load(state_dir, None, device)
    p = parts.problem
    d, k = p.X.shape[1], p.Y.shape[1]
    W = None
    for key in ("weights", "W", *sorted(tensors)):
        t = tensors.get(key)
        if t is not None and t.numel() == d * k and t.ndim in (1, 2):
            W = t.to(p.X.device, torch.float64).reshape(d, k)
            break
    if W is None:
        raise AuditError(f"release {release} holds no ({d}, {k}) weights for this state", 1)
    alive = None
    snapshot = None
    check = None
    for info in list_snapshots(state_dir):
        if not info.valid:
            continue
        kept, other = _load(state_dir, info.name, device)
        if torch.equal(other.epoch.W, W):
            alive, snapshot = other.epoch.alive, info.name
            used = float(kept.state.state["budget_used"])
            check = _epoch_check(state_dir, info.name, other, used)
            break
    until = _created_at(manifest.get("created_at"))
    rows, counts = _ledger_rows(state_dir, IdIndex(loaded.dataset.ids_train), until)
    if alive is None:
        used = math.nan
        alive = torch.ones_like(parts.epoch.alive)
        alive[torch.as_tensor(rows, dtype=torch.long, device=alive.device)] = False
    counts["rows_from"] = f"snapshot {snapshot}" if snapshot else "ledger up to created_at"
    return Target(
        source="release",
        label=f"release {int(release)} of model {name}",
        problem=p,
        hyper=parts.hyper,
        binary=parts.coding.binary,
        classes=list(parts.coding.classes),
        W=W,
        alive=alive,
        removed_rows=_removed(alive),
        version=manifest.get("model_version"),
        budget_total=parts.budget_total,
        budget_used=None if math.isnan(used) else used,
        certified=manifest.get("certified"),
        ledger=counts,
        epoch_check=check,
        test=_test_rows(loaded.dataset),
        extra={"release": int(release), "model": name, "snapshot": snapshot},
    )


def _epoch_check(state_dir: Path, current: str, parts: Any, used: float) -> dict[str, Any]:
    """An independent upper bound on ``||U||_F`` of the current weights, from the oldest valid
    kept snapshot of the same noise epoch (model version): ``U`` changed since by exactly
    ``grad L_0(W; D') - grad L_0(W_e; D_e)`` (the ``b`` terms cancel), so
    ``||U|| <= budget_used_e + ||that||``, recomputed here in float64 from the two snapshots'
    files alone. It must stay within the budget; the recorded budget used is the worker's own
    bound of the same kind (from its own anchor: the training, or the state it started from)."""
    from core.loading import list_snapshots  # noqa: PLC0415
    from core.loss import frobenius  # noqa: PLC0415

    same = [
        i
        for i in list_snapshots(state_dir)
        if i.valid and i.version == parts.version and i.seq < int(current)
    ]
    if not same:
        return {"available": False, "why": "no older kept snapshot of this noise epoch"}
    oldest = min(same, key=lambda i: i.seq)
    loaded, other = _load(state_dir, oldest.name, str(parts.problem.X.device))
    p = parts.problem
    g_now = grad0(p, parts.epoch.W, parts.epoch.alive)
    g_then = grad0(p, other.epoch.W, other.epoch.alive)
    change = frobenius(g_now - g_then)
    used_then = float(loaded.state.state["budget_used"])
    bound = used_then + change
    # float64 summation of O(n d) terms: a relative slack far above its rounding error
    slack = 1e-9 * max(1.0, parts.budget_total)
    return {
        "available": True,
        "from_snapshot": oldest.name,
        "budget_used_then": used_then,
        "gradient_change": change,
        "independent_bound": bound,
        "recorded_budget_used": used,
        "within_budget": bool(bound <= parts.budget_total + slack),
    }
