"""``certremove enqueue``, ``certremove status`` and ``certremove loadtest``.

These commands are mounted into the single ``certremove`` command by ``worker.cli``; they only
need Redis (and Celery to ring the doorbell), never torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, NoReturn

import redis
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer import schema
from producer.client import Client, resolve_broker_url
from producer.loadtest import LoadtestResult, run_loadtest
from producer.overview import overview_table, read_overview
from producer.urls import redact_url

app = typer.Typer(add_completion=False, no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

ModelOpt = Annotated[
    str, typer.Option("--model", envvar="CERTREMOVE_MODEL", help="Model name (stream, queues).")
]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker-url", envvar="CERTREMOVE_BROKER_URL", help="Redis URL (kombu form)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def parse_sample_id(text: str) -> int | str:
    """Integers stay integers (``"42"`` -> 42); anything else is a string id."""
    stripped = text.strip()
    try:
        return int(stripped)
    except ValueError:
        return stripped


#: seconds a command waits to connect to Redis (and for the first answer) before it gives up
CONNECT_TIMEOUT = 5.0


def open_client(broker_url: str | None, model: str) -> Client:
    """A connected client, or exit 2 with a clear one-line message.

    The URL in a message is redacted (a password shows as ``***``), and only the exception's own
    text follows it: redis-py's messages name the host and port, never the password. An
    unreachable broker fails within :data:`CONNECT_TIMEOUT` seconds or so (a URL's own
    ``socket_connect_timeout`` wins), a silent one too: the first ping has a read timeout.
    """
    url = resolve_broker_url(broker_url)
    try:
        schema.check_model_name(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--model'") from None
    try:
        client = Client(url, model=model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--broker-url'") from None
    kwargs = client.redis.connection_pool.connection_kwargs
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    kwargs.setdefault("socket_timeout", None)
    read_timeout = kwargs["socket_timeout"]
    kwargs["socket_timeout"] = CONNECT_TIMEOUT if read_timeout is None else read_timeout
    try:
        client.redis.ping()
        # later commands wait as long as the URL says (forever by default), like the library
        client.redis.connection_pool.disconnect()
        kwargs["socket_timeout"] = read_timeout
    except redis.AuthenticationError as exc:
        client.close()
        if redact_url(url) == url:  # nothing to hide: the URL has no password
            error_exit(
                f"Redis at {url} needs a password: give it in the URL "
                "(redis://:PASSWORD@host:port/db, or rediss:// for TLS)"
            )
        error_exit(f"Redis at {redact_url(url)} refused the credentials: {exc}")
    except (redis.RedisError, OSError) as exc:
        client.close()
        error_exit(f"cannot reach Redis at {redact_url(url)}: {exc}")
    return client


def error_exit(message: str) -> NoReturn:
    """Print ``error: message`` on stderr (markup escaped) and exit 2."""
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


@app.command()
def enqueue(
    ids: Annotated[list[str], typer.Argument(help="Sample ids to delete.")],
    model: ModelOpt = schema.DEFAULT_MODEL,
    broker_url: BrokerOpt = None,
    request_id: Annotated[str | None, typer.Option(help="Reuse a request id.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Enqueue one deletion request; print its request id."""
    with open_client(broker_url, model) as client:
        rid = client.enqueue([parse_sample_id(i) for i in ids], request_id=request_id)
    print(json.dumps({"request_id": rid}) if as_json else rid)


@app.command()
def status(
    request_id: Annotated[
        str | None, typer.Argument(help="A request id; without one, the model overview.")
    ] = None,
    model: ModelOpt = schema.DEFAULT_MODEL,
    broker_url: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the status of a request (exit 1 when the request is unknown); without REQUEST_ID,
    the model overview: version, budget, epoch removals, backlog, dead letters, last retrain,
    guarantee (exit 1 when no worker has published the model yet; operator only)."""
    if request_id is None:
        show_overview(broker_url, model, as_json)
        return
    with open_client(broker_url, model) as client:
        st = client.status(request_id)
    if not st:
        console.print(f"[red]error:[/red] unknown request id {request_id!r} for model {model!r}")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps({"request_id": request_id, **st}))
        return
    for key in schema.STATUS_FIELDS:
        if key in st and st[key] not in ("", None, []):
            print(f"{key}: {st[key]}")


def show_overview(broker_url: str | None, model: str, as_json: bool) -> None:
    """``certremove status`` without a request id (``producer/overview.py``). A model no worker
    has published yet exits 1 with one line (``--json`` still prints the object, backlog
    included, with ``published`` false)."""
    with open_client(broker_url, model) as client:
        now = time.time()
        try:
            ov = read_overview(client.redis, model, now)
        except (redis.RedisError, OSError) as exc:
            error_exit(f"cannot read model {model!r} from Redis: {exc}")
    if as_json:
        print(json.dumps(ov))
    if not ov["published"]:
        if not as_json:
            waiting = ov["backlog"]["waiting"]
            console.print(
                f"[red]error:[/red] no worker has published model {escape(repr(model))} yet "
                f"({waiting} request(s) wait in its stream)"
            )
        raise typer.Exit(1)
    if not as_json:
        Console().print(overview_table(ov, now))


def result_table(result: LoadtestResult, title: str = "certremove loadtest") -> Table:
    """A rich table of a load-test result."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", str(result.requests))
    table.add_row(
        "applied / rejected / not applied",
        f"{result.applied} / {result.rejected} / {result.not_applied}",
    )
    table.add_row("throughput", f"{result.throughput:,.0f} req/s")
    table.add_row(
        "latency p50 / p95 / p99",
        " / ".join(ms(v) for v in (result.latency_p50, result.latency_p95, result.latency_p99)),
    )
    table.add_row("by method", ", ".join(f"{k}={v}" for k, v in result.by_method.items()) or "-")
    table.add_row("retrains", str(result.retrains))
    return table


def check_output_path(path: Path) -> None:
    """Exit 2 with one line unless a file can be written at ``path``: its folder exists, it is
    not a folder, and a file opens there for writing (tried; a new one is removed again)."""
    if not path.parent.is_dir():
        error_exit(f"--output {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        error_exit(f"--output {path} is a directory")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        error_exit(f"--output {path} cannot be written: {exc.strerror or exc}")
    if not existed:
        path.unlink(missing_ok=True)


@app.command()
def loadtest(
    requests: Annotated[int, typer.Option("--requests", min=1, help="Number of requests.")],
    rate: Annotated[float, typer.Option("--rate", min=0, help="Requests/s (0: burst).")],
    ids_per_request: Annotated[int, typer.Option("--ids-per-request", min=1)] = 1,
    first_id: Annotated[int, typer.Option(help="Sample ids are first_id, first_id+1, ...")] = 0,
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the statuses.")
    ] = 300.0,
    output: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
    model: ModelOpt = schema.DEFAULT_MODEL,
    broker_url: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send deletions at a rate and report throughput and enqueue-to-applied latency."""
    if output is not None:
        check_output_path(output)  # before any deletion is sent
    with (
        open_client(broker_url, model) as client,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=as_json,
        ) as progress,
    ):
        sent = progress.add_task("sent", total=requests)
        done = progress.add_task("applied", total=requests)
        result = run_loadtest(
            client,
            requests=requests,
            rate=rate,
            ids_per_request=ids_per_request,
            first_id=first_id,
            timeout=timeout,
            on_sent=lambda k: progress.advance(sent, k),
            on_done=lambda k: progress.advance(done, k),
        )
    payload = json.dumps(result.as_dict())
    if output is not None:
        try:
            output.write_text(payload + "\n")
        except OSError as exc:
            console.print(f"[red]error:[/red] cannot write --output {escape(str(output))}: "
                          f"{escape(exc.strerror or str(exc))}")  # fmt: skip
            raise typer.Exit(1) from None
    if as_json:
        print(payload)
    else:
        Console().print(result_table(result))
    if result.not_applied:
        raise typer.Exit(1)
