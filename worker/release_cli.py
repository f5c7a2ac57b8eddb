"""``certremove release`` (ask the worker to release its model now) and ``certremove releases
list`` (the releases in a release directory). See ``worker/releases.py``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from producer import schema

ModelOpt = Annotated[str, typer.Option("--model", envvar="CERTREMOVE_MODEL", help="Model name.")]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker-url", envvar="CERTREMOVE_BROKER_URL", help="Redis URL (kombu form)."),
]

releases_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="The model's releases (release directory)."
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code=code)


def release(model: ModelOpt = schema.DEFAULT_MODEL, broker_url: BrokerOpt = None) -> None:
    """Ask the model's worker to release its current model now (at its next drain or periodic
    check). Under the `epoch` policy only a noise epoch without a release is released."""
    from producer.cli import open_client  # noqa: PLC0415

    with open_client(broker_url, model) as client:
        client.redis.set(schema.release_request_key(model), repr(time.time()))
        client.ring()
    print(json.dumps({"model": model, "release_requested": True}))


def _default_dir() -> Path:
    env = os.environ.get("CERTREMOVE_RELEASE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("CERTREMOVE_STATE_DIR") or "state") / "releases"


@releases_app.command("list")
def list_cmd(
    release_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="The release directory (default CERTREMOVE_RELEASE_DIR, else "
            "CERTREMOVE_STATE_DIR/releases).",
        ),
    ] = None,
    model: ModelOpt = schema.DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """The releases of a model, oldest first: number, model version, noise epoch, guarantee,
    time and content hash (exit 1 when there is none)."""
    from worker.releases import list_releases, read_latest  # noqa: PLC0415

    root = release_dir or _default_dir()
    try:
        schema.check_model_name(model)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    releases = list_releases(root, model)
    latest = read_latest(root, model)
    if as_json:
        print(
            json.dumps({"model": model, "dir": str(root), "latest": latest, "releases": releases})
        )
    else:
        for m in releases:
            if "error" in m:
                print(f"{m['release']:>6}  error: {m['error']}")
                continue
            try:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(m["created_at"])))
                mark = " (latest)" if m.get("release") == latest else ""
                line = (
                    f"{m['release']:>6}  version {m['model_version']}  epoch {m['noise_epoch']}  "
                    f"eps {float(m['epsilon']):g} delta {float(m['delta']):g}  {when}  "
                    f"sha256 {str(m['content_sha256'])[:16]}{mark}"
                )
            except (KeyError, TypeError, ValueError, OverflowError, OSError) as exc:
                line = f"{m.get('release')!s:>6}  error: {m.get('path')}: bad manifest ({exc!r})"
            print(line)
    if not releases:
        if not as_json:
            typer.echo(f"no release of model {model!r} in {root}", err=True)
        raise typer.Exit(1)
