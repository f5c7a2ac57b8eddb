"""The dead-letter stream of a model: list it, replay entries (``certremove deadletters``).

An entry goes to ``certremove:{model}:deadletter`` only when it failed because of its own content
(no request id, or ``CERTREMOVE_MAX_FAILURES`` processing failures while served alone); the copy
keeps its request id, sample ids and enqueue time, its entry id and the reason. Replaying one
appends it to the request stream again with ``replay_of`` set (the worker then serves it as new
although its request id was answered "dead-lettered"), sets its status back to ``queued`` and
deletes the dead letter, all in one server-side script.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer import schema

# KEYS[1] request stream, KEYS[2] dead-letter stream, KEYS[3] status hash; ARGV[1] dead-letter id,
# ARGV[2] request id, ARGV[3] sample ids, ARGV[4] requested_at. Nothing happens unless the dead
# letter is still there (a second replay of the same one does nothing).
_REPLAY_LUA = """
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'status', 'queued', 'requested_at', ARGV[4])
redis.call('XADD', KEYS[1], '*', 'request_id', ARGV[2], 'sample_ids', ARGV[3],
           'requested_at', ARGV[4], 'replay_of', ARGV[1])
return 1
"""


@dataclass
class DeadLetter:
    """One entry of the dead-letter stream."""

    id: str
    entry_id: str
    request_id: str | None
    sample_ids: str | None
    requested_at: str | None
    reason: str
    other_fields: int


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def list_dead_letters(
    client: redis.Redis, model: str, *, count: int = 1000, start: str = "-"
) -> list[DeadLetter]:
    """The model's dead letters, oldest first (at most ``count``)."""
    out = []
    rows: Any = client.xrange(schema.dead_letter_key(model), min=start, count=count)
    for did, fields in rows or []:
        f: dict[bytes, bytes] = fields or {}
        out.append(
            DeadLetter(
                id=did.decode() if isinstance(did, bytes) else str(did),
                entry_id=_text(f.get(b"entry_id")) or "",
                request_id=_text(f.get(schema.FIELD_REQUEST_ID.encode())),
                sample_ids=_text(f.get(schema.FIELD_SAMPLE_IDS.encode())),
                requested_at=_text(f.get(schema.FIELD_REQUESTED_AT.encode())),
                reason=_text(f.get(b"reason")) or "",
                other_fields=int(_text(f.get(b"other_fields")) or 0),
            )
        )
    return out


def replay_dead_letters(
    client: redis.Redis, model: str, ids: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Replay the dead letters ``ids`` (None: all of them). Returns the request ids queued
    again and, per dead letter that cannot be replayed, why (no request id, gone)."""
    letters = {d.id: d for d in list_dead_letters(client, model, count=1_000_000)}
    wanted = list(letters) if ids is None else ids
    script = client.register_script(_REPLAY_LUA)
    queued: list[str] = []
    refused: dict[str, str] = {}
    for did in wanted:
        d = letters.get(did)
        if d is None:
            refused[did] = "no such dead letter"
            continue
        if not d.request_id:
            refused[did] = "it has no request id, so nobody could read its answer: send it again"
            continue
        if d.sample_ids is None:
            refused[did] = "it has no sample ids: send the request again"
            continue
        done = script(
            keys=[
                schema.stream_key(model),
                schema.dead_letter_key(model),
                schema.status_key(model, d.request_id),
            ],
            args=[did, d.request_id, d.sample_ids, d.requested_at or "0"],
        )
        if done:
            queued.append(d.request_id)
        else:
            refused[did] = "replayed already"
    return queued, refused


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="List and replay dead-lettered requests."
)
_err = Console(stderr=True, soft_wrap=True)
ModelOpt = Annotated[str, typer.Option("--model", envvar="CERTREMOVE_MODEL", help="Model name.")]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker-url", envvar="CERTREMOVE_BROKER_URL", help="Redis URL (kombu form)."),
]


@app.command("list")
def list_command(
    model: ModelOpt = schema.DEFAULT_MODEL,
    broker_url: BrokerOpt = None,
    limit: Annotated[int, typer.Option(help="Most dead letters shown.")] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The dead letters of a model, oldest first, with the reason of each."""
    from producer.cli import open_client  # noqa: PLC0415 - the CLI module builds on this one

    client = open_client(broker_url, model)
    letters = list_dead_letters(client.redis, client.model, count=limit)
    if as_json:
        print(json.dumps([asdict(d) for d in letters]))
        return
    table = Table("dead letter", "request id", "sample ids", "reason")
    for d in letters:
        ids = (d.sample_ids or "")[:60]
        table.add_row(d.id, escape(d.request_id or "-"), escape(ids), escape(d.reason[:200]))
    Console().print(table)
    if not letters:
        _err.print("no dead letters")


@app.command("replay")
def replay_command(
    ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter ids (see `list`).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    model: ModelOpt = schema.DEFAULT_MODEL,
    broker_url: BrokerOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Queue dead-lettered requests again (after fixing what made them fail); exits 1 when
    some could not be replayed."""
    from producer.cli import open_client  # noqa: PLC0415

    if bool(ids) == all_:
        raise typer.BadParameter("name dead-letter ids, or pass --all (not both)")
    client = open_client(broker_url, model)
    queued, refused = replay_dead_letters(client.redis, client.model, None if all_ else ids)
    if queued:
        client.ring()
    result: dict[str, Any] = {"queued": queued, "refused": refused}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"queued again: {len(queued)}")
        for did, why in refused.items():
            _err.print(f"[red]not replayed[/red] {escape(did)}: {escape(why)}", highlight=False)
    if refused:
        raise typer.Exit(1)
