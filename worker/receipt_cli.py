"""``certremove keys init`` and ``certremove receipt show|verify|export`` (removal receipts,
``worker/receipts.py`` and ``producer/receipts.py``). Errors are one line on stderr; ``verify``
exits 0 for a valid receipt, 1 for an invalid one, 2 for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Receipt-signing keys.")
receipt_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Removal receipts: show, verify, export."
)

StateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="The state directory (default CERTREMOVE_STATE_DIR, else state)."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Only the receipts of this model."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(code=code)


def _state(state: Path | None) -> Path:
    path = state or Path(os.environ.get("CERTREMOVE_STATE_DIR") or "state")
    if not path.is_dir():
        raise _fail(f"{path} is not a directory")
    return path


@keys_app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", help="Directory for the key pair.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Write a new Ed25519 key pair: receipt-signing.key (0600, for CERTREMOVE_RECEIPT_KEY; keep
    it off the state directory and its backups) and receipt-signing.pub (give it to verifiers)."""
    from worker.receipts import init_keys  # noqa: PLC0415

    try:
        priv, pub = init_keys(out, force=force)
    except (FileExistsError, OSError) as exc:
        raise _fail(str(exc), 1) from None
    from producer.receipts import key_id  # noqa: PLC0415

    print(
        json.dumps(
            {"private_key": str(priv), "public_key": str(pub), "key_id": key_id(pub.read_bytes())}
        )
    )


@receipt_app.command("show")
def show(
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    state: StateOpt = None,
    model: ModelOpt = None,
    with_salt: Annotated[
        bool,
        typer.Option(
            "--with-salt",
            help="Include the salt of the sample-id digest: only for the request's own sender "
            "(with it, whoever knows or guesses the ids can test them against the receipt).",
        ),
    ] = False,
) -> None:
    """The receipt of a request (one JSON line; exit 1 when it has none yet)."""
    from producer.receipts import without_salt  # noqa: PLC0415
    from worker.receipts import find_receipts  # noqa: PLC0415

    found = find_receipts(_state(state), request_id, model)
    if not found:
        raise _fail(f"no receipt for request {request_id!r} (not yet released, or no key)", 1)
    receipt = found[-1] if with_salt else without_salt(found[-1])
    print(json.dumps(receipt, sort_keys=True))


@receipt_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="A receipt (JSON; '-' reads stdin).")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The PEM public key.")],
    sample_ids: Annotated[
        list[str] | None,
        typer.Option("--sample-ids", help="Check these are the ids the request removed."),
    ] = None,
    salt: Annotated[
        str | None,
        typer.Option("--salt", help="The receipt's salt (from its sender), to check --sample-ids."),
    ] = None,
) -> None:
    """Check a receipt's signature (and, with --sample-ids, the ids): exit 0 valid, 1 not."""
    import sys  # noqa: PLC0415

    from producer.receipts import (  # noqa: PLC0415
        InvalidReceipt,
        key_id,
        matches_sample_ids,
        verify_receipt,
    )

    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
        pem = public_key.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read: {exc}") from None
    try:
        key_id(pem)
    except InvalidReceipt as exc:
        raise _fail(f"{public_key}: {exc}") from None
    try:
        receipt = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise _fail(f"invalid: {file} is not JSON ({exc})", 1) from None
    try:
        verify_receipt(receipt, pem)
    except InvalidReceipt as exc:
        raise _fail(f"invalid: {exc}", 1) from None
    if sample_ids:
        ids = [i for chunk in sample_ids for i in chunk.replace(",", " ").split()]
        try:
            matched = matches_sample_ids(receipt, ids, salt)
        except InvalidReceipt as exc:
            raise _fail(str(exc)) from None
        if not matched:
            raise _fail("invalid: the sample ids are not the ones this request removed", 1)
    print(
        f"valid: request {receipt['request_id']} of model {receipt['model']}, release "
        f"{receipt['release']}, key {receipt['key_id']}"
        + (", sample ids match" if sample_ids else "")
    )


@receipt_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Where to write the receipts (JSON lines).")],
    state: StateOpt = None,
    model: ModelOpt = None,
    with_salts: Annotated[
        bool,
        typer.Option("--with-salts", help="Include each receipt's salt (see receipt show)."),
    ] = False,
) -> None:
    """Copy every receipt of the state directory to a JSON-lines file (without their salts
    unless --with-salts)."""
    from worker.receipts import export_receipts  # noqa: PLC0415

    try:
        count = export_receipts(_state(state), out, model, with_salts=with_salts)
    except OSError as exc:
        raise _fail(str(exc), 1) from None
    print(json.dumps({"exported": count, "out": str(out)}))
