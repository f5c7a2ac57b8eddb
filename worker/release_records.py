"""What each release covers: the release record (``STATE_DIR/releases.jsonl``) and the applied
requests of the ledger records (``worker/releases.py``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer import schema
from worker.ledger import Ledger, ledger_files
from worker.status import Answer

log = logging.getLogger("certremove.worker")

RECORD_NAME = "releases.jsonl"


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


def load_coverage(
    records: ReleaseRecords, ledger: Ledger, state_dir: Path
) -> tuple[list[Covered], list[tuple[dict[str, Any], list[Covered]]]]:
    """What a releaser finds at start, read from the ledger files: the applied requests no
    release covers yet, and each release not yet announced with the requests it covers."""
    last_to = int(records.last["ledger_to"]) if records.last else 0
    if last_to > ledger.count:
        log.warning(
            "the release record covers %d ledger records but the ledger holds %d (restored "
            "from an older backup?): releases cover the ledger from its end",
            last_to,
            ledger.count,
        )
        last_to = ledger.count
    todo = [r for r in records.releases if int(r["release"]) not in records.announced]
    start = min([int(r["ledger_from"]) for r in todo] + [last_to])
    tail: list[Covered] = []
    if start >= ledger.count:
        return tail, [(r, []) for r in todo]
    by_release: dict[int, list[Covered]] = {int(r["release"]): [] for r in todo}
    for pos, rec in ledger_records_from(state_dir, start):
        covered = covered_in_record(rec)
        if pos >= last_to:
            tail += covered
            continue
        for r in todo:
            if int(r["ledger_from"]) <= pos < int(r["ledger_to"]):
                by_release[int(r["release"])] += covered
    return tail, [(r, by_release[int(r["release"])]) for r in todo]
