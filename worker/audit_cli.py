"""``certremove audit``: the offline removal audit (``worker/audit.py``), internal only.

The main CLI (``worker/cli.py``) forwards ``certremove audit ...`` to :data:`app`. Bad input
exits non-zero with one line on stderr, never a traceback: 2 for bad arguments (no state
directory, a bad ``--out`` suffix, a missing release), 1 when there is nothing to audit (no
model, no removal yet) or the state is damaged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="audit",
    add_completion=False,
    pretty_exceptions_enable=False,
)

HELP = (
    "Audit the removals of the current model (or of --release N): retrain from scratch without "
    "the removed rows (unperturbed, and with --draws fresh noise draws), compare the released "
    "weights with the retrains against the spread of two retrains, test whether a sample of "
    "removed rows' losses tells the released model from a retrain (and the model before "
    "removal from a retrain), and check the gradient residual against the budget.\n\n"
    "INTERNAL ONLY: the figures depend on the secret noise draw; never publish the output. "
    "Offline: reads the state directory only (no Redis, no worker). Exit 0 when the audit "
    "passes, 1 when it fails or there is nothing to audit, 2 on bad arguments."
)


@app.command(help=HELP)
def audit(
    state: Annotated[
        Path, typer.Option(envvar="CERTREMOVE_STATE_DIR", help="The worker's state directory.")
    ],
    out: Annotated[
        list[Path] | None,
        typer.Option(
            help="Write the report: .json (every figure) or .png (the picture); repeatable."
        ),
    ] = None,
    sample: Annotated[
        int, typer.Option(help="Removed rows sampled for the membership tests.")
    ] = 500,
    draws: Annotated[
        int, typer.Option(help="Retrains with fresh noise (the spread and the tests' null).")
    ] = 10,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the audit's own draws and sample (reproducible).")
    ] = None,
    level: Annotated[float, typer.Option(help="Level of the two-sample tests.")] = 0.01,
    release: Annotated[
        int | None,
        typer.Option(help="Audit release N (<state>/releases/<model>/N) instead of the model."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The model of --release (when several have releases).")
    ] = None,
    release_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="CERTREMOVE_RELEASE_DIR",
            help="Where the releases are (default: <state>/releases).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Device of the retrains (cpu, cuda).")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    from worker.audit import AuditError, summary_lines  # noqa: PLC0415
    from worker.audit import audit as run  # noqa: PLC0415

    try:
        report = run(
            state,
            release=release,
            model=model,
            release_dir=release_dir,
            sample=sample,
            draws=draws,
            seed=seed,
            level=level,
            outs=list(out or []),
            device=device,
        )
    except AuditError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(exc.code) from exc
    if as_json:
        typer.echo(json.dumps(report, allow_nan=False))
    else:
        for line in summary_lines(report):
            typer.echo(line)
        for path in out or []:
            typer.echo(f"wrote {path}")
    if not report["verdict"]["pass"]:
        raise typer.Exit(1)
