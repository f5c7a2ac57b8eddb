"""The state directory against the removal ledger: what the ledger says was removed stays removed.

Used at worker start (:func:`worker.runtime.load_model`), by ``certremove train`` (never over a
populated directory) and by ``certremove state verify|recover`` (``worker/state_cli.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import StateDamagedError

#: how many ids a message shows
SHOWN = 5


def state_contents(state_dir: Path) -> list[str]:
    """What a state directory holds of a model's state and its removal record, one phrase per
    kind (empty for a new or empty directory)."""
    state_dir = Path(state_dir)
    found = []
    if (state_dir / "CURRENT").exists():
        found.append("a CURRENT pointer")
    snaps = state_dir / "snapshots"
    n_snaps = len([p for p in snaps.iterdir() if p.name.isdigit()]) if snaps.is_dir() else 0
    if n_snaps:
        found.append(f"{n_snaps} snapshot(s)")
    data = state_dir / "datasets"
    n_data = len(list(data.glob("*.npz"))) if data.is_dir() else 0
    if n_data:
        found.append(f"{n_data} dataset file(s)")
    ledgers = [p for p in state_dir.glob("ledger*") if p.is_file()] if state_dir.is_dir() else []
    if ledgers:
        found.append("a removal ledger (" + ", ".join(sorted(p.name for p in ledgers)[:3]) + ")")
    return found


def no_model_message(state_dir: Path) -> str:
    """What to say when a worker finds no loadable ``CURRENT`` in ``state_dir``: ``certremove
    train`` only for a new directory, never over a removal record."""
    found = state_contents(state_dir)
    snaps = any("snapshot" in f for f in found)
    if snaps:
        return (
            f"no valid CURRENT in {state_dir}, which holds {', '.join(found)}: run "
            f"`certremove state recover --state {state_dir}` to fall back to the latest valid "
            "snapshot (never train over it: that would bring removed rows back)"
        )
    if found:
        return (
            f"no model in {state_dir}, which holds {', '.join(found)} but no snapshot: the model's "
            "state is lost; restore the state directory from a backup (training a new model "
            "over it would bring removed rows back)"
        )
    return f"no model in {state_dir}: run `certremove train --state {state_dir}`"


def current_problem(state_dir: Path) -> str | None:
    """Why ``state_dir``'s CURRENT cannot name a model (missing, damaged, naming no snapshot),
    with what to do; None when it names an existing snapshot (which a load still verifies)."""
    if not (Path(state_dir) / "CURRENT").exists():
        return no_model_message(state_dir)
    from core.errors import StateError  # noqa: PLC0415 - torch only in the worker
    from core.snapshots import current_snapshot  # noqa: PLC0415

    try:
        current_snapshot(state_dir)
    except StateError as exc:
        return str(exc)
    return None


@dataclass
class LedgerCheck:
    """The model against the sample ids the ledger says were removed."""

    #: distinct ids the ledger says were removed
    removed: int = 0
    #: rows of those ids still alive in the model (sorted)
    alive_rows: list[int] = field(default_factory=list)
    #: ids the model neither has as rows nor lists as excluded (a foreign dataset)
    unknown_ids: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.alive_rows and not self.unknown_ids


def check_model(model: Any, sample_ids: list[Any]) -> LedgerCheck:
    """Which of ``sample_ids`` (removed, says the ledger) the model has not removed: rows still
    alive, or ids neither a row nor in ``model.excluded_ids``. One pass over the list."""
    import torch  # noqa: PLC0415 - the worker has loaded it already

    key = model.sample_id_key
    by_key: dict[Any, Any] = {}
    for value in sample_ids:  # one id named twice ("42" and 42) counts once
        k = key(value)
        by_key.setdefault(("raw", repr(value)) if k is None else k, value)
    distinct = list(by_key.values())
    rows, unknown = model.rows_for_ids(distinct)
    alive_rows: list[int] = []
    if rows:
        index = torch.as_tensor(rows, dtype=torch.long)
        mask = model.alive.cpu()[index]
        alive_rows = sorted(set(index[mask].tolist()))
    excluded = model.excluded_ids
    missing = [v for v in unknown if key(v) is None or key(v) not in excluded]
    return LedgerCheck(removed=len(distinct), alive_rows=alive_rows, unknown_ids=missing)


def violation_message(state_dir: Path, model: Any, check: LedgerCheck) -> str:
    """One line on a failed :func:`check_model`, with what to do."""
    parts = []
    if check.alive_rows:
        ids = [model.ids[r].item() for r in check.alive_rows[:SHOWN]]
        parts.append(
            f"the model in {state_dir} has {len(check.alive_rows)} rows alive that the ledger "
            f"says were removed (ids {ids}{', ...' if len(check.alive_rows) > SHOWN else ''}; "
            f"tampered or rolled back): run `certremove state recover --state {state_dir}`"
        )
    if check.unknown_ids:
        shown = check.unknown_ids[:SHOWN]
        parts.append(
            f"{len(check.unknown_ids)} ids the ledger of {state_dir} says were removed are "
            f"neither rows of the model's data nor excluded ids (e.g. {shown}): the model and "
            "its ledger do not belong together; restore the state directory from a backup"
        )
    return "; ".join(parts)


def verify_against_ledger(
    model: Any, state_dir: Path, removed_ids: list[Any] | None = None
) -> LedgerCheck:
    """Raise unless every id the ledger says was removed (``removed_ids``, else read from the
    ledger files of ``state_dir``) is removed in ``model``.

    Raises:
        StateDamagedError: rows alive the ledger says were removed, ids unknown to the model, or
            a ledger that cannot be read.
    """
    from worker.ledger import LedgerDamagedError, removed_sample_ids  # noqa: PLC0415

    if removed_ids is None:
        try:
            removed_ids = removed_sample_ids(Path(state_dir))
        except LedgerDamagedError as exc:
            raise StateDamagedError(str(exc)) from exc
    check = check_model(model, removed_ids)
    if not check.ok:
        raise StateDamagedError(violation_message(state_dir, model, check))
    return check
