"""Load, verify and follow the certified model's releases; predict with them.

``ReleaseClient(source, model)`` reads a model's releases from the release directory the worker
writes (``<release_dir>/<model>/<release:08d>/weights.safetensors`` + ``manifest.json``, and
``LATEST``), or follows them on the stream ``certremove:{model}:releases`` when ``source`` is a
Redis URL or client (the files are then read from ``release_dir=``, else from the path the
stream entry names). Every release is verified before use: the manifest's own hash
(``manifest_sha256``, the sha256 of its canonical JSON without ``manifest_sha256`` and
``signature``), the weights file's ``content_sha256``, the shapes, and, given ``public_key=``
(the receipt-signing public key, PEM), the Ed25519 ``signature`` of the manifest. A release that
fails any check raises :class:`ReleaseIntegrityError` and is never used.

The release is the linear head: ``predict`` scores ``X @ weight`` exactly as the worker's model
does (``core``'s ``Model.predict``: rows as given, no normalisation; binary: ``classes[1]``
where the score is > 0; one-vs-rest: the class of the largest score). ``predict_proba`` gives
``sigmoid(score)`` for a binary model (columns ``classes``) and, one-vs-rest, the sigmoid of each
class's score normalised to sum 1. The training rows were L2-normalised (``manifest["input"]``
says so); a model on DP-extractor features takes the extractor's feature rows, not raw images.

numpy and safetensors only (``cryptography`` only to check a signature): no torch, ``core`` or
``worker``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer import schema
from producer.receipts import canonical_json

__all__ = ["Release", "ReleaseClient", "ReleaseIntegrityError", "manifest_digest"]

WEIGHTS_NAME = "weights.safetensors"
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
WEIGHT_TENSOR = "weight"


class ReleaseIntegrityError(ValueError):
    """A release that does not verify (tampered, damaged or incomplete): never used."""


def manifest_body(manifest: dict[str, Any]) -> bytes:
    """What ``manifest_sha256`` and the signature cover: the canonical JSON of the manifest
    without those two fields."""
    return canonical_json(
        {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "signature")}
    )


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of :func:`manifest_body`."""
    return hashlib.sha256(manifest_body(manifest)).hexdigest()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class Release:
    """One verified release: its number, manifest and weights ((d,) binary, (d, K)
    one-vs-rest, float64)."""

    number: int
    manifest: dict[str, Any]
    weight: np.ndarray
    path: Path

    @property
    def classes(self) -> list[int]:
        return [int(c) for c in self.manifest["classes"]]

    @property
    def binary(self) -> bool:
        return self.weight.ndim == 1

    @property
    def model_version(self) -> int:
        return int(self.manifest["model_version"])

    def _rows(self, X: Any) -> np.ndarray:
        A = np.asarray(X, dtype=np.float64)
        if A.ndim == 1:
            A = A[None, :]
        d = self.weight.shape[0]
        if A.ndim != 2 or A.shape[1] != d:
            raise ValueError(f"expected rows of {d} features, got shape {np.shape(X)}")
        return A

    def decision_function(self, X: Any) -> np.ndarray:
        """The scores ``X @ weight``: (m,) binary, (m, K) one-vs-rest."""
        return self._rows(X) @ self.weight

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (int64), as the worker's model predicts them."""
        s = self.decision_function(X)
        classes = np.asarray(self.classes, dtype=np.int64)
        if self.binary:
            return np.where(s > 0, classes[1], classes[0]).astype(np.int64)
        return classes[np.argmax(s, axis=1)]

    def predict_proba(self, X: Any) -> np.ndarray:
        """(m, len(classes)) probabilities, columns in ``classes`` order."""
        s = self.decision_function(X)
        if self.binary:
            p = _sigmoid(s)
            return np.stack([1.0 - p, p], axis=1)
        p = _sigmoid(s)
        return p / p.sum(axis=1, keepdims=True)


def _verify_signature(manifest: dict[str, Any], public_key_pem: bytes) -> None:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

    from producer.receipts import InvalidReceipt, key_id  # noqa: PLC0415

    sig = manifest.get("signature")
    if not isinstance(sig, str):
        raise ReleaseIntegrityError("the manifest is not signed (no 'signature')")
    try:
        kid = key_id(public_key_pem)
    except InvalidReceipt as exc:
        raise ReleaseIntegrityError(str(exc)) from exc
    if manifest.get("key_id") != kid:
        raise ReleaseIntegrityError(
            f"the manifest is signed with key {manifest.get('key_id')}, not with {kid}"
        )
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_pem_public_key,
    )

    key: Any = load_pem_public_key(public_key_pem)
    try:
        key.verify(base64.b64decode(sig, validate=True), manifest_body(manifest))
    except (InvalidSignature, ValueError):
        raise ReleaseIntegrityError("the manifest's signature does not verify") from None


def load_release(
    directory: Path, *, model: str | None = None, public_key: bytes | None = None
) -> Release:
    """Read and verify the release in ``directory``.

    Raises:
        ReleaseIntegrityError: a file is missing, does not parse or does not match its hash, the
            shapes disagree, or (with ``public_key``) the signature does not verify.
    """
    from safetensors.numpy import load as load_tensors  # noqa: PLC0415

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_bytes())
        weights_bytes = (directory / WEIGHTS_NAME).read_bytes()
    except (OSError, ValueError) as exc:
        raise ReleaseIntegrityError(f"{directory}: cannot read the release: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ReleaseIntegrityError(f"{directory}: the manifest is not a JSON object")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ReleaseIntegrityError(f"{directory}: the manifest does not match its manifest_sha256")
    if hashlib.sha256(weights_bytes).hexdigest() != manifest.get("content_sha256"):
        raise ReleaseIntegrityError(f"{directory}: the weights do not match content_sha256")
    if public_key is not None:
        _verify_signature(manifest, public_key)
    if model is not None and manifest.get("model") != model:
        raise ReleaseIntegrityError(
            f"{directory}: a release of model {manifest.get('model')!r}, not {model!r}"
        )
    if directory.name.isdigit() and int(directory.name) != manifest.get("release"):
        raise ReleaseIntegrityError(
            f"{directory}: the manifest names release {manifest.get('release')}"
        )
    try:
        weight = load_tensors(weights_bytes)[WEIGHT_TENSOR].astype(np.float64)
        classes = [int(c) for c in manifest["classes"]]
        shape = [int(s) for s in manifest["weights"]["shape"]]
    except Exception as exc:  # noqa: BLE001 - whatever is wrong, the release is refused
        raise ReleaseIntegrityError(f"{directory}: unreadable weights or manifest: {exc}") from exc
    if list(weight.shape) != shape or shape[0] != manifest.get("feature_dim"):
        raise ReleaseIntegrityError(f"{directory}: the weights' shape disagrees with the manifest")
    k = 2 if weight.ndim == 1 else weight.shape[1]
    if len(classes) != k or not np.isfinite(weight).all():
        raise ReleaseIntegrityError(f"{directory}: the weights disagree with the classes")
    return Release(int(manifest["release"]), manifest, weight, directory)


class ReleaseClient:
    """The releases of one model: the latest, verified; newer ones as they come.

    Args:
        source: the release directory (``CERTREMOVE_RELEASE_DIR``: holds ``<model>/``), or a
            Redis URL or redis-py client to follow the releases stream.
        model: the model name.
        release_dir: with a Redis source, where the release files are (default: the path each
            stream entry names, i.e. as the worker sees it).
        public_key: PEM public key (bytes, str or a path) whose signature every manifest must
            carry; None checks the hashes only.
        poll_interval: seconds between two looks at ``LATEST`` in :meth:`follow` (directory
            source).
    """

    def __init__(
        self,
        source: Any,
        model: str = schema.DEFAULT_MODEL,
        *,
        release_dir: str | Path | None = None,
        public_key: bytes | str | Path | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.model = schema.check_model_name(model)
        self.redis: Any = None
        if isinstance(source, str) and "://" in source:
            import redis  # noqa: PLC0415

            from producer.client import redis_py_url  # noqa: PLC0415

            self.redis = redis.Redis.from_url(redis_py_url(source))
            self.root = None if release_dir is None else Path(release_dir)
        elif isinstance(source, str | Path):
            self.root = Path(source)
        else:  # a redis-py client
            self.redis = source
            self.root = None if release_dir is None else Path(release_dir)
        self.public_key = _read_key(public_key)
        self.poll_interval = float(poll_interval)
        self.current: Release | None = None
        self._last_entry = "0-0"

    # ------------------------------------------------------------ locating releases
    def _model_dir(self) -> Path:
        if self.root is None:
            raise ReleaseIntegrityError("no release directory (pass release_dir=)")
        return self.root / self.model

    def _dir_of(self, number: int, path: str | None = None) -> Path:
        if self.root is None and path:
            return Path(path)
        return self._model_dir() / f"{int(number):08d}"

    def latest_number(self) -> int | None:
        """The newest release number (``LATEST``, or the stream's last entry); None: none."""
        if self.redis is not None:
            entries = self.redis.xrevrange(schema.releases_key(self.model), count=1)
            if entries:
                return int(_field(entries[0][1], "release"))
            if self.root is None:
                return None
        try:
            text = (self._model_dir() / LATEST_NAME).read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise ReleaseIntegrityError(f"LATEST holds {text[:40]!r}, not a release number")
        return int(text)

    def load(self, number: int, path: str | None = None) -> Release:
        """Release ``number``, verified (:class:`ReleaseIntegrityError` otherwise)."""
        if path is None and self.root is None and self.redis is not None:
            path = self._stream_path(number)
        release = load_release(
            self._dir_of(number, path), model=self.model, public_key=self.public_key
        )
        if release.number != int(number):
            raise ReleaseIntegrityError(f"asked for release {number}, read {release.number}")
        return release

    def _stream_path(self, number: int) -> str | None:
        for _eid, fields in reversed(self.redis.xrange(schema.releases_key(self.model))):
            if int(_field(fields, "release")) == int(number):
                return _field(fields, "path")
        return None

    def latest(self) -> Release:
        """The newest release, verified and made current.

        Raises:
            LookupError: no release yet.
            ReleaseIntegrityError: the newest release does not verify.
        """
        number = self.latest_number()
        if number is None:
            raise LookupError(f"model {self.model!r} has no release yet")
        if self.current is None or self.current.number != number:
            self.current = self.load(number)
        return self.current

    def refresh(self) -> bool:
        """Load a newer release if there is one; True when the current release changed."""
        before = None if self.current is None else self.current.number
        number = self.latest_number()
        if number is None or number == before:
            return False
        self.latest()
        return True

    def follow(self, timeout: float | None = None) -> Iterator[Release]:
        """Yield each new release as it comes (the current one first when there is none yet);
        stops after ``timeout`` seconds without one (None: never). With a Redis source it
        blocks on the stream; otherwise it polls ``LATEST``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.current is None:
            if self.redis is not None:
                # the stream's end before the first release: none announced meanwhile is missed
                last = self.redis.xrevrange(schema.releases_key(self.model), count=1)
                self._last_entry = _s(last[0][0]) if last else "0-0"
            try:
                first = self.latest()
            except LookupError:
                pass
            else:
                yield first
        while deadline is None or time.monotonic() < deadline:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if self.redis is not None:
                got = self.redis.xread(
                    {schema.releases_key(self.model): self._last_entry},
                    count=100,
                    block=max(1, int(min(wait, 5.0) * 1000)),
                )
                for _stream, entries in got or []:
                    for eid, fields in entries:
                        self._last_entry = _s(eid)
                        number = int(_field(fields, "release"))
                        if self.current is not None and number <= self.current.number:
                            continue
                        self.current = self.load(
                            number, None if self.root else _field(fields, "path")
                        )
                        yield self.current
            else:
                if self.refresh() and self.current is not None:
                    yield self.current
                    continue
                time.sleep(min(self.poll_interval, wait) if wait > 0 else 0)
            if deadline is not None and time.monotonic() >= deadline:
                return

    # ------------------------------------------------------------ prediction
    def _release(self) -> Release:
        return self.current if self.current is not None else self.latest()

    def predict(self, X: Any) -> np.ndarray:
        """Labels for rows ``X`` with the current release (the latest when none is loaded)."""
        return self._release().predict(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities for rows ``X`` (columns in ``classes`` order)."""
        return self._release().predict_proba(X)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: dict[Any, Any], name: str) -> str:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        raise ReleaseIntegrityError(f"a releases stream entry without {name!r}")
    return _s(value)


def _read_key(key: bytes | str | Path | None) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, bytes):
        return key
    if isinstance(key, str) and "-----BEGIN" in key:
        return key.encode()
    return Path(key).read_bytes()
