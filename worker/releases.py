"""Releases of the certified model: the release writer, the policy, and what each release covers.

A release is the served model's linear head as it was persisted, written outside the private
state (``CERTREMOVE_RELEASE_DIR``, default ``STATE_DIR/releases``: point it at a volume of its
own) as ``<release_dir>/<model>/<release:08d>/weights.safetensors`` + ``manifest.json``: written
into a temporary directory, fsynced and renamed into place, then ``<release_dir>/<model>/LATEST``
(the release number) replaced atomically. Each release is announced on the stream
``certremove:{model}:releases``. Release numbers start at 1 and grow by 1 per model.

**The policy** (``CERTREMOVE_RELEASE_POLICY``) says which persisted versions are released:

- ``epoch`` (default): only versions with fresh noise, i.e. the first persisted version of each
  noise epoch (a retrain, or a background epoch's catch-up step), never two of one epoch. Two
  releases that share one noise draw ``b`` differ by a ``b``-free Newton step that is a function
  of the rows removed in between: their difference leaks those rows (docs/theory.md "What is
  certified": the guarantee is per release, for an observer who never saw an earlier release
  of the same epoch that still contained them).
- ``every``: each persisted version (at the end of a batch; the leak above, for operators who
  accept it).
- ``interval:T``: at most one release per ``T`` seconds, the latest persisted version when it
  has removals not yet released (releases of one epoch leak as with ``every``).
- ``manual``: only when asked (``certremove release``). Under ``epoch`` a manual request is
  honoured only for an epoch without a release.

The trained model is released once at start when no release exists for it (policy permitting).

**What a release covers.** A release is made only where the model in memory is the persisted
one and every answer of it is in the ledger (after the answers of a batch are published), so it
covers exactly the ledger records appended since the previous release: the record of each
release in ``STATE_DIR/releases.jsonl`` keeps that range of ledger positions (segments are kept
for good, so positions never change), and an ``announced`` line once the release's stream entry,
the ``released_version``/``released_at`` fields of the statuses (only where the status hash still
exists: an expired status is never written again) and the receipts (``worker/receipts.py``) are
done. After a restart the releases not yet announced are announced again from the ledger (no
second stream entry when the first went out: the stream's last entries are looked at first).

A release that fails (disk, Redis) loses nothing and blocks no removal: it is logged, counted
(:attr:`Releaser.failures`) and tried again after the next batch (or the periodic check).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from producer import schema
from producer.release_client import (
    LATEST_NAME,
    MANIFEST_NAME,
    WEIGHT_TENSOR,
    WEIGHTS_NAME,
    manifest_body,
    manifest_digest,
)
from worker.lease import FENCED_LUA, holds_lua
from worker.ledger import Ledger, ledger_files
from worker.receipts import ReceiptSigner, ReceiptStore
from worker.release_policy import ReleasePolicy
from worker.status import Answer

if TYPE_CHECKING:
    from core.model import Model
    from worker.metrics import ServiceMetrics

log = logging.getLogger("certremove.worker")

RECORD_NAME = "releases.jsonl"
MANIFEST_FORMAT = 1
#: entries kept on the releases stream (approximately)
STREAM_MAXLEN = 10_000
#: stream entries looked at for a release's entry before announcing it (after a restart)
ANNOUNCE_LOOKBACK = 100
#: status keys per script call
STATUS_CHUNK = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------- files
def model_release_dir(release_dir: Path, model: str) -> Path:
    return Path(release_dir) / schema.check_model_name(model)


def release_path(release_dir: Path, model: str, number: int) -> Path:
    return model_release_dir(release_dir, model) / f"{int(number):08d}"


def read_latest(release_dir: Path, model: str) -> int | None:
    """The number in ``LATEST`` (None: no release yet)."""
    try:
        text = (model_release_dir(release_dir, model) / LATEST_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def release_numbers(release_dir: Path, model: str) -> list[int]:
    """The numbers of the release directories there, ascending."""
    root = model_release_dir(release_dir, model)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def noise_epoch_id(model: str, state_id: str, version: int) -> str:
    """An opaque id of a noise draw: equal for every version that shares ``b`` (a model version
    is one noise epoch), never derived from ``b``."""
    text = f"certremove-noise-epoch\0{model}\0{state_id}\0{int(version)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_release(
    release_dir: Path,
    model: str,
    number: int,
    weights: np.ndarray,
    manifest: dict[str, Any],
    signer: ReceiptSigner | None = None,
) -> dict[str, Any]:
    """Write release ``number`` atomically and point ``LATEST`` at it; returns the manifest
    written (with ``content_sha256``, ``manifest_sha256`` and, with a signer, ``key_id`` and
    ``signature``).

    Raises:
        FileExistsError: release ``number`` exists already.
        OSError: the disk refused (nothing is published: a temporary directory may stay).
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    root = model_release_dir(release_dir, model)
    root.mkdir(parents=True, exist_ok=True)
    final = release_path(release_dir, model, number)
    if final.exists():
        raise FileExistsError(f"release {final} exists already")
    tmp = root / f".tmp-{int(number):08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({WEIGHT_TENSOR: np.ascontiguousarray(weights)}, str(tmp / WEIGHTS_NAME))
        _fsync_file(tmp / WEIGHTS_NAME)
        content = hashlib.sha256((tmp / WEIGHTS_NAME).read_bytes()).hexdigest()
        manifest = {**manifest, "content_sha256": content}
        if signer is not None:
            manifest["key_id"] = signer.key_id
        manifest["manifest_sha256"] = manifest_digest(manifest)
        if signer is not None:
            manifest["signature"] = signer.sign_bytes(manifest_body(manifest))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync_file(tmp / MANIFEST_NAME)
        _fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    write_latest(release_dir, model, number)
    return manifest


def write_latest(release_dir: Path, model: str, number: int) -> None:
    """Point ``LATEST`` at release ``number`` (replaced atomically)."""
    root = model_release_dir(release_dir, model)
    latest_tmp = root / f".{LATEST_NAME}.tmp"
    latest_tmp.write_text(f"{int(number)}\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / LATEST_NAME)
    _fsync_dir(root)


def list_releases(release_dir: Path, model: str) -> list[dict[str, Any]]:
    """The manifests of a model's releases, oldest first (a manifest that does not parse is
    listed with ``error``)."""
    out = []
    for number in release_numbers(release_dir, model):
        path = release_path(release_dir, model, number) / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            manifest = {"release": number, "error": f"{path}: {exc}"}
        manifest.setdefault("path", str(path.parent))
        out.append(manifest)
    return out


def input_description(model: Model) -> dict[str, Any]:
    """What a client does to raw inputs before ``X @ weight`` (``core.Model.predict`` applies
    nothing: it scores the rows as given), and what the training rows were."""
    ds = model.dataset
    meta = ds.meta if ds is not None else {}
    extractor = model.hyper.extractor_dp is not None or meta.get("dp_epsilon") is not None
    features: dict[str, Any] = {"kind": "raw"}
    if extractor:
        features = {
            "kind": "dp-extractor",
            "note": (
                "the release is the linear head over the DP feature extractor's features: "
                "inputs are the extractor's feature rows (L2-normalised as at training), not "
                "raw images; the extractor is not part of the release"
            ),
        }
        if meta.get("extractor_config") is not None:
            features["extractor_config"] = meta.get("extractor_config")
    return {
        "normalisation": "none",
        "training_rows": "L2-normalised rows scaled by 1 - 1e-6 (core/data.py): give rows "
        "prepared the same way",
        "features": features,
    }


def build_manifest(
    model: Model,
    *,
    model_name: str,
    number: int,
    noise_epoch: str,
    policy: ReleasePolicy,
    created_at: float,
) -> dict[str, Any]:
    """The manifest of a release of ``model`` (before its hashes and signature)."""
    epsilon, delta = model.guarantee()
    W = model.weights
    return {
        "format": MANIFEST_FORMAT,
        "model": model_name,
        "release": int(number),
        "model_version": int(model.version),
        "snapshot": int(model.save_seq),
        "noise_epoch": noise_epoch,
        "classes": [int(c) for c in model.classes],
        "binary": W.dim() == 1,
        "feature_dim": int(W.shape[0]),
        "weights": {
            "file": WEIGHTS_NAME,
            "tensor": WEIGHT_TENSOR,
            "dtype": "float64",
            "shape": [int(s) for s in W.shape],
        },
        "prediction": {
            "scores": "X @ weight (X float64, one row per input)",
            "binary": "classes[1] where the score is > 0, else classes[0]; "
            "P(classes[1]) = sigmoid(score)",
            "one_vs_rest": "classes[argmax of the K scores]; probabilities: sigmoid of each "
            "score, normalised to sum 1",
        },
        "input": input_description(model),
        "epsilon": float(epsilon),
        "delta": float(delta),
        "certified": bool(model.certified),
        "rows_removed_since_training": int(model.removed_in_epoch),
        "created_at": float(created_at),
        "policy": str(policy),
    }


# ---------------------------------------------------------------------------------- records
class ReleaseRecords:
    """``STATE_DIR/releases.jsonl``: a line per release (number, model version, snapshot, noise
    epoch, the ledger positions it covers ``[ledger_from, ledger_to)``, time, path, hash) and an
    ``{"announced": N}`` line once release N's stream entry, statuses and receipts are done."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / RECORD_NAME
        self.releases: list[dict[str, Any]] = []
        self.announced: set[int] = set()
        for rec in self._read():
            if "announced" in rec:
                self.announced.add(int(rec["announced"]))
            elif "release" in rec:
                self.releases.append(rec)

    def _read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]  # a torn last line (crash): cut at the append
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        for line in data.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("skipping a damaged line of %s", self.path)
                continue
            if isinstance(rec, dict):
                yield rec

    @property
    def last(self) -> dict[str, Any] | None:
        return self.releases[-1] if self.releases else None

    def epochs(self) -> set[str]:
        return {str(r.get("noise_epoch")) for r in self.releases}

    def append(self, rec: dict[str, Any]) -> None:
        """Append one whole line (fsynced), or nothing: a write that fails part-way is cut off."""
        with open(self.path, "ab") as f:
            end = f.tell()
            try:
                f.write(json.dumps(rec, sort_keys=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                try:
                    f.truncate(end)
                except OSError:
                    pass  # a torn line is cut at the next start
                raise
        if "announced" in rec:
            self.announced.add(int(rec["announced"]))
        else:
            self.releases.append(rec)


# ---------------------------------------------------------------------------------- coverage
@dataclass
class Covered:
    """An applied request a release covers (what its status and receipt need)."""

    request_id: str
    method: str
    model_version: int | None
    applied_at: float | None
    requested_at: float | None = None
    #: the sample ids it removed (None: unknown, from an old ledger line of several requests)
    removed_ids: list[Any] | None = field(default_factory=list)

    @classmethod
    def from_answer(cls, a: Answer) -> Covered:
        return cls(
            a.request_id,
            a.method,
            a.model_version,
            a.applied_at,
            a.requested_at,
            list(a.removed_ids),
        )


def covered_in_record(rec: dict[str, Any]) -> list[Covered]:
    """The applied requests of one ledger record."""
    if rec.get("s") != schema.STATUS_APPLIED:
        return []
    ids = [str(i) for i in rec.get("ids") or []]
    removed = list(rec.get("x") or [])
    counts = rec.get("xn")
    split: list[list[Any] | None]
    if len(ids) == 1:
        split = [removed]
    elif isinstance(counts, list) and len(counts) == len(ids) and sum(counts) == len(removed):
        split, at = [], 0
        for n in counts:
            split.append(removed[at : at + int(n)])
            at += int(n)
    elif not removed:
        split = [[] for _ in ids]
    else:
        split = [None] * len(ids)  # a line from before ``xn``: the split is unknown
    return [
        Covered(rid, str(rec.get("m") or ""), rec.get("v"), rec.get("t"), None, part)
        for rid, part in zip(ids, split, strict=True)
    ]


def ledger_records_from(state_dir: Path, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, record) of the ledger records at positions >= ``start``."""
    from worker.ledger import read_records  # noqa: PLC0415

    if not ledger_files(state_dir):
        return
    for pos, rec in enumerate(read_records(state_dir)):
        if pos >= start:
            yield pos, rec


# Set released_version/released_at on the status hashes that still exist and have none yet.
# KEYS[1] lease, KEYS[2] lease token counter, then the status keys; ARGV[1] token ('' unfenced),
# ARGV[2] the lease's life in ms, ARGV[3] release, ARGV[4] released_at.
_RELEASED_LUA = (
    holds_lua(1, 2, 1, 2)
    + f"if ARGV[1] ~= '' and not holds() then {FENCED_LUA} end\n"
    + """
local n = 0
for k = 3, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 and redis.call('HEXISTS', KEYS[k], 'released_version') == 0 then
    redis.call('HSET', KEYS[k], 'released_version', ARGV[3], 'released_at', ARGV[4])
    n = n + 1
  end
end
return n
"""
)


# ---------------------------------------------------------------------------------- releaser
class Releaser:
    """Releases the served model as its policy says, and announces each release.

    Args:
        model_name, state_dir: the model and its (private) state directory.
        release_dir: where releases go (``<release_dir>/<model>/...``).
        policy: the release policy.
        client: redis-py client (stream, statuses, the manual request flag).
        ledger: the model's ledger (its positions; its records feed the coverage).
        signer: signs receipts and release manifests (None: no receipts).
        fence, lease_ttl_ms: the lease token the status script must find (None: unfenced).
        state_id: the state directory's id (the noise epoch ids).
        clock: wall-clock time.
        metrics: counts releases and failures, shows the requests not yet released (optional).
    """

    def __init__(
        self,
        *,
        model_name: str,
        state_dir: Path,
        release_dir: Path,
        policy: ReleasePolicy,
        client: redis.Redis,
        ledger: Ledger,
        signer: ReceiptSigner | None = None,
        fence: Callable[[], Any] | None = None,
        lease_ttl_ms: int = 30_000,
        state_id: str = "",
        clock: Callable[[], float] = time.time,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.model_name, self.state_dir = model_name, Path(state_dir)
        self.release_dir, self.policy = Path(release_dir), policy
        self.redis, self.ledger, self.signer = client, ledger, signer
        self.fence, self.lease_ttl_ms = fence, int(lease_ttl_ms)
        self.state_id, self.clock = state_id, clock
        self.metrics = metrics
        self.records = ReleaseRecords(self.state_dir)
        self.receipts = ReceiptStore(self.state_dir) if signer is not None else None
        #: releases or announcements that failed so far (each is tried again later)
        self.failures = 0
        self._script = client.register_script(_RELEASED_LUA)
        #: applied requests recorded in the ledger since the last release
        self._tail: list[Covered] = []
        #: releases made whose announcement (stream, statuses, receipts) is not done
        self._pending: list[tuple[dict[str, Any], list[Covered]]] = []
        self._streamed: set[int] = set()
        #: look for releases on disk that the record lacks (at start, after a failed release)
        self._check_dir = True
        self._load_coverage()
        ledger.listeners.append(self._on_record)

    # ------------------------------------------------------------ coverage
    def _load_coverage(self) -> None:
        """The unreleased tail of the ledger and the releases not yet announced (after a
        restart), read from the ledger files."""
        last_to = int(self.records.last["ledger_to"]) if self.records.last else 0
        if last_to > self.ledger.count:
            log.warning(
                "the release record covers %d ledger records but the ledger holds %d (restored "
                "from an older backup?): releases cover the ledger from its end",
                last_to,
                self.ledger.count,
            )
            last_to = self.ledger.count
        todo = [r for r in self.records.releases if int(r["release"]) not in self.records.announced]
        start = min([int(r["ledger_from"]) for r in todo] + [last_to])
        if start >= self.ledger.count:
            self._pending = [(r, []) for r in todo]
            return
        by_release: dict[int, list[Covered]] = {int(r["release"]): [] for r in todo}
        for pos, rec in ledger_records_from(self.state_dir, start):
            covered = covered_in_record(rec)
            if pos >= last_to:
                self._tail += covered
                continue
            for r in todo:
                if int(r["ledger_from"]) <= pos < int(r["ledger_to"]):
                    by_release[int(r["release"])] += covered
        self._pending = [(r, by_release[int(r["release"])]) for r in todo]

    def _on_record(self, answers: list[Answer]) -> None:
        """Ledger listener: remember the applied answers (never raises)."""
        for a in answers:
            if a.status == schema.STATUS_APPLIED and not a.only_if_queued:
                self._tail.append(Covered.from_answer(a))

    # ------------------------------------------------------------ entry points
    def settle(self, model: Model, *, requested: bool = False) -> int | None:
        """Release ``model`` (the persisted one: call only where the model in memory is the
        persisted state and its answers are in the ledger) when the policy says so, and
        announce what is pending. Never raises; returns the release made (None: none)."""
        made = None
        try:
            if self._check_dir:
                self._adopt_unrecorded(model)
            if self._due(model, requested):
                made = self._release(model)
        except Exception as exc:  # noqa: BLE001 - a release never fails a drain
            self._check_dir = True
            self._failed()
            log.warning(
                "release of model %r version %s failed (%s: %s; %d failures so far): nothing is "
                "lost, it is tried again after the next batch",
                self.model_name,
                getattr(model, "version", "?"),
                type(exc).__name__,
                " ".join(str(exc).split())[:300],
                self.failures,
            )
        self._announce()
        if self.metrics is not None:
            self.metrics.set_unreleased(len(self._tail))
        return made

    def _failed(self) -> None:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.on_release_failure()

    def poll(self, model: Model) -> int | None:
        """The periodic check (and the end of a drain): a manual request (``certremove
        release``), an interval that has run out, a release or announcement to retry."""
        requested = False
        try:
            key = schema.release_request_key(self.model_name)
            if self.redis.get(key) is not None:
                self.redis.delete(key)
                requested = True
                log.info("release requested (certremove release)")
        except redis.RedisError as exc:
            log.warning("cannot read the release request flag: %s", exc)
        return self.settle(model, requested=requested)

    # ------------------------------------------------------------ policy
    def epoch_id(self, model: Model) -> str:
        return noise_epoch_id(self.model_name, self.state_id, int(model.version))

    def _due(self, model: Model, requested: bool) -> bool:
        last = self.records.last
        if last is not None and int(last.get("snapshot", -1)) == int(model.save_seq):
            if requested:
                log.info("release requested, but release %s is the current state", last["release"])
            return False  # this persisted state is out already
        kind = self.policy.kind
        if kind == "epoch":
            if self.epoch_id(model) in self.records.epochs():
                if requested:
                    log.info(
                        "release requested, but noise epoch (version %d) has a release already "
                        "(policy epoch: never two of one epoch)",
                        model.version,
                    )
                return False
            return True
        if requested or kind == "every":
            return True
        if kind == "interval":
            if last is None:
                return True
            if self.clock() - float(last["created_at"]) < self.policy.interval:
                return False
            return bool(self._tail) or int(last["model_version"]) != int(model.version)
        return False  # manual

    # ------------------------------------------------------------ release
    def next_number(self) -> int:
        last = self.records.last
        taken = [int(last["release"])] if last else []
        taken += release_numbers(self.release_dir, self.model_name)[-1:]
        latest = read_latest(self.release_dir, self.model_name)
        if latest is not None:
            taken.append(latest)
        return max(taken, default=0) + 1

    def _adopt_unrecorded(self, model: Model) -> None:
        """Record the releases on disk that the record lacks (the record's append failed, or a
        crash came between the rename and it): they are public, so under ``epoch`` their noise
        epoch counts as released. The newest of them covers the unreleased requests when it is
        the persisted state of ``model`` (every applied request in the ledger is in that
        snapshot); any other is taken to cover no ledger record (a later release covers
        them)."""
        last = self.records.last
        recorded = int(last["release"]) if last else 0
        numbers = release_numbers(self.release_dir, self.model_name)
        for number in numbers:
            if number <= recorded:
                continue
            path = release_path(self.release_dir, self.model_name, number)
            try:
                manifest = json.loads((path / MANIFEST_NAME).read_text())
                epoch = str(manifest["noise_epoch"])
                rec = {
                    "release": number,
                    "model_version": int(manifest["model_version"]),
                    "snapshot": int(manifest["snapshot"]),
                    "noise_epoch": epoch,
                    "created_at": float(manifest["created_at"]),
                    "content_sha256": str(manifest["content_sha256"]),
                    "epsilon": float(manifest["epsilon"]),
                    "delta": float(manifest["delta"]),
                    "policy": str(manifest.get("policy")),
                }
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("release %s has no readable manifest (%s): ignored", path, exc)
                continue
            to = int(self.records.last["ledger_to"]) if self.records.last else 0
            current = (
                number == numbers[-1]
                and rec["snapshot"] == int(model.save_seq)
                and rec["model_version"] == int(model.version)
                and epoch == self.epoch_id(model)
            )
            covered = self._tail if current else []
            rec.update(
                {
                    "ledger_from": to,
                    "ledger_to": int(self.ledger.count) if current else to,
                    "path": str(path),
                }
            )
            self.records.append(rec)
            if current:
                self._tail = []
            self._pending.append((rec, covered))
            log.warning(
                "recorded release %d found on disk without a record (%d requests covered)",
                number,
                len(covered),
            )
        latest = read_latest(self.release_dir, self.model_name)
        if numbers and (latest is None or latest < numbers[-1]):
            write_latest(self.release_dir, self.model_name, numbers[-1])
        self._check_dir = False

    def _release(self, model: Model) -> int:
        number = self.next_number()
        now = self.clock()
        epoch = self.epoch_id(model)
        manifest = build_manifest(
            model,
            model_name=self.model_name,
            number=number,
            noise_epoch=epoch,
            policy=self.policy,
            created_at=now,
        )
        weights = model.weights.detach().to("cpu").double().numpy()
        written = write_release(
            self.release_dir, self.model_name, number, weights, manifest, self.signer
        )
        last = self.records.last
        rec = {
            "release": number,
            "model_version": int(model.version),
            "snapshot": int(model.save_seq),
            "noise_epoch": epoch,
            "ledger_from": int(last["ledger_to"]) if last else 0,
            "ledger_to": int(self.ledger.count),
            "created_at": now,
            "path": str(release_path(self.release_dir, self.model_name, number)),
            "content_sha256": written["content_sha256"],
            "epsilon": written["epsilon"],
            "delta": written["delta"],
            "policy": str(self.policy),
        }
        self.records.append(rec)
        if self.metrics is not None:
            self.metrics.on_release(now)
        covered, self._tail = self._tail, []
        self._pending.append((rec, covered))
        log.info(
            "released model %r version %d as release %d (%d requests newly covered, policy %s)",
            self.model_name,
            model.version,
            number,
            len(covered),
            self.policy,
        )
        return number

    # ------------------------------------------------------------ announce
    def _announce(self) -> None:
        while self._pending:
            rec, covered = self._pending[0]
            try:
                self._announce_one(rec, covered)
            except Exception as exc:  # noqa: BLE001 - tried again later
                self._failed()
                log.warning(
                    "announcing release %s failed (%s: %s; %d failures so far): tried again "
                    "after the next batch",
                    rec.get("release"),
                    type(exc).__name__,
                    " ".join(str(exc).split())[:300],
                    self.failures,
                )
                return
            self._pending.pop(0)

    def _announce_one(self, rec: dict[str, Any], covered: list[Covered]) -> None:
        number = int(rec["release"])
        if number not in self._streamed and self._on_stream(number, str(rec["content_sha256"])):
            self._streamed.add(number)  # a restart (or a lost reply) after its entry went out
        if number not in self._streamed:
            self.redis.xadd(
                schema.releases_key(self.model_name),
                {
                    "release": str(number),
                    "model_version": str(rec["model_version"]),
                    "noise_epoch": str(rec["noise_epoch"]),
                    "path": str(rec["path"]),
                    "content_sha256": str(rec["content_sha256"]),
                    "created_at": repr(float(rec["created_at"])),
                },
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            self._streamed.add(number)
        token = self.fence() if self.fence is not None else None
        fixed = [
            schema.lease_key(self.model_name),
            schema.lease_counter_key(self.model_name),
        ]
        for i in range(0, len(covered), STATUS_CHUNK):
            keys = [
                schema.status_key(self.model_name, c.request_id)
                for c in covered[i : i + STATUS_CHUNK]
            ]
            self._script(
                keys=fixed + keys,
                args=[
                    "" if token is None else str(token),
                    str(self.lease_ttl_ms),
                    str(number),
                    repr(float(rec["created_at"])),
                ],
            )
        self._issue_receipts(rec, covered)
        self.records.append({"announced": number})

    def _on_stream(self, number: int, content_sha256: str) -> bool:
        """Whether the releases stream has the entry of release ``number`` (these weights)
        already, among its last entries (releases are announced in order)."""
        key = schema.releases_key(self.model_name)
        entries: Any = self.redis.xrevrange(key, count=ANNOUNCE_LOOKBACK)
        for _eid, fields in entries or []:
            got = {_text(k): _text(v) for k, v in (fields or {}).items()}
            if got.get("release") == str(number) and got.get("content_sha256") == content_sha256:
                return True
        return False

    def _issue_receipts(self, rec: dict[str, Any], covered: list[Covered]) -> None:
        if self.signer is None or self.receipts is None:
            return
        todo = [c for c in covered if c.request_id not in self.receipts.issued]
        unknown = [c for c in todo if c.removed_ids is None]
        if unknown:
            log.warning(
                "no receipt for %d requests of release %s: their ledger lines predate the "
                "per-request split of removed ids",
                len(unknown),
                rec["release"],
            )
        todo = [c for c in todo if c.removed_ids is not None]
        missing_at = [c for c in todo if c.requested_at is None]
        if missing_at:  # read back from the status hashes that still exist (after a restart)
            pipe = self.redis.pipeline(transaction=False)
            for c in missing_at:
                pipe.hget(schema.status_key(self.model_name, c.request_id), "requested_at")
            for c, raw in zip(missing_at, pipe.execute(), strict=True):
                try:
                    c.requested_at = float(raw) if raw else None
                except ValueError:
                    c.requested_at = None
        receipts = [
            self.signer.receipt(
                model=self.model_name,
                request_id=c.request_id,
                removed_ids=c.removed_ids or [],
                release=int(rec["release"]),
                model_version=c.model_version,
                epsilon=float(rec["epsilon"]),
                delta=float(rec["delta"]),
                method=c.method,
                requested_at=c.requested_at,
                applied_at=c.applied_at,
                released_at=float(rec["created_at"]),
            )
            for c in todo
        ]
        self.receipts.append(receipts)
