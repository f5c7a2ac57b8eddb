"""When the removal service may release its model (``worker.releases`` makes and announces the
releases; docs/design.md "Releases and receipts").

A release describes the persisted model and covers every applied request in the ledger, so the
service asks its releaser only where the model in memory is the persisted one with all its
answers in the ledger, and never ahead of the statuses a release would cover: a batch's statuses
are published on their own thread (``worker.publisher``), so a release about to be made waits for
them; entries of a failed publication held in memory to be served again hold releases back until
their statuses are out. Announcing a release made earlier needs nothing of the batches since.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.entries import Entry
from worker.outbox import Outbox
from worker.release_policy import ReleasePolicy
from worker.releases import Releaser
from worker.served import ServedModel
from worker.stream import Intake

if TYPE_CHECKING:
    from worker.lease import Lease
    from worker.receipts import ReceiptSigner


@dataclass(frozen=True)
class ReleaseOptions:
    """Where and when the service releases its model (``worker.releases``)."""

    release_dir: Path
    policy: ReleasePolicy
    signer: ReceiptSigner | None = None


class ReleaseGate:
    """Asks ``releaser`` to release the model ``served`` holds when that is safe (the module
    docstring); ``outbox`` and ``intake`` tell what is still on its way out."""

    def __init__(
        self, releaser: Releaser, served: ServedModel, outbox: Outbox, intake: Intake
    ) -> None:
        self.releaser, self.served, self.outbox, self.intake = releaser, served, outbox, intake

    @classmethod
    def build(
        cls,
        options: ReleaseOptions,
        *,
        lease: Lease | None,
        served: ServedModel,
        outbox: Outbox,
        intake: Intake,
    ) -> ReleaseGate:
        """The gate of a new :class:`worker.releases.Releaser` for ``options``, on the ledger,
        Redis client and metrics of ``outbox`` and the state directory and clock of ``served``
        (build it before the journal's replay: its answers reach the releaser through the
        ledger)."""
        ledger = outbox.ledger
        releaser = Releaser(
            model_name=ledger.model,
            state_dir=served.state_dir,
            release_dir=options.release_dir,
            policy=options.policy,
            client=outbox.redis,
            ledger=ledger,
            signer=options.signer,
            fence=lambda: None if ledger.fence is None else ledger.fence(),
            lease_ttl_ms=ledger.status.lease_ttl_ms,
            state_id="" if lease is None else lease.state_id,
            clock=served.clock,
            metrics=outbox.metrics,
        )
        return cls(releaser, served, outbox, intake)

    def release(
        self,
        *,
        poll: bool = False,
        idle: bool = False,
        carry: list[Entry] | None = None,
        hand_over: bool = False,
    ) -> None:
        """Release the persisted model as the policy says (``poll``: also a manual request or
        an interval run out; ``idle``: the stream is empty, announce everything pending);
        ``carry``: the entries the drain loop goes on with; ``hand_over``: announce on the
        announcing thread (after a batch). Never raises."""
        outbox, publisher = self.outbox, self.outbox.publisher
        if self.served.dirty or outbox.unrecorded:
            return
        model = self.served.model
        may_release = True
        suspect = outbox.suspect
        if suspect and (outbox.holds_suspect(carry or []) or self.intake.holds_any(suspect)):
            # entries served again after a failed publication still wait for their statuses:
            # no release covers them before (announcing earlier releases goes on; a manual
            # request stays for the next look)
            if poll:
                return
            may_release = False
        if publisher.busy:
            if poll or self.releaser.release_due(model):
                # a release covers every request in the ledger: their statuses go out first
                publisher.wait()
                if publisher.busy:
                    return  # a publication failed: the drain sees to it, then releases
            else:
                # decided here, once: the policy asked again could say otherwise (an interval
                # run out meanwhile) and release ahead of the statuses still queued
                may_release = False
        if poll:
            self.releaser.poll(model, idle=idle)
        else:
            self.releaser.settle(model, may_release=may_release, hand_over=hand_over)
