"""Removal receipts, the verifying side (docs/operations.md "Releases and receipts").

A receipt is a JSON object the worker signs (Ed25519, ``worker/receipts.py``) once the first
release containing a request's removal is out. It names the model, the request id, the release
and model version, the guarantee (epsilon, delta), the method and the times, and commits to the
sample ids the request removed without naming them: ``sample_ids_sha256`` is
``sha256(salt || canonical_ids(ids))`` with a random 128-bit per-receipt ``salt``. The salt is
**not** part of the signed receipt: the worker keeps it beside the receipt in its state directory
(``receipts.jsonl``) and the operator hands it to the requester only (``certremove receipt show
--with-salt``). Whoever holds the receipt alone cannot test guesses of the ids (even ids from a
small set such as row numbers); whoever holds the ids and the salt (the data subject, the client
team, an auditor they give both to) checks them with :func:`matches_sample_ids`.

Canonical forms (what the signature and the digest cover):

- ``canonical_json(obj)``: ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False)`` encoded as UTF-8;
- ``canonical_ids(ids)``: each id normalised as the model keys it (an integer, or a string of
  1-18 ASCII digits with an optional minus sign, becomes an int; any other string stays a string), sorted with ints first
  (numerically) then strings, as ``canonical_json`` of that list;
- the signature covers ``canonical_json`` of every field except ``signature`` and ``salt``;
- ``key_id`` is the first 16 hex digits of sha256 of the raw 32-byte Ed25519 public key.

Only ``cryptography`` (imported when a receipt is verified), never torch, ``core`` or ``worker``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "RECEIPT_FIELDS",
    "InvalidReceipt",
    "canonical_ids",
    "canonical_json",
    "key_id",
    "matches_sample_ids",
    "sample_ids_digest",
    "signed_payload",
    "verify_receipt",
    "without_salt",
]

#: the opening of ``sample_ids_sha256``: stored beside a receipt, never signed (``without_salt``)
SALT_FIELD = "salt"

#: every field of a receipt (``signature`` covers all the others)
RECEIPT_FIELDS = (
    "model",
    "request_id",
    "sample_ids_sha256",
    "release",
    "model_version",
    "epsilon",
    "delta",
    "method",
    "requested_at",
    "applied_at",
    "released_at",
    "key_id",
    "signature",
)
#: a string that names an integer sample id (as ``core`` reads one)
_INT_ID = re.compile(r"-?[0-9]{1,18}")


class InvalidReceipt(ValueError):
    """A receipt that does not verify (the message says why)."""


def canonical_json(obj: Any) -> bytes:
    """The canonical encoding: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _id_key(value: Any) -> int | str:
    if isinstance(value, bool):
        raise TypeError(f"a sample id cannot be a boolean: {value!r}")
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # a numpy scalar
        return _id_key(value.item())
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return int(value) if _INT_ID.fullmatch(value.strip()) else value
    raise TypeError(f"a sample id must be an int or a string, got {type(value).__name__}")


def canonical_ids(ids: Iterable[Any]) -> bytes:
    """The canonical encoding of a set of sample ids (see the module docstring)."""
    keys = [_id_key(v) for v in ids]
    ordered = sorted(keys, key=lambda k: (0, k, "") if isinstance(k, int) else (1, 0, k))
    return canonical_json(ordered)


def sample_ids_digest(salt_hex: str, ids: Iterable[Any]) -> str:
    """``sha256(salt || canonical_ids(ids))`` in hex."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + canonical_ids(ids)).hexdigest()


def signed_payload(receipt: dict[str, Any]) -> bytes:
    """What the signature covers: the canonical JSON of every field but ``signature`` and
    ``salt``."""
    return canonical_json({k: v for k, v in receipt.items() if k not in ("signature", SALT_FIELD)})


def without_salt(receipt: dict[str, Any]) -> dict[str, Any]:
    """The receipt as it may be shown to anyone: without the digest's ``salt``."""
    return {k: v for k, v in receipt.items() if k != SALT_FIELD}


def key_id(public_key_pem: bytes | str) -> str:
    """The key id of a PEM public key (first 16 hex digits of sha256 of its raw bytes)."""
    return key_id_of_raw(_raw_public(_load_public(public_key_pem)))


def key_id_of_raw(raw: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


def _load_public(public_key_pem: bytes | str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_pem_public_key,
    )

    data = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise InvalidReceipt(f"the public key is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidReceipt("the public key is not an Ed25519 key")
    return key


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding,
        PublicFormat,
    )

    return bytes(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def verify_receipt(receipt: dict[str, Any], public_key_pem: bytes | str) -> None:
    """Check a receipt's fields and its signature against ``public_key_pem``.

    Raises:
        InvalidReceipt: a field is missing or malformed, the key id is not this key's, or the
            signature does not verify (the message says which).
    """
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

    if not isinstance(receipt, dict):
        raise InvalidReceipt("a receipt is a JSON object")
    missing = [f for f in RECEIPT_FIELDS if f not in receipt]
    if missing:
        raise InvalidReceipt(f"missing field(s): {', '.join(missing)}")
    for name in ("model", "request_id", "sample_ids_sha256", "key_id", "signature"):
        if not isinstance(receipt[name], str):
            raise InvalidReceipt(f"field {name!r} must be a string")
    key = _load_public(public_key_pem)
    if receipt["key_id"] != key_id_of_raw(_raw_public(key)):
        raise InvalidReceipt(
            f"signed with key {receipt['key_id']}, not with this public key "
            f"({key_id_of_raw(_raw_public(key))})"
        )
    try:
        signature = base64.b64decode(receipt["signature"], validate=True)
    except ValueError as exc:
        raise InvalidReceipt("field 'signature' is not base64") from exc
    try:
        key.verify(signature, signed_payload(receipt))
    except InvalidSignature:
        raise InvalidReceipt("the signature does not match the receipt's fields") from None


def matches_sample_ids(
    receipt: dict[str, Any], ids: Iterable[Any], salt: str | None = None
) -> bool:
    """Whether ``ids`` are exactly the sample ids the receipt's request removed (in any order;
    ``42`` and ``"42"`` are the same id, as for the model), given the receipt's ``salt`` (the
    argument, else a ``salt`` field stored beside the receipt). Checks the digest only: verify
    the signature with :func:`verify_receipt`.

    Raises:
        InvalidReceipt: no salt was given and the receipt carries none, or it is not hex.
    """
    opening = salt if salt is not None else receipt.get(SALT_FIELD)
    if not isinstance(opening, str) or not opening:
        raise InvalidReceipt(
            "checking sample ids needs the receipt's salt (kept by the operator beside the "
            "receipt: `certremove receipt show REQUEST_ID --with-salt`)"
        )
    try:
        bytes.fromhex(opening)
    except ValueError as exc:
        raise InvalidReceipt("the salt is not hex") from exc
    try:
        return bool(sample_ids_digest(opening, ids) == receipt["sample_ids_sha256"])
    except (KeyError, TypeError, ValueError):
        return False
