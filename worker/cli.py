"""The ``certremove`` command: the single composition root (console script ``worker.cli:main``).

It trains models, runs the worker and the demo (so it needs ``core``, imported lazily so that
``enqueue``/``status``/``loadtest`` start fast), and mounts the producer's subcommands and, when
present, ``certremove extractor``. Bad input exits non-zero with one clear line on stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from producer import cli as producer_cli
from producer import schema
from producer.deadletters import app as deadletters_app
from worker.owner_cli import app as owner_app
from worker.state_cli import app as state_app
from worker.training import train_model

app = typer.Typer(
    name="certremove",
    help="Certified data removal as a streaming service (Guo et al., ICML 2020).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)

for _name in ("enqueue", "status", "loadtest"):
    app.command(_name)(getattr(producer_cli, _name))
app.add_typer(deadletters_app, name="deadletters")
app.add_typer(owner_app, name="owner")
app.add_typer(state_app, name="state")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def parse_max_removals(text: str) -> int | float | str | None:
    """``auto``, ``none``, an integer count or a fraction in (0, 1) (``core``'s parser, whose
    ``ValueError`` becomes a bad ``--max-removals``)."""
    from core.trigger import parse_max_removals as parse  # noqa: PLC0415 - torch only here

    try:
        return parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--max-removals") from exc


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="digits, mnist, svhn, synthetic:..., or a .npz")],
    state: Annotated[Path, typer.Option(help="State directory to write.")],
    lam: float = 1e-3,
    sigma: float = 10.0,
    epsilon: float = 1.0,
    delta: float = 1e-4,
    seed: Annotated[
        int | None, typer.Option(help="Tests only: marks the model uncertified.")
    ] = None,
    accounting: str = "exact",
    max_removals: Annotated[str, typer.Option(help="auto, none, a count or a fraction")] = "auto",
    device: Annotated[str | None, typer.Option(envvar="CERTREMOVE_DEVICE")] = None,
    extractor_eps_extra: Annotated[
        float | None, typer.Option(help="DP extractor: extra epsilon allowed (default: --epsilon)")
    ] = None,
    extractor_delta_extra: Annotated[
        float | None, typer.Option(help="DP extractor: extra delta allowed (default: --delta)")
    ] = None,
    overwrite: bool = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train a removal-enabled model and write its state directory."""
    try:
        summary = train_model(
            dataset,
            state,
            overwrite=overwrite,
            lam=lam,
            sigma=sigma,
            epsilon=epsilon,
            delta=delta,
            seed=seed,
            accounting=accounting,
            device=device,
            max_removals=parse_max_removals(max_removals),
            extractor_limit=(extractor_eps_extra, extractor_delta_extra),
        )
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key}: {value}")


@app.command()
def worker(
    state: Annotated[Path | None, typer.Option(envvar="CERTREMOVE_STATE_DIR")] = None,
    model: Annotated[str, typer.Option(envvar="CERTREMOVE_MODEL")] = schema.DEFAULT_MODEL,
    broker_url: Annotated[str | None, typer.Option(envvar="CERTREMOVE_BROKER_URL")] = None,
    metrics_port: Annotated[int | None, typer.Option(envvar="CERTREMOVE_METRICS_PORT")] = None,
    device: Annotated[str | None, typer.Option(envvar="CERTREMOVE_DEVICE")] = None,
    loglevel: str = "INFO",
) -> None:
    """Run the Celery worker (solo pool) that owns the model, in the foreground."""
    overrides = {
        "CERTREMOVE_STATE_DIR": str(state) if state else None,
        "CERTREMOVE_MODEL": model,
        "CERTREMOVE_BROKER_URL": broker_url,
        "CERTREMOVE_METRICS_PORT": None if metrics_port is None else str(metrics_port),
        "CERTREMOVE_DEVICE": device,
    }
    os.environ.update({k: v for k, v in overrides.items() if v is not None})
    from worker.settings import Settings, SettingsError  # noqa: PLC0415

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise fail(str(exc)) from exc
    from worker import fatal  # noqa: PLC0415
    from worker.integrity import current_problem  # noqa: PLC0415

    if (problem := current_problem(settings.state_dir)) is not None:
        raise fail(problem, fatal.EXIT_STATE)
    from worker.errors import StateLockedError  # noqa: PLC0415
    from worker.runtime import lock_state_dir  # noqa: PLC0415

    try:
        lock_state_dir(settings.state_dir)
    except StateLockedError as exc:
        raise fail(str(exc), fatal.EXIT_STATE) from exc
    code = run_celery_worker(settings.model, loglevel)
    if (error := fatal.last()) is not None:
        raise fail(error.message, fatal.exit_code(error.code))
    if code:
        raise fail(f"the worker stopped with status {code} (see the log above)", code)


def run_celery_worker(model: str, loglevel: str) -> int:
    """Run the solo-pool Celery worker in this process until it stops; return its exit status.

    Not ``celery_app.worker_main``: it drops the worker's exit code (a failed start would exit 0).
    A fatal error of the worker's own steps is recorded by ``worker.fatal``, printed by the caller.
    """
    from celery.utils.log import LOG_LEVELS  # noqa: PLC0415
    from celery.utils.nodenames import default_nodename, host_format  # noqa: PLC0415

    from worker import fatal  # noqa: PLC0415

    level = LOG_LEVELS.get(loglevel.upper())
    if not isinstance(level, int):
        raise fail(f"--loglevel must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {loglevel!r}")
    fatal.report_at_exit()
    from worker.app import app as celery_app  # noqa: PLC0415 - reads the settings once

    celery_worker = celery_app.Worker(
        hostname=host_format(default_nodename(f"{model}@%h")),
        pool_cls="solo",
        concurrency=1,
        loglevel=level,
        without_mingle=True,
        without_gossip=True,
    )
    celery_worker.start()
    return fatal.exit_code(celery_worker.exitcode)


@app.command()
def demo(
    requests: Annotated[int, typer.Option(help="Deletion requests to send.")] = 300,
    max_removals: Annotated[int, typer.Option(help="Per-epoch removals before a retrain.")] = 100,
    state: Annotated[
        Path | None, typer.Option(help="State directory (default: temporary).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train on digits, start a worker (and an embedded Redis if none is configured), send
    deletions with a progress bar and print a final report."""
    from worker.demo import run_demo  # noqa: PLC0415

    try:
        report = run_demo(requests=requests, max_removals=max_removals, state=state, quiet=as_json)
    except (ValueError, RuntimeError, OSError) as exc:
        raise fail(str(exc), 1) from exc
    if as_json:
        print(json.dumps(report))


@app.command(
    "extractor",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def extractor(ctx: typer.Context) -> None:
    """DP feature extractor: train it, extract features (`certremove extractor --help`)."""
    try:
        from worker.extractor_cli import app as extractor_app  # noqa: PLC0415
    except ImportError as exc:
        raise fail(f"the extractor commands are not available: {exc}") from exc
    extractor_app(args=list(ctx.args), prog_name="certremove extractor")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="certremove")


if __name__ == "__main__":
    main()
