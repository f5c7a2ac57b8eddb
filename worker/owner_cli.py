"""``certremove owner show|reset``: who holds a model's lease, and which state directory
persisted it last (see ``worker.state_marker``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from producer import schema
from worker.state_marker import reset_owner

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="The model's owner (lease) and state record."
)
ModelOpt = Annotated[str, typer.Option("--model", envvar="CERTREMOVE_MODEL", help="Model name.")]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker-url", envvar="CERTREMOVE_BROKER_URL", help="Redis URL (kombu form)."),
]


def _decode(raw: Any) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in dict(raw or {}).items()}


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@app.command("show")
def show(model: ModelOpt = schema.DEFAULT_MODEL, broker_url: BrokerOpt = None) -> None:
    """The lease holder (if any) and the state directory that persisted the model last."""
    from producer.cli import open_client  # noqa: PLC0415

    client = open_client(broker_url, model)
    r = client.redis
    token = r.get(schema.lease_key(model))
    holder = _decode(r.hgetall(f"{schema.lease_key(model)}:owner")) if token else {}
    ttl = r.pttl(schema.lease_key(model)) if token else None
    print(
        json.dumps(
            {
                "model": model,
                "lease": {"token": int(token), "expires_in_ms": ttl, **holder} if token else None,
                "last_state": _decode(r.hgetall(schema.state_marker_key(model))) or None,
            }
        )
    )


@app.command("reset")
def reset(
    model: ModelOpt = schema.DEFAULT_MODEL,
    broker_url: BrokerOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do it (otherwise only say what).")] = False,
) -> None:
    """Forget which state directory served the model last, so that another one may serve it.

    Only when the directory that served it last is lost for good: the requests applied only
    there are in that directory's model and ledger, and must be sent again."""
    from producer.cli import open_client  # noqa: PLC0415

    client = open_client(broker_url, model)
    if not yes:
        current = _decode(client.redis.hgetall(schema.state_marker_key(model)))
        print(json.dumps({"would_forget": current or None, "run_again_with": "--yes"}))
        raise typer.Exit(1)
    print(json.dumps({"forgot": reset_owner(client.redis, model) or None}))
