"""Removal receipts, the signing side: the key pair, signing, and ``STATE_DIR/receipts.jsonl``.

The worker signs a receipt (Ed25519, key ``CERTREMOVE_RECEIPT_KEY``) for every applied request
once the first release containing its removal is out (``worker/releases.py``), and appends it to
``receipts.jsonl`` in the state directory: whole lines, fsynced, kept for good (neither the status
TTL nor the ledger's rotation touches it), read back by ``certremove receipt show|export``. A
receipt never holds a sample id: only the salted digest (``producer/receipts.py`` has the
canonical forms and the verification).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from producer.receipts import (
    SALT_FIELD,
    canonical_json,
    key_id_of_raw,
    sample_ids_digest,
    signed_payload,
    without_salt,
)
from worker.ledger import write_whole

log = logging.getLogger("certremove.worker")

RECEIPTS_NAME = "receipts.jsonl"
PRIVATE_KEY_NAME = "receipt-signing.key"
PUBLIC_KEY_NAME = "receipt-signing.pub"


class ReceiptKeyError(ValueError):
    """The receipt-signing key cannot be read or is not an Ed25519 private key."""


def init_keys(out_dir: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``receipt-signing.key`` (PKCS8 PEM, mode 0600) and
    ``receipt-signing.pub`` (SubjectPublicKeyInfo PEM) in ``out_dir``. Returns both paths.

    Raises:
        FileExistsError: a key file is there already (``force`` replaces it).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    if not force:
        for path in (priv_path, pub_path):
            if path.exists():
                raise FileExistsError(f"{path} exists already (--force replaces it)")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    tmp = out_dir / f".{PRIVATE_KEY_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, private)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, priv_path)
    pub_path.write_bytes(public)
    return priv_path, pub_path


class ReceiptSigner:
    """Signs receipts with one Ed25519 private key.

    Raises:
        ReceiptKeyError: the file cannot be read or holds no Ed25519 private key.
    """

    def __init__(self, private_key_path: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
            Encoding,
            PublicFormat,
            load_pem_private_key,
        )

        path = Path(private_key_path)
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ReceiptKeyError(
                f"cannot read the receipt-signing key {path}: {exc} (create one with "
                "'certremove keys init --out DIR')"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ReceiptKeyError(f"{path} is not an Ed25519 private key")
        self._key = key
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of_raw(bytes(raw))
        self.public_pem = key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )

    def sign_bytes(self, data: bytes) -> str:
        """The base64 Ed25519 signature of ``data``."""
        return base64.b64encode(self._key.sign(data)).decode()

    def receipt(
        self,
        *,
        model: str,
        request_id: str,
        removed_ids: Iterable[Any],
        release: int,
        model_version: int | None,
        epsilon: float,
        delta: float,
        method: str,
        requested_at: float | None,
        applied_at: float | None,
        released_at: float,
    ) -> dict[str, Any]:
        """A signed receipt (the ids only as a salted digest), with its ``salt`` beside the
        signed fields (kept in the state directory; shown only with ``--with-salt``)."""
        salt = secrets.token_hex(16)
        fields: dict[str, Any] = {
            "model": model,
            "request_id": str(request_id),
            "sample_ids_sha256": sample_ids_digest(salt, removed_ids),
            "release": int(release),
            "model_version": model_version,
            "epsilon": float(epsilon),
            "delta": float(delta),
            "method": method,
            "requested_at": requested_at,
            "applied_at": applied_at,
            "released_at": float(released_at),
            "key_id": self.key_id,
        }
        fields["signature"] = self.sign_bytes(signed_payload(fields))
        fields[SALT_FIELD] = salt
        return fields


def receipts_path(state_dir: Path) -> Path:
    return Path(state_dir) / RECEIPTS_NAME


def read_receipts(state_dir: Path) -> Iterator[dict[str, Any]]:
    """Every receipt of a state directory, oldest first (a torn last line is skipped)."""
    path = receipts_path(state_dir)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn by a crash: its request is receipted again
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("skipping a damaged line of %s", path)
                continue
            if isinstance(rec, dict):
                yield rec


class ReceiptStore:
    """``STATE_DIR/receipts.jsonl``: appends whole lines (fsynced), knows which requests have a
    receipt (read once at start)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = receipts_path(state_dir)
        self.issued: set[str] = {str(r.get("request_id")) for r in read_receipts(state_dir)}
        self._size: int | None = None

    def append(self, receipts: list[dict[str, Any]]) -> None:
        """Append ``receipts`` (whole lines or nothing, like the ledger)."""
        if not receipts:
            return
        data = b"".join(canonical_json(r) + b"\n" for r in receipts)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if self._size is not None and end > self._size:
                os.ftruncate(fd, self._size)  # a write that failed part-way before
                end = self._size
            elif self._size is None:
                # a torn last line of a crash: cut it (its request is receipted again)
                os.lseek(fd, 0, os.SEEK_SET)
                with open(self.path, "rb") as f:
                    whole = f.read()
                end = whole.rfind(b"\n") + 1
                os.ftruncate(fd, end)
            try:
                write_whole(fd, data, end)
            except BaseException:
                self._size = end
                raise
            self._size = end + len(data)
        finally:
            os.close(fd)
        self.issued.update(str(r["request_id"]) for r in receipts)


def find_receipts(
    state_dir: Path, request_id: str, model: str | None = None
) -> list[dict[str, Any]]:
    """The receipts of ``request_id`` (of ``model`` when given), oldest first."""
    return [
        r
        for r in read_receipts(state_dir)
        if str(r.get("request_id")) == request_id and (model is None or r.get("model") == model)
    ]


def export_receipts(
    state_dir: Path, out: Path, model: str | None = None, *, with_salts: bool = False
) -> int:
    """Copy every receipt (of ``model`` when given) to ``out`` as JSON lines, without their
    salts unless ``with_salts``; returns how many."""
    count = 0
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    with open(tmp, "wb") as f:
        for r in read_receipts(state_dir):
            if model is None or r.get("model") == model:
                f.write(canonical_json(r if with_salts else without_salt(r)) + b"\n")
                count += 1
    os.replace(tmp, out)
    return count
