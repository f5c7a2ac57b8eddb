"""Request statuses: the answer to a request (:class:`Answer`) and its records, grouped as the
ledger file and the persisted journal hold them. The script that publishes answers is
:mod:`worker.status_script`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: status, method, version, time, reason, dead-lettered
AnswerKey = tuple[str, str, int | None, float | None, str, bool]


@dataclass
class Answer:
    """The final answer to one request (what its status hash will say).

    ``removed_ids`` (the sample ids this request removed) go to the ledger file only, never to
    Redis. ``dead_letter`` marks the rejection of a dead-lettered entry: an operator may replay
    it (``certremove deadletters replay``), and the replayed entry is served as new.
    """

    request_id: str
    status: str
    method: str = ""
    model_version: int | None = None
    unknown_ids: list[Any] = field(default_factory=list)
    already_removed_ids: list[Any] = field(default_factory=list)
    reason: str = ""
    requested_at: float | None = None
    applied_at: float | None = None
    only_if_queued: bool = False
    removed_ids: list[Any] = field(default_factory=list)
    dead_letter: bool = False

    def common_key(self) -> tuple[str, str, int | None, float | None] | None:
        """Answers with equal keys share their status values (a plain committed request)."""
        if self.only_if_queued or self.unknown_ids or self.already_removed_ids or self.reason:
            return None
        return (self.status, self.method, self.model_version, self.applied_at)

    def values(self, *, with_requested_at: bool = True) -> list[str]:
        """The 8 status values in script order ('' leaves a field alone); the producer already
        wrote ``requested_at``, so shared values leave it alone."""
        at = "" if self.requested_at is None or not with_requested_at else repr(self.requested_at)
        return [
            self.status,
            self.method,
            "" if self.model_version is None else str(self.model_version),
            json.dumps(self.unknown_ids),
            json.dumps(self.already_removed_ids),
            self.reason,
            at,
            "" if self.applied_at is None else repr(self.applied_at),
        ]

    def key(self) -> AnswerKey:
        return (
            self.status,
            self.method,
            self.model_version,
            self.applied_at,
            self.reason,
            self.dead_letter,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able copy (the journal persisted with the model state). A field at its
        default (None, an empty string or list) is left out: :meth:`from_json` reads it back
        the same, and a batch's journal is encoded at every persist."""
        rec: dict[str, Any] = {"rid": self.request_id, "s": self.status}
        if self.method:
            rec["m"] = self.method
        if self.model_version is not None:
            rec["v"] = self.model_version
        if self.unknown_ids:
            rec["u"] = self.unknown_ids
        if self.already_removed_ids:
            rec["a"] = self.already_removed_ids
        if self.reason:
            rec["r"] = self.reason
        if self.requested_at is not None:
            rec["q"] = self.requested_at
        if self.applied_at is not None:
            rec["t"] = self.applied_at
        if self.removed_ids:
            rec["x"] = self.removed_ids
        return rec

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> Answer:
        return cls(
            str(rec["rid"]),
            str(rec["s"]),
            str(rec.get("m") or ""),
            rec.get("v"),
            list(rec.get("u") or []),
            list(rec.get("a") or []),
            reason=str(rec.get("r") or ""),
            requested_at=rec.get("q"),
            applied_at=rec.get("t"),
            removed_ids=list(rec.get("x") or []),
        )


def group_answers(answers: Iterable[Answer]) -> dict[AnswerKey, list[Answer]]:
    """The answers by :meth:`Answer.key`, in order of first appearance (a ledger record each)."""
    groups: dict[AnswerKey, list[Answer]] = {}
    for a in answers:
        key = a.key()
        group = groups.get(key)
        if group is None:
            groups[key] = [a]
        else:
            group.append(a)
    return groups


def answer_records(
    groups: dict[AnswerKey, list[Answer]], *, requested_at: bool = False
) -> list[dict[str, Any]]:
    """The groups of :func:`group_answers` as ledger records (the shape of a ledger line,
    docs/design.md "State directory"): ``s``, ``m``, ``v``, ``t``, ``r`` (when any), ``d: 1`` (a
    dead-letter rejection), ``ids``, ``l`` (``{request_id: [unknown_ids, already_removed_ids]}``
    of requests that had some), ``x`` (the sample ids removed) and ``xn`` (how many of ``x`` each
    request removed, on a record of several requests). ``requested_at`` adds ``q``, each
    request's enqueue time (the journal's records)."""
    records: list[dict[str, Any]] = []
    for (s, m, v, t, r, d), group in groups.items():
        rec: dict[str, Any] = {"s": s, "m": m, "v": v, "t": t}
        if r:
            rec["r"] = r
        if d:
            rec["d"] = 1
        rec["ids"] = [a.request_id for a in group]
        lists = {
            a.request_id: [a.unknown_ids, a.already_removed_ids]
            for a in group
            if a.unknown_ids or a.already_removed_ids
        }
        if lists:
            rec["l"] = lists
        removed = [i for a in group for i in a.removed_ids]
        if removed:
            rec["x"] = removed
            if len(group) > 1:
                # how many of ``x`` each request removed, in ``ids`` order (receipts)
                rec["xn"] = [len(a.removed_ids) for a in group]
        if requested_at:
            rec["q"] = [a.requested_at for a in group]
        records.append(rec)
    return records


def answers_from_record(rec: dict[str, Any]) -> list[Answer]:
    """The answers of one record written by :func:`answer_records` (a journal's, where the
    split of ``x`` is always known). Raises ``ValueError`` on a record it cannot split."""
    ids = [str(i) for i in rec["ids"]]
    removed = list(rec.get("x") or [])
    counts = rec.get("xn")
    if len(ids) == 1:
        split = [removed]
    elif not removed:
        split = [[] for _ in ids]
    elif isinstance(counts, list) and len(counts) == len(ids) and sum(counts) == len(removed):
        split, at = [], 0
        for n in counts:
            split.append(removed[at : at + int(n)])
            at += int(n)
    else:
        raise ValueError("a record of several requests without the split of its removed ids")
    lists = rec.get("l") or {}
    times = rec.get("q")
    if not isinstance(times, list) or len(times) != len(ids):
        times = [None] * len(ids)
    out = []
    for rid, part, at_q in zip(ids, split, times, strict=True):
        unknown, already = lists.get(rid) or ([], [])
        out.append(
            Answer(
                rid,
                str(rec["s"]),
                str(rec.get("m") or ""),
                rec.get("v"),
                list(unknown),
                list(already),
                reason=str(rec.get("r") or ""),
                requested_at=at_q,
                applied_at=rec.get("t"),
                removed_ids=part,
                dead_letter=bool(rec.get("d")),
            )
        )
    return out
