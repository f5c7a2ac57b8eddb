"""What a loaded snapshot must satisfy to be served: the invariants of ``state.json`` and the
tensors against the dataset (a state the code could have written). Pure checks; every failure is
a :class:`core.errors.StateDamagedError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.data import Dataset
from core.errors import InvalidInputError, StateDamagedError
from core.labels import LabelCoding
from core.problem import Hyper
from core.snapshots import MODEL_FILE, STATE_FILE, damaged, is_int, is_number


def check_invariants(
    root: Path,
    snap: Path,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    ds: Dataset,
) -> None:
    """The loaded state must be one the code could have written."""
    sp, mp = snap / STATE_FILE, snap / MODEL_FILE

    def bad_state(what: str) -> StateDamagedError:
        return damaged(root, sp, what)

    def bad_model(what: str) -> StateDamagedError:
        return damaged(root, mp, what)

    for key in ("version", "seq", "n_alive", "n_rows", "removed_in_epoch", "safety_retrains"):
        if not is_int(state.get(key)) or state[key] < 0:
            raise bad_state(f"has a bad {key} {state.get(key)!r} (a non-negative integer)")
    for key in ("budget_total", "budget_used", "x_norm2"):
        if not is_number(state.get(key)) or state[key] < 0:
            raise bad_state(f"has a bad {key} {state.get(key)!r} (finite and non-negative)")
    if state["budget_total"] <= 0:
        raise bad_state(f"has a bad budget_total {state['budget_total']!r} (positive)")
    classes, binary = state.get("classes"), state.get("binary")
    if (
        not isinstance(binary, bool)
        or not isinstance(classes, list)
        or not all(is_int(c) for c in classes)
        or len(classes) < 2
        or (binary and len(classes) != 2)
    ):
        raise bad_state(f"has bad classes {classes!r} (binary={binary!r})")
    hyper = state.get("hyper")
    try:
        h = Hyper(**hyper) if isinstance(hyper, dict) else None
    except TypeError:
        h = None
    if h is None or not is_number(h.lam) or h.lam <= 0:
        raise bad_state("has bad hyper-parameters")
    if not isinstance(state.get("certified"), bool):
        raise bad_state(f"has a bad certified {state.get('certified')!r}")
    basis = state.get("auto_basis")
    if basis is not None and not (
        isinstance(basis, list) and len(basis) == 2 and all(is_int(v) for v in basis)
    ):
        raise bad_state(f"has a bad auto_basis {basis!r}")
    mr = state.get("max_removals_resolved")
    if mr is not None and (not is_int(mr) or mr < 0):
        raise bad_state(f"has a bad max_removals_resolved {mr!r}")
    if not isinstance(state.get("extra", {}) or {}, dict):
        raise bad_state("has a bad extra (a JSON object)")
    if not is_int(state.get("extractor_removed", 0)) or state.get("extractor_removed", 0) < 0:
        raise bad_state("has a bad extractor_removed")

    n, d = ds.X_train.shape[0], ds.X_train.shape[1]
    k = 1 if binary else len(classes)
    if state["n_rows"] != n:
        raise bad_state(f"says n_rows={state['n_rows']}, the dataset holds {n} rows")
    expected = {"weights", "alive"} | ({"omega"} if h.subsample_ratio is not None else set())
    if set(tensors) != expected:
        raise bad_model(f"holds the tensors {sorted(tensors)}, expected {sorted(expected)}")
    W, alive = tensors["weights"], tensors["alive"]
    if W.dtype != torch.float64 or tuple(W.shape) != (d, k):
        raise bad_model(
            f"holds weights of shape {tuple(W.shape)} {W.dtype}, expected ({d}, {k}) float64"
        )
    if not bool(torch.isfinite(W).all()):
        raise bad_model("holds non-finite weights")
    if alive.dtype != torch.uint8 or tuple(alive.shape) != (n,) or bool((alive > 1).any()):
        raise bad_model(
            f"holds a bad alive mask (shape {tuple(alive.shape)} {alive.dtype}; expected ({n},) "
            "of 0/1 bytes)"
        )
    count = int(alive.sum())
    if count != state["n_alive"]:
        raise bad_model(
            f"holds an alive mask with {count} rows alive but state.json says "
            f"n_alive={state['n_alive']}"
        )
    if "omega" in tensors:
        omega = tensors["omega"]
        if omega.dtype != torch.uint8 or tuple(omega.shape) != (n, k) or bool((omega > 1).any()):
            raise bad_model(f"holds a bad subsampling mask (shape {tuple(omega.shape)})")
    try:
        LabelCoding(tuple(classes), binary).encode(ds.y_train)
    except InvalidInputError as exc:
        raise bad_state(f"has classes that do not fit the dataset's labels ({exc})") from exc
