"""Turn a batch of stream entries into removal groups and immediate answers.

For each entry, in arrival order: an entry without a request id goes to the dead-letter stream; a
request id answered before (ledger) or earlier in the batch is a repeat (acknowledged without
effect); an invalid entry is ``rejected``; a request with no known id is ``rejected``; one whose
ids are all removed already is ``applied`` at once (``already_removed_ids``); the rest become
groups (one per request, its new rows) for one batched Newton step or a retrain. A request that
shares rows with an earlier group of the batch is deferred, with everything after it, to the next
batch, so a request is never reported applied on the strength of another that is still pending.
Ids a full-pipeline retrain excluded from the data (the dataset's ``meta["excluded_ids"]``) count
as removed already. An entry whose planning raises (say, mapping its ids) is ``rejected`` with the
error; the rest of the batch goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.guard import RemovalGuard
from producer import schema
from worker.entries import Entry
from worker.ledger import Answer, Ledger
from worker.plan_answers import applied_answers, py_value, rejected_entry, rejected_group

#: ``rows_for_ids(sample_ids) -> (rows, unknown ids)`` (``core.Model.rows_for_ids``)
RowsForIds = Callable[[Any], tuple[list[int], list[Any]]]


@dataclass(slots=True)
class Group:
    """One request's contribution to a removal."""

    entry: Entry
    rows: list[int]
    already_removed_ids: list[Any]
    unknown_ids: list[Any]
    #: every alive row of the request (``rows`` plus those an earlier group of a retrain claimed)
    needs: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """What to do with a batch, and what became of it.

    ``plan_batch`` fills it; the service then changes it only through its methods: groups core
    refuses are rejected (:meth:`reject`, :meth:`reject_all`), groups a step removed are committed
    (:meth:`commit`, :meth:`certify`), groups left for the next batch are deferred
    (:meth:`defer`), and :meth:`limit` keeps the groups within what the DP extractor still covers.
    """

    #: requests to remove, in arrival order (one group per request)
    groups: list[Group] = field(default_factory=list)
    #: answers given without a removal (repeats, rejections, already removed) ...
    answers: list[Answer] = field(default_factory=list)
    #: ... and their entries
    answered: list[Entry] = field(default_factory=list)
    #: entries acknowledged with no answer (a request id repeated within the batch)
    ack_only: list[bytes] = field(default_factory=list)
    #: entries without a request id (dead-lettered)
    dead: list[Entry] = field(default_factory=list)
    #: entries left for the next batch (an overlap, and everything after it)
    deferred: list[Entry] = field(default_factory=list)
    repeats: int = 0
    #: ``applied`` answers of the groups a step or retrain removed ...
    committed: list[Answer] = field(default_factory=list)
    #: ... and their entries
    committed_entries: list[Entry] = field(default_factory=list)

    @property
    def rows(self) -> list[int]:
        """The rows of every group, in order."""
        return [r for g in self.groups for r in g.rows]

    @property
    def sizes(self) -> list[int]:
        """Rows per group (core's ``groups``)."""
        return [len(g.rows) for g in self.groups]

    @property
    def acknowledged(self) -> list[bytes]:
        """Entry ids the publish acknowledges (answered, committed, repeats within the batch)."""
        return [e.entry_id for e in self.answered + self.committed_entries] + self.ack_only

    @property
    def served(self) -> int:
        """Requests answered by this plan (repeats and rejections included)."""
        return len(self.answered) + len(self.committed_entries)

    def reject(self, group: Group, reason: str, now: float) -> None:
        """Answer ``group`` rejected (core or the extractor's allowance refused it)."""
        self.answers.append(rejected_group(group, reason, now))
        self.answered.append(group.entry)

    def reject_all(self, reason: str, now: float) -> None:
        """Reject every group (core refused the call); no group is left to remove."""
        for g in self.groups:
            self.reject(g, reason, now)
        self.groups = []

    def defer(self, groups: list[Group]) -> None:
        """Leave ``groups`` for the next batch, ahead of the entries deferred already."""
        self.deferred = [g.entry for g in groups] + self.deferred

    def commit(
        self,
        groups: list[Group],
        method: str,
        version: int,
        now: float,
        sample_ids: np.ndarray | None = None,
    ) -> list[Answer]:
        """Record ``groups`` as removed by ``method`` at ``version``; returns their answers."""
        answers = applied_answers(groups, method, version, now, sample_ids)
        self.committed += answers
        self.committed_entries += [g.entry for g in groups]
        return answers

    def certify(self, now: float) -> None:
        """The committed removals are persisted (certified) at ``now``."""
        for a in self.committed:
            a.applied_at = now

    def limit(self, left: int, *, wait: bool, reason: str, now: float) -> list[Entry]:
        """Keep, in arrival order, the groups that fit in ``left`` rows (what the DP extractor's
        group privacy still covers). With ``wait`` the first group that does not fit and every
        later one stay pending (returned, neither answered nor acknowledged); otherwise they are
        rejected with ``reason``.

        Rows are handed out again over the kept groups (each takes its ``needs`` not yet taken),
        so a kept request never counts on rows of a dropped one."""
        keep: list[Group] = []
        waiting: list[Entry] = []
        taken: set[int] = set()
        for g in self.groups:
            rows = [r for r in g.needs if r not in taken]
            if waiting or len(rows) > left:
                if wait:
                    waiting.append(g.entry)
                else:
                    self.reject(g, reason, now)
                continue
            g.rows = rows
            keep.append(g)
            taken.update(rows)
            left -= len(rows)
        self.groups = keep
        return waiting


def plan_batch(
    entries: list[Entry],
    *,
    rows_for_ids: RowsForIds,
    alive: np.ndarray,
    sample_ids: np.ndarray,
    ledger: Ledger,
    guard: RemovalGuard | None,
    now: float,
    fold_overlaps: bool = False,
    is_excluded: Callable[[Any], bool] | None = None,
    fast: bool = True,
) -> Plan:
    """Classify ``entries`` (see the module docstring); never raises on bad input.

    A batch made only of common requests (:func:`_plan_common`) is planned in one pass over
    arrays; ``fast=False`` plans it entry by entry all the same (the tests compare both).

    With ``fold_overlaps`` (a retrain, which removes every group at once) a request sharing rows
    with an earlier group is not deferred: its shared rows are removed by the same retrain (each
    group's ``needs`` keeps them, so dropping the earlier group later can hand them over).
    ``is_excluded(id)``: whether an unknown id is no longer in the data because it was removed
    already (an earlier full-pipeline retrain).
    """
    if fast:
        common = _plan_common(entries, rows_for_ids, alive, ledger, guard)
        if common is not None:
            return common
    plan = Plan()
    try:
        known = _rows_in_one_call(entries, rows_for_ids)
    except Exception:  # noqa: BLE001 - map entry by entry, so only the bad one is rejected
        known = None
    claimed: set[int] = set()
    seen: set[str] = set()
    # a guard that can refuse nothing (``RemovalGuard.safe``) need not be asked
    ask_guard = guard is not None and not getattr(guard, "safe", False)
    for i, e in enumerate(entries):
        rid = e.request_id
        if rid is None:
            plan.dead.append(e)
            continue
        prior = ledger.seen(rid)
        if prior is not None and prior.dead_letter and e.replay_of:
            prior = None  # an operator replayed a dead letter: serve it as new
        if rid in seen or prior is not None:
            plan.repeats += 1
            if prior is not None:
                # a copy: the prior answer may still be on its way out (worker.publisher)
                prior = dataclasses.replace(prior, requested_at=e.requested_at)
                plan.answers.append(prior)
                plan.answered.append(e)
            else:
                plan.ack_only.append(e.entry_id)
            continue
        seen.add(rid)
        if e.error is not None:
            plan.answers.append(rejected_entry(e, e.error, now))
            plan.answered.append(e)
            continue
        try:
            mapped = known[i] if known is not None else rows_for_ids(e.sample_ids)
            rows = mapped[0]
            if len(rows) == 1 and not mapped[1] and rows[0] not in claimed and alive[rows[0]]:
                # the common request: one known id, its row alive and not claimed yet (what
                # _plan_entry decides for it, without its general bookkeeping)
                row = rows[0]
                reason = guard.refuse([row]) if ask_guard and guard is not None else None
                if reason is None:
                    claimed.add(row)
                    plan.groups.append(Group(e, [row], [], [], [row]))
                else:
                    plan.answers.append(rejected_entry(e, reason, now))
                    plan.answered.append(e)
                continue
            stop = _plan_entry(
                plan, e, mapped,
                alive=alive, sample_ids=sample_ids, guard=guard, now=now,
                fold_overlaps=fold_overlaps, is_excluded=is_excluded, claimed=claimed,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one entry must never stop the batch
            reason = f"the request could not be planned: {type(exc).__name__}: {exc}"[:500]
            plan.answers.append(rejected_entry(e, reason, now))
            plan.answered.append(e)
            continue
        if stop:
            seen.discard(rid)
            plan.deferred = entries[i:]
            break
    return plan


def _plan_common(
    entries: list[Entry],
    rows_for_ids: RowsForIds,
    alive: np.ndarray,
    ledger: Ledger,
    guard: RemovalGuard | None,
) -> Plan | None:
    """The plan of a batch whose every entry is the common request, or None (plan it entry by
    entry): a valid entry with a request id, one sample id that maps to an alive row, no
    request id answered before or twice in the batch, no row twice, and a guard that can refuse
    nothing. Then each entry is one group of its one row, in order, exactly as the loop of
    :func:`plan_batch` would make it; the checks run once over the batch (a burst's batch of
    8,192 single-id requests), not as a dozen branches per entry."""
    if guard is not None and not getattr(guard, "safe", False):
        return None
    ids: list[Any] = []
    rids: list[str] = []
    append, add = ids.append, rids.append
    for e in entries:
        one, rid = e.sample_ids, e.request_id
        if rid is None or e.error is not None or one is None or len(one) != 1:
            return None
        append(one[0])
        add(rid)
    if len(set(rids)) != len(rids) or ledger.knows_any(rids):
        return None
    try:
        rows, unknown = rows_for_ids(ids)
        if unknown or len(rows) != len(ids):
            return None
        picked = np.asarray(rows)
        # rows the loop would index as they are: integers within the alive mask (anything else,
        # the loop rejects the entry or decides it otherwise)
        if picked.size and (
            picked.dtype.kind not in "iu"
            or int(picked.min()) < 0
            or int(picked.max()) >= len(alive)
            or not alive[picked].all()
            or np.unique(picked).size != picked.size
        ):
            return None
    except Exception:  # noqa: BLE001 - the loop maps entry by entry and rejects the bad one
        return None
    plan = Plan()
    plan.groups = [Group(e, [r], [], [], [r]) for e, r in zip(entries, rows, strict=True)]
    return plan


def _plan_entry(
    plan: Plan,
    e: Entry,
    mapped: tuple[list[int], list[Any]],
    *,
    alive: np.ndarray,
    sample_ids: np.ndarray,
    guard: RemovalGuard | None,
    now: float,
    fold_overlaps: bool,
    is_excluded: Callable[[Any], bool] | None,
    claimed: set[int],
) -> bool:
    """Plan one valid entry into ``plan``; True when it (and what follows) must be deferred."""
    rows, unknown = mapped
    gone: list[Any] = []
    if unknown and is_excluded is not None:
        gone = [u for u in unknown if is_excluded(u)]
        unknown = [u for u in unknown if not is_excluded(u)]
    if not rows and not gone:
        plan.answers.append(rejected_entry(e, "no known sample id in the request", now, unknown))
        plan.answered.append(e)
        return False
    uniq = list(dict.fromkeys(rows))
    shared = claimed.intersection(uniq)
    if shared and not fold_overlaps:
        return True
    needs = [r for r in uniq if alive[r]]
    new = [r for r in needs if r not in shared]
    already = [py_value(sample_ids[r]) for r in uniq if not alive[r]] + gone
    if not needs:
        plan.answers.append(
            Answer(
                str(e.request_id),
                schema.STATUS_APPLIED,
                unknown_ids=unknown,
                already_removed_ids=already,
                requested_at=e.requested_at,
                applied_at=now,
            )
        )
        plan.answered.append(e)
        return False
    # The guard counts the rows earlier groups claimed as removed: only the new ones are checked.
    reason = guard.refuse(new) if guard is not None and new else None
    if reason is not None:
        plan.answers.append(rejected_entry(e, reason, now, unknown))
        plan.answered.append(e)
        return False
    claimed.update(new)
    plan.groups.append(Group(e, new, already, unknown, needs))
    return False


def _rows_in_one_call(entries: list[Entry], rows_for_ids: RowsForIds) -> list[Any] | None:
    """Map every entry's ids with one call; None (map them one by one) when some id is unknown,
    since only then the returned rows no longer line up with the ids asked for."""
    sizes = [len(e.sample_ids) if e.sample_ids is not None else 0 for e in entries]
    rows, unknown = rows_for_ids([i for e in entries if e.sample_ids for i in e.sample_ids])
    if unknown:
        return None
    out: list[Any] = []
    start = 0
    for size in sizes:
        out.append((rows[start : start + size], []))
        start += size
    return out
