"""The ``certremove`` command: the single composition root (console script ``worker.cli:main``).

It trains models, runs the worker and the demo (so it needs ``core``, imported lazily so that
``enqueue``/``status``/``loadtest`` start fast), and mounts the producer's subcommands and, when
present, ``certremove extractor``. Bad input exits non-zero with one clear line on stderr, never a
traceback: :func:`main` turns usage errors into one line (exit 2) and any unexpected exception
into one line (exit 1; ``CERTREMOVE_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from producer import cli as producer_cli
from producer import schema
from producer.deadletters import app as deadletters_app
from worker import health as worker_health
from worker.cli_common import err, fail, one_line
from worker.owner_cli import app as owner_app
from worker.state_cli import app as state_app
from worker.train_cli import Accounting, Calibration, parse_max_removals, train
from worker.training import train_model

#: ``-h`` is ``--help`` on every command (subcommands inherit the root context's settings)
HELP_OPTIONS = ["-h", "--help"]

app = typer.Typer(
    name="certremove",
    help="Certified data removal as a streaming service (Guo et al., ICML 2020).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
)

for _name in ("enqueue", "status", "loadtest"):
    app.command(_name)(getattr(producer_cli, _name))
app.add_typer(deadletters_app, name="deadletters")
app.add_typer(owner_app, name="owner")
app.add_typer(state_app, name="state")
# releases and receipts (worker/release_cli.py, worker/receipt_cli.py)
from worker import receipt_cli, release_cli  # noqa: E402

app.command("release")(release_cli.release)
app.add_typer(release_cli.releases_app, name="releases")
app.add_typer(receipt_cli.receipt_app, name="receipt")
app.add_typer(receipt_cli.keys_app, name="keys")
app.command("health")(worker_health.health)
app.command("train")(train)

__all__ = [
    "Accounting",
    "Calibration",
    "app",
    "fail",
    "main",
    "parse_max_removals",
    "train_model",
]


def package_version() -> str:
    """The installed ``certremove`` distribution's version (``unknown`` when not installed)."""
    try:
        return metadata.version("certremove")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        print(f"certremove {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    pass


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@app.command()
def worker(
    state: Annotated[Path | None, typer.Option(envvar="CERTREMOVE_STATE_DIR")] = None,
    model: Annotated[str, typer.Option(envvar="CERTREMOVE_MODEL")] = schema.DEFAULT_MODEL,
    broker_url: Annotated[str | None, typer.Option(envvar="CERTREMOVE_BROKER_URL")] = None,
    metrics_port: Annotated[int | None, typer.Option(envvar="CERTREMOVE_METRICS_PORT")] = None,
    device: Annotated[str | None, typer.Option(envvar="CERTREMOVE_DEVICE")] = None,
    loglevel: Annotated[
        str, typer.Option(help="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    ] = "INFO",
    log_format: Annotated[
        str,
        typer.Option(envvar="CERTREMOVE_LOG_FORMAT", help="text, or json (one object per line)."),
    ] = "text",
) -> None:
    """Run the Celery worker (solo pool) that owns the model, in the foreground.

    Start-up fails with one line and a non-zero status (worker.fatal): a bad option or setting
    (2), a state directory problem (3), the metrics port in use or Redis unreachable for
    CERTREMOVE_BROKER_CONNECT_TIMEOUT seconds (4)."""
    if loglevel.strip().upper() not in LOG_LEVELS:  # before anything starts
        raise fail(f"--loglevel must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {loglevel!r}")
    if log_format.strip().lower() not in ("text", "json"):
        raise fail(f"--log-format must be text or json, got {log_format!r}")
    overrides = {
        "CERTREMOVE_STATE_DIR": str(state) if state else None,
        "CERTREMOVE_MODEL": model,
        "CERTREMOVE_BROKER_URL": broker_url,
        "CERTREMOVE_METRICS_PORT": None if metrics_port is None else str(metrics_port),
        "CERTREMOVE_DEVICE": device,
        "CERTREMOVE_LOG_FORMAT": log_format.strip().lower(),
    }
    os.environ.update({k: v for k, v in overrides.items() if v is not None})
    from worker.settings import Settings, SettingsError  # noqa: PLC0415

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise fail(str(exc)) from exc
    from worker import fatal, logs  # noqa: PLC0415
    from worker.integrity import current_problem  # noqa: PLC0415

    fatal.report_at_exit()  # the one error line is printed here, when the worker ends
    logs.configure(loglevel, settings.log_format, model=settings.model)
    if (busy := _metrics_port_problem(settings)) is not None:
        raise fail(*busy)
    if (problem := current_problem(settings.state_dir)) is not None:
        raise fail(problem, fatal.EXIT_STATE)
    from worker.errors import StateLockedError  # noqa: PLC0415
    from worker.runtime import lock_state_dir  # noqa: PLC0415

    try:
        lock_state_dir(settings.state_dir)
    except StateLockedError as exc:
        raise fail(str(exc), fatal.EXIT_STATE) from exc
    from worker.tasks import wait_for_broker  # noqa: PLC0415

    try:
        wait_for_broker(settings)
    except fatal.WorkerFatal as exc:
        raise fail(exc.message, fatal.exit_code(exc.code)) from None
    code = run_celery_worker(settings.model, loglevel, json_logs=settings.log_format == "json")
    if (error := fatal.last()) is not None:
        raise fail(error.message, fatal.exit_code(error.code))
    if code:
        raise fail(f"the worker stopped with status {code} (see the log above)", code)


def _metrics_port_problem(settings: Any) -> tuple[str, int] | None:
    """``(message, exit status)`` when the metrics endpoint cannot bind its address and port
    (checked before the model loads; the worker binds it for good once the model is loaded)."""
    import socket  # noqa: PLC0415

    from worker import fatal  # noqa: PLC0415

    if settings.metrics_port == 0:
        return None
    try:
        infos = socket.getaddrinfo(
            settings.metrics_addr, settings.metrics_port, type=socket.SOCK_STREAM
        )
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the HTTP server binds: a port left in TIME_WAIT is free, one listened on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        code, message = fatal.classify(exc, settings)
        return message, code
    return None


def run_celery_worker(model: str, loglevel: str, *, json_logs: bool = False) -> int:
    """Run the solo-pool Celery worker in this process until it stops; return its exit status.

    Not ``celery_app.worker_main``: it drops the worker's exit code (a failed start would exit 0).
    A fatal error of the worker's own steps is recorded by ``worker.fatal``, printed by the caller.
    ``json_logs``: no start-up banner (every line a JSON object; Celery's logging and its few
    prints go through ``worker.logs``, hooked by ``worker.app``).
    """
    from celery.utils.log import LOG_LEVELS as CELERY_LEVELS  # noqa: PLC0415
    from celery.utils.nodenames import default_nodename, host_format  # noqa: PLC0415

    from worker import fatal  # noqa: PLC0415

    level = CELERY_LEVELS.get(loglevel.upper())
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
        quiet=json_logs,
    )
    celery_worker.start()
    return fatal.exit_code(celery_worker.exitcode)


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=1, help="Deletion requests to send.")] = 300,
    max_removals: Annotated[
        int, typer.Option(min=1, help="Per-epoch removals before a retrain.")
    ] = 100,
    state: Annotated[
        Path | None, typer.Option(help="State directory (default: temporary).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON report.")] = False,
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


@app.command()
def report(
    state: Annotated[
        Path, typer.Option(envvar="CERTREMOVE_STATE_DIR", help="The worker's state directory.")
    ],
    out: Annotated[Path, typer.Option(help="The image to write (.png, .svg or .pdf).")] = Path(
        "report.png"
    ),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Draw the model's history (STATE/history.jsonl): budget used and limit, epoch removals
    and max_removals over time, retrains by reason, test accuracy per version. Operator only:
    the budget figures depend on the secret noise. Exit 1 when there is no history yet."""
    from worker.report import ReportError, write_report  # noqa: PLC0415 - matplotlib only here

    try:
        drawn = write_report(state, out)
    except ReportError as exc:
        raise fail(str(exc), exc.code) from exc
    if as_json:
        print(json.dumps(drawn))
        return
    retrains = sum(drawn["retrains"].values())
    print(
        f"wrote {out}: model {drawn['model']}, {drawn['lines']} history lines, "
        f"{drawn['rows_removed']} rows removed, {retrains} retrains"
    )


@app.command(
    "audit",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def audit(ctx: typer.Context) -> None:
    """Audit the removals offline: the released model against retrains, membership tests, the
    residual against the budget (`certremove audit --help`). INTERNAL ONLY: never publish it."""
    from worker.audit_cli import app as audit_app  # noqa: PLC0415 - torch only when it runs

    code = audit_app(
        args=list(ctx.args),
        prog_name="certremove audit",
        standalone_mode=False,  # errors reach main(): one line each
        help_option_names=HELP_OPTIONS,
    )
    if isinstance(code, int) and code:
        raise typer.Exit(code)


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
    code = extractor_app(
        args=list(ctx.args),
        prog_name="certremove extractor",
        standalone_mode=False,  # errors reach main(): one line each
        help_option_names=HELP_OPTIONS,
    )
    if isinstance(code, int) and code:
        raise typer.Exit(code)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: exits with the command's status; any failure is one line
    on stderr: a usage error exits 2, an unexpected exception 1 (``CERTREMOVE_DEBUG=1``
    re-raises it, with its traceback)."""
    try:
        code = app(args=args, prog_name="certremove", standalone_mode=False)
    except typer.Abort:
        err.print("[red]error:[/red] aborted", highlight=False)
        sys.exit(1)
    except typer.TyperException as exc:  # click's ClickException and UsageError
        code = int(getattr(exc, "exit_code", 1))
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one printed the help already
            err.print(f"[red]error:[/red] {escape(one_line(exc.format_message()))}{_hint(exc)}")
        sys.exit(code)
    except Exception as exc:
        if os.environ.get("CERTREMOVE_DEBUG"):
            raise
        what = "Redis" if type(exc).__module__.split(".")[0] in ("redis", "kombu") else "unexpected"
        err.print(
            f"[red]error:[/red] {what} failure: {type(exc).__name__}: "
            f"{escape(one_line(str(exc)))} (CERTREMOVE_DEBUG=1 shows the traceback)",
            highlight=False,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _hint(exc: Exception) -> str:
    """`` (see 'certremove train -h')`` for a usage error that knows its command."""
    ctx = getattr(exc, "ctx", None)
    return f" (see '{escape(ctx.command_path)} -h')" if ctx is not None else ""


if __name__ == "__main__":
    main()
