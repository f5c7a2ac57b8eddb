"""``certremove state``: verify a state directory, list its snapshots, recover from damage.

The main CLI (``worker/cli.py``) mounts :data:`app` as ``certremove state``. A damaged or
tampered state is refused at load (``core.loading``) and at worker start (the removal ledger
check, ``worker.integrity``); these commands show what is wrong and fall back to the newest
valid snapshot without ever undoing a removal:

- ``verify``: CURRENT, every snapshot (checksums, invariants, datasets) and the current model
  against the removal ledger; exit 0 when the current snapshot is valid and consistent, else 1.
- ``snapshots``: the snapshots, newest first, with their version and validity.
- ``recover``: loads the newest valid snapshot, removes again (a retrain from scratch with fresh
  noise) every row the ledger says was removed that is alive in it, saves that as a new snapshot
  and points CURRENT at it. The ledger is never touched.

Human output is a few lines; ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.integrity import check_model, violation_message
from worker.ledger import removed_sample_ids

app = typer.Typer(
    name="state",
    help="Check a state directory and recover from a damaged one (never undoing a removal).",
    no_args_is_help=True,
    add_completion=False,
)

StateOpt = Annotated[Path, typer.Option("--state", help="The state directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]

#: the worker's lock file (``worker.runtime.LOCK_NAME``)
LOCK_NAME = ".worker.lock"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _when(at: float | None) -> str:
    return "?" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _need_dir(state: Path) -> None:
    if not state.is_dir():
        raise _fail(f"{state} is not a directory", 2)


@app.command()
def snapshots(state: StateOpt, as_json: JsonOpt = False) -> None:
    """List the snapshots, newest first: version, time, rows alive, valid or what is wrong."""
    from core.loading import list_snapshots  # noqa: PLC0415 - torch only when needed

    _need_dir(state)
    infos = list_snapshots(state)
    if as_json:
        typer.echo(
            json.dumps({"state": str(state), "snapshots": [dataclasses.asdict(i) for i in infos]})
        )
        return
    if not infos:
        typer.echo(f"{state}: no snapshots")
    for i in infos:
        mark = "*" if i.current else " "
        status = "valid" if i.valid else f"INVALID: {i.problem}"
        typer.echo(
            f"{mark} {i.name}  version {i.version}  saved {_when(i.saved_at)}  "
            f"{i.n_alive} rows alive  {status}"
        )


def verify_state(state: Path) -> dict[str, Any]:
    """Everything ``certremove state verify`` reports, as a JSON-able dict (``ok``: the current
    snapshot is valid and agrees with the removal ledger)."""
    import core  # noqa: PLC0415
    from core.loading import list_snapshots  # noqa: PLC0415
    from core.snapshots import current_snapshot  # noqa: PLC0415
    from worker.ledger import LedgerDamagedError  # noqa: PLC0415

    problems: list[str] = []
    current: str | None = None
    try:
        current = current_snapshot(state)
    except core.StateError as exc:
        problems.append(str(exc))
    infos = list_snapshots(state)
    for info in infos:
        if not info.valid:
            problems.append(f"snapshot {info.name}: {info.problem}")
    current_info = next((i for i in infos if i.current), None)
    current_valid = current_info is not None and current_info.valid
    ledger: dict[str, Any] | None = None
    try:
        removed = removed_sample_ids(state)
    except LedgerDamagedError as exc:
        problems.append(str(exc))
        removed = None
        current_valid = False
    if current_valid and removed is not None:
        model = core.load_model(state, snapshot=current, device="cpu")
        check = check_model(model, removed)
        ledger = {
            "removed_ids": check.removed,
            "alive_rows": len(check.alive_rows),
            "unknown_ids": len(check.unknown_ids),
        }
        if not check.ok:
            problems.append(violation_message(state, model, check))
            current_valid = False
    data_dir = state / "datasets"
    datasets = sorted(p.name for p in data_dir.glob("*.npz")) if data_dir.is_dir() else []
    return {
        "state": str(state),
        "current": current,
        "ok": current_valid,
        "snapshots": [dataclasses.asdict(i) for i in infos],
        "datasets": datasets,
        "ledger": ledger,
        "problems": problems,
    }


@app.command()
def verify(state: StateOpt, as_json: JsonOpt = False) -> None:
    """Check CURRENT, every snapshot, the datasets and the current model against the removal
    ledger. Exit 0 when the current snapshot is valid and consistent, 1 otherwise."""
    _need_dir(state)
    report = verify_state(state)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        valid = sum(1 for s in report["snapshots"] if s["valid"])
        typer.echo(
            f"{state}: current snapshot {report['current'] or '-'}; "
            f"{valid} of {len(report['snapshots'])} snapshots valid"
        )
        if report["ledger"] is not None:
            typer.echo(
                f"ledger: {report['ledger']['removed_ids']} removed ids, "
                f"{report['ledger']['alive_rows']} of them alive in the model"
            )
        for problem in report["problems"]:
            typer.echo(f"problem: {problem}")
        typer.echo(
            "ok" if report["ok"] else f"NOT OK: run `certremove state recover --state {state}`"
        )
    if not report["ok"]:
        raise typer.Exit(code=1)


@contextmanager
def _worker_lock(state: Path) -> Iterator[None]:
    """Hold the worker lock of ``state`` while recovering: no worker may serve it meanwhile."""
    from worker import runtime  # noqa: PLC0415

    path = state.resolve()
    if runtime.holds_state_lock(path):  # this process is the worker (or locked it already)
        yield
        return
    with open(path / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise _fail(f"a worker (pid {holder}) serves {state}: stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _current_seq_named(state: Path) -> int:
    """The sequence number CURRENT names, even when that snapshot is gone (0 if none)."""
    try:
        text = (state / "CURRENT").read_bytes().decode("ascii").strip()
        return int(text.rsplit("/", 1)[-1])
    except (OSError, ValueError):
        return 0


@app.command()
def recover(
    state: StateOpt,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask before writing")] = False,
    device: Annotated[
        str | None,
        typer.Option(envvar="CERTREMOVE_DEVICE", help="cuda or cpu (default: cuda if any)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fall back to the newest valid snapshot: rows the removal ledger says were removed are
    removed again (a retrain with fresh noise), saved as a new snapshot that CURRENT then names.
    Never touches the ledger. Exit 1 when no valid snapshot exists."""
    import core  # noqa: PLC0415
    from core.loading import list_snapshots  # noqa: PLC0415
    from core.snapshots import current_snapshot  # noqa: PLC0415
    from worker.ledger import LedgerDamagedError  # noqa: PLC0415

    _need_dir(state)
    with _worker_lock(state):
        infos = list_snapshots(state)
        chosen = next((i for i in infos if i.valid), None)
        if chosen is None:
            lines = [f"{i.name}: {i.problem}" for i in infos] or ["no snapshots at all"]
            raise _fail(
                f"no valid snapshot in {state} ({'; '.join(lines)}): nothing to recover from; "
                "restore the state directory from a backup"
            )
        try:
            removed = removed_sample_ids(state)
        except LedgerDamagedError as exc:
            raise _fail(f"cannot read the removal ledger: {exc}") from exc
        model = core.load_model(state, snapshot=chosen.name, device=device)
        check = check_model(model, removed)
        if chosen.current and check.ok:
            if as_json:
                typer.echo(json.dumps({"state": str(state), "snapshot": chosen.name,
                                       "changed": False, "version": model.version}))  # fmt: skip
            else:
                typer.echo(
                    f"{state}: the current snapshot {chosen.name} (version {model.version}) is "
                    "valid and agrees with the removal ledger: nothing to do"
                )
            return
        rows = check.alive_rows
        newest = max([model.version, *(i.version for i in infos if i.version is not None)])
        plan = (
            f"{state}: recovering from snapshot {chosen.name} (version {chosen.version}, saved "
            f"{_when(chosen.saved_at)}); {len(rows)} rows alive in it that the ledger says were "
            f"removed will be removed again by a retrain; the result becomes version {newest + 1}"
        )
        if not as_json:
            typer.echo(plan)
        if not yes and not typer.confirm("write the recovered snapshot and point CURRENT at it?"):
            raise _fail("nothing written")
        model.version = newest
        if rows:
            try:
                model.retrain(exclude=rows)  # version + 1; fresh noise: sound for any rows
            except ValueError as exc:  # core refused (no rows left, extractor cover exceeded)
                raise _fail(f"cannot remove the rows again: {exc}") from exc
        else:
            model.version = newest + 1
        # continue after any snapshot number CURRENT ever named (its snapshot may be gone)
        model.save_seq = max(model.save_seq, _current_seq_named(state))
        # The journal's answers (persisted, maybe not yet in the ledger) were applied in the
        # snapshot recovered from, so in the new one too: the worker still records them. Every
        # snapshot there stays (the damaged ones are evidence; later saves prune them).
        journal = core.read_journal(state, chosen.name)
        model.save(state, replace_dataset=True, journal=journal, keep=len(infos) + 1)
        summary = {
            "state": str(state),
            "snapshot": chosen.name,
            "changed": True,
            "rows_re_removed": len(rows),
            "new_snapshot": current_snapshot(state),
            "version": model.version,
            "unknown_ids": len(check.unknown_ids),
        }
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            typer.echo(
                f"recovered: snapshot {chosen.name} -> new snapshot {summary['new_snapshot']} "
                f"(version {model.version}); {len(rows)} rows removed again; CURRENT names it"
            )
        if check.unknown_ids:
            raise _fail(violation_message(state, model, dataclasses.replace(check, alive_rows=[])))
