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

**Announcing in parts** (``worker/release_announce.py``): while batches are served, each call
announces a part of the pending releases in proportion to the requests applied since the last
one, so that a release covering tens of thousands of requests (an epoch change under load) is no
latency spike; an idle periodic check announces everything left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from producer import schema
from worker.ledger import Ledger
from worker.receipts import ReceiptSigner, ReceiptStore
from worker.release_announce import AnnounceQueue, Announcer
from worker.release_files import (
    build_manifest,
    list_releases,
    manifest_record,
    model_release_dir,
    next_release_number,
    noise_epoch_id,
    read_latest,
    release_numbers,
    release_path,
    write_latest,
    write_release,
)
from worker.release_policy import ReleasePolicy
from worker.release_records import Covered, ReleaseRecords, load_coverage
from worker.status import Answer

if TYPE_CHECKING:
    from core.model import Model
    from worker.metrics import ServiceMetrics

#: imported from here by the service, the CLI and the tests
__all__ = [
    "Releaser",
    "ReleasePolicy",
    "ReleaseRecords",
    "list_releases",
    "model_release_dir",
    "read_latest",
    "release_path",
    "write_release",
]

log = logging.getLogger("certremove.worker")


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
        self.announcer = Announcer(
            model_name=model_name,
            client=client,
            records=self.records,
            signer=signer,
            receipts=self.receipts,
            fence=fence,
            lease_ttl_ms=lease_ttl_ms,
        )
        #: applied requests recorded in the ledger since the last release
        self._tail: list[Covered] = []
        #: releases made whose announcement (stream, statuses, receipts) is not done
        self.queue = AnnounceQueue(self.announcer)
        #: look for releases on disk that the record lacks (at start, after a failed release)
        self._check_dir = True
        self._load_coverage()
        ledger.listeners.append(self._on_record)

    # ------------------------------------------------------------ coverage
    def _load_coverage(self) -> None:
        """The unreleased tail of the ledger and the releases not yet announced (after a
        restart), read from the ledger files."""
        self._tail, self.queue.pending = load_coverage(self.records, self.ledger, self.state_dir)

    def _on_record(self, answers: list[Answer]) -> None:
        """Ledger listener: remember the applied answers (never raises)."""
        for a in answers:
            if a.status == schema.STATUS_APPLIED and not a.only_if_queued:
                self._tail.append(Covered.from_answer(a))
                self.queue.applied += 1

    # ------------------------------------------------------------ entry points
    def settle(
        self,
        model: Model,
        *,
        requested: bool = False,
        may_release: bool = True,
        hand_over: bool = False,
    ) -> int | None:
        """Release ``model`` (the persisted one: call only where the model in memory is the
        persisted state and its answers are in the ledger) when the policy says so, and
        announce a part of what is pending (the service calls this after each batch, see the
        module docstring). ``may_release`` False: announce only, whatever the policy says now
        (the service found no release due, :meth:`release_due`, and did not wait for the
        statuses it would cover; asking the policy again could say otherwise, ``interval``'s
        clock having moved on). ``hand_over``: announce on the announcing thread, if any (the
        drain loop after a batch). Never raises; returns the release made (None: none)."""
        self.queue.batch_served()
        return self._settle(
            model, requested=requested, whole=False, may_release=may_release, hand_over=hand_over
        )

    def _settle(
        self,
        model: Model,
        *,
        requested: bool,
        whole: bool,
        may_release: bool = True,
        hand_over: bool = False,
    ) -> int | None:
        """:meth:`settle`; ``whole``: announce everything pending, not one part."""
        made = None
        try:
            if may_release and self._check_dir:
                self._adopt_unrecorded(model)
            if may_release and self._due(model, requested):
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
        self._announce(whole, hand_over)
        if self.metrics is not None:
            self.metrics.set_unreleased(len(self._tail))
        return made

    def _failed(self) -> None:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.on_release_failure()

    def release_due(self, model: Model) -> bool:
        """Whether :meth:`settle` would make a release of ``model`` now (or look for releases
        on disk first): its statuses must be out before (``worker.publisher``); announcing
        a release made earlier needs nothing of the batches since."""
        return self._check_dir or self._due(model, False)

    def poll(self, model: Model, *, idle: bool = False) -> int | None:
        """The periodic check (and the end of a drain): a manual request (``certremove
        release``), an interval that has run out, a release or announcement to retry. Within
        ``BUSY_S`` of a batch it announces one part, like a batch, unless ``idle`` (a drain
        that emptied the stream); idle, everything left."""
        requested = False
        try:
            key = schema.release_request_key(self.model_name)
            if self.redis.get(key) is not None:
                self.redis.delete(key)
                requested = True
                log.info("release requested (certremove release)")
        except redis.RedisError as exc:
            log.warning("cannot read the release request flag: %s", exc)
        return self._settle(model, requested=requested, whole=idle or not self.queue.busy())

    # ------------------------------------------------------------ policy
    def epoch_id(self, model: Model) -> str:
        return noise_epoch_id(self.model_name, self.state_id, int(model.version))

    def _due(self, model: Model, requested: bool) -> bool:
        return self.policy.due(
            self.records.last,
            snapshot=int(model.save_seq),
            version=int(model.version),
            epoch_released=lambda: self.epoch_id(model) in self.records.epochs(),
            now=self.clock(),
            news=bool(self._tail),
            requested=requested,
        )

    # ------------------------------------------------------------ release
    def next_number(self) -> int:
        last = self.records.last
        return next_release_number(
            self.release_dir, self.model_name, int(last["release"]) if last else 0
        )

    def _adopt_unrecorded(self, model: Model) -> None:
        """Record the releases on disk that the record lacks (the record's append failed, or a
        crash came between the rename and it): they are public, so under ``epoch`` their noise
        epoch counts as released. The newest of them covers the unreleased requests when it is
        the persisted state of ``model`` (every applied request in the ledger is in that
        snapshot); any other is taken to cover no ledger record (a later release covers
        them)."""
        self.queue.wait()  # the records and the queue are changed here, not by a part too
        last = self.records.last
        recorded = int(last["release"]) if last else 0
        numbers = release_numbers(self.release_dir, self.model_name)
        for number in numbers:
            if number <= recorded:
                continue
            path = release_path(self.release_dir, self.model_name, number)
            rec = manifest_record(path, number)
            if rec is None:
                continue
            epoch = rec["noise_epoch"]
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
            self.queue.pending.append((rec, covered))
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
        self.queue.wait()  # the records and the queue are changed here, not by a part too
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
        self.queue.pending.append((rec, covered))
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
    def _announce(self, whole: bool = True, hand_over: bool = False) -> None:
        """Announce the pending releases: all (``whole``), else a part (the module docstring;
        ``hand_over``: on the announcing thread). A failure is logged and counted; the part is
        done again at the next call."""
        try:
            self.queue.run(whole=whole, hand_over=hand_over)
        except Exception as exc:  # noqa: BLE001 - tried again later
            self._failed()
            log.warning(
                "announcing release %s failed (%s: %s; %d failures so far): tried again "
                "after the next batch",
                self.queue.pending[0][0].get("release") if self.queue.pending else "?",
                type(exc).__name__,
                " ".join(str(exc).split())[:300],
                self.failures,
            )
