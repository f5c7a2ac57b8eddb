"""The model's history: one JSON line per persisted event in ``STATE_DIR/history.jsonl``.

The worker appends a line when it starts serving (``start``), after every persisted Newton step
(``step``) and after every retrain, background or blocking (``retrain``; the catch-up step of an
adopted background fit is part of its retrain line). ``certremove report`` draws it
(``worker/report.py``). A line holds

- ``t`` (wall time), ``event``, ``model`` (the model name), ``version`` (the model version, which
  is also the noise epoch: every retrain draws fresh noise and adds one);
- ``rows``: training rows removed by this event (0 for ``start``), ``training_rows`` left,
  ``removed_in_epoch``, ``max_removals`` (null: no count trigger);
- ``budget_used``, ``budget_limit`` (``model.budget_total``), ``accounting``;
- ``accuracy``: the latest test accuracy of this version (measured when the version changes and
  then at most every ``ACCURACY_EVERY_S`` seconds; absent without a test split);
- ``epsilon``, ``delta`` (``model.guarantee()``), ``certified``;
- ``reason`` on ``retrain`` lines: ``max_removals``, ``budget``, ``numerical`` or ``extractor``.

**Internal, operator only.** The budget figures depend on the secret noise draw (docs/design.md
"Secrets and limits"), like the metrics endpoint: keep the file with the state directory and never
publish it. It never holds a sample id, a request id, the noise, a gradient or a per-step residual
beyond the budget used.

Writes: whole lines or nothing, the approach of the ledger file (``worker/ledger.py``): a write
that fails part-way is cut off again, and anything past the last whole line is cut before the
next append; a torn last line (a crash mid-append) is cut when the file is opened and skipped when
it is read. Unlike the ledger the history is not fsynced per line: it is a view for operators,
the ledger is the record (a power cut may lose its last lines, never the model's state). A write
that fails (a full disk) is logged and ignored: the history never fails a step.

Bounded: past ``MAX_LINES`` lines or ``MAX_BYTES`` bytes the file is compacted (rewritten
atomically, ``os.replace``): the newest half of the lines stays as it is; of the older lines only
the ``start`` and ``retrain`` lines and the last ``step`` line of each version stay (at most a
quarter of the bound; the oldest go first), and a ``summary`` first line counts what was dropped
(``dropped_lines``, ``dropped_steps``, ``dropped_rows``, ``since``: the time of the first line
ever written, ``compactions``). A compaction runs in the step that crosses the bound (about 0.7 s
for 100,000 lines on 2 cores, once per some 50,000 lines); an append costs about 0.1 ms (a Newton
step on ``digits`` about 12 ms).

The state checks (``worker/integrity.py``, ``certremove state verify``) ignore the file, and
``certremove train --overwrite`` deletes it with the rest of the directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.ledger import write_whole

if TYPE_CHECKING:
    from core.model import Model

log = logging.getLogger("certremove.worker")

#: the history file in a state directory
HISTORY_NAME = "history.jsonl"
#: compact past this many lines ...
MAX_LINES = 100_000
#: ... or this many bytes
MAX_BYTES = 32 * 2**20
#: test accuracy is measured again at most this often within one version (and at every change)
ACCURACY_EVERY_S = 10.0
EVENTS = ("start", "step", "retrain")
SUMMARY = "summary"


def finite(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def well_formed(rec: Any) -> bool:
    """Whether ``rec`` is an event line the readers can use: a dict with a known ``event``, a
    finite number ``t`` and integer ``version`` and ``rows`` where present (a line of valid JSON
    with other types, from a hand edit or a damaged block, is skipped like a torn one)."""
    if not isinstance(rec, dict) or rec.get("event") not in EVENTS:
        return False
    t = rec.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        return False
    return all(rec.get(k) is None or _int(rec.get(k)) for k in ("version", "rows"))


def history_record(
    model: Model,
    *,
    event: str,
    model_name: str,
    rows: int,
    now: float,
    accuracy: float | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The history line of ``model`` after ``event`` (see the module docstring)."""
    epsilon, delta = model.guarantee()
    rec: dict[str, Any] = {
        "t": round(float(now), 3),
        "event": event,
        "model": model_name,
        "version": int(model.version),
        "rows": int(rows),
        "training_rows": int(model.n_alive),
        "removed_in_epoch": int(model.removed_in_epoch),
        "max_removals": None if model.max_removals is None else int(model.max_removals),
        "budget_used": finite(model.budget_used),
        "budget_limit": finite(model.budget_total),
        "accounting": str(model.hyper.accounting),
        "epsilon": finite(epsilon),
        "delta": finite(delta),
        "certified": bool(model.certified),
    }
    if accuracy is not None and finite(accuracy) is not None:
        rec["accuracy"] = round(float(accuracy), 6)
    if event == "retrain":
        rec["reason"] = reason
    return rec


@dataclass
class HistoryRead:
    """What :func:`read_history` found."""

    #: the event lines, oldest first
    records: list[dict[str, Any]] = field(default_factory=list)
    #: the ``summary`` line of earlier compactions (None: never compacted)
    summary: dict[str, Any] | None = None
    #: lines that did not parse (a torn last line, damage), skipped
    skipped: int = 0


def history_path(state_dir: Path) -> Path:
    """The history file of a state directory."""
    return Path(state_dir) / HISTORY_NAME


def parse_lines(data: bytes) -> HistoryRead:
    """The records of a history file's bytes; lines that do not parse are counted, skipped."""
    out = HistoryRead()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            out.skipped += 1
            continue
        if not isinstance(rec, dict):
            out.skipped += 1
        elif rec.get("event") == SUMMARY:
            out.summary = rec
        elif well_formed(rec):
            out.records.append(rec)
        else:
            out.skipped += 1
    return out


def read_history(path: Path) -> HistoryRead:
    """Read a history file (``path``, or a state directory holding one).

    Raises:
        FileNotFoundError: there is no history file.
        OSError: it cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        path = history_path(path)
    return parse_lines(path.read_bytes())


class History:
    """Appends the history lines of one state directory (see the module docstring).

    Args:
        path: the history file (``STATE_DIR/history.jsonl``).
        max_lines, max_bytes: compact past either.
    """

    def __init__(self, path: Path, *, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES):
        self.path = Path(path)
        self.max_lines = max(8, int(max_lines))
        self.max_bytes = max(4096, int(max_bytes))
        #: size of the file up to its last whole line (None: unknown, found at the next append)
        self._size: int | None = None
        self._lines = 0
        #: the last ``retrain`` line read at start or written since (None: none known)
        self.last_retrain: dict[str, Any] | None = None
        #: the last event line read at start or written since
        self.last: dict[str, Any] | None = None
        self._failing = False
        try:
            self._open()
        except OSError as exc:
            self._warn("cannot read", exc)

    def _open(self) -> None:
        if not self.path.exists():
            self._size = 0
            return
        with open(self.path, "r+b") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]  # a torn last line (crash mid-append)
                f.truncate(len(data))
        self._size = len(data)
        self._lines = data.count(b"\n")
        # The newest lines only: the last event, and the last retrain (its time and reason).
        for line in reversed(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not well_formed(rec):
                continue
            if self.last is None:
                self.last = rec
            if rec.get("event") == "retrain":
                self.last_retrain = rec
                break

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._failing:
            log.warning(
                "%s the history file %s (%s: %s); serving goes on without it",
                what,
                self.path,
                type(exc).__name__,
                str(exc)[:200],
            )
        self._failing = True

    def append(self, record: dict[str, Any]) -> bool:
        """Append one line (whole or nothing), compacting past the bounds. Returns False when the
        write failed (logged once per failure streak; never raised)."""
        text = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        try:
            self._append(text.encode("utf-8"))
            if self._lines > self.max_lines or (self._size or 0) > self.max_bytes:
                self.compact()
        except (OSError, ValueError) as exc:
            self._warn("cannot write", exc)
            return False
        if self._failing:
            log.info("the history file %s is written again", self.path)
            self._failing = False
        self.last = record
        if record.get("event") == "retrain":
            self.last_retrain = record
        return True

    def _append(self, data: bytes) -> None:
        """Whole lines or nothing (``worker.ledger.Ledger``'s approach, without the fsync)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if self._size is not None and end > self._size:
                os.ftruncate(fd, self._size)  # a partial line of a failed write
                end = self._size
            elif self._size is None and end:
                os.lseek(fd, end - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":  # not known to end on a whole line: do not join it
                    data = b"\n" + data
            try:
                write_whole(fd, data, end, fsync=False)
            except BaseException:
                self._size = end  # cut before the next append if the cut failed too
                raise
            self._size = end + len(data)
            self._lines += 1
        finally:
            os.close(fd)

    def compact(self) -> None:
        """Rewrite the file within its bounds (see the module docstring), atomically."""
        read = read_history(self.path)
        records = read.records
        # The newest half as it is, by lines and by bytes.
        average = max(1, (self._size or 1) // max(1, self._lines))
        budget = min(self.max_lines, self.max_bytes // average)
        recent = max(1, budget // 2)
        old, new = records[:-recent], records[-recent:]
        last_step: dict[int, int] = {}
        for i, rec in enumerate(old):
            if rec.get("event") == "step":
                last_step[int(rec.get("version") or 0)] = i
        keep_index = {i for i, r in enumerate(old) if r.get("event") != "step"}
        keep_index |= set(last_step.values())
        kept = [r for i, r in enumerate(old) if i in keep_index][-max(1, budget // 4) :]
        kept_ids = {id(r) for r in kept}
        dropped = [r for r in old if id(r) not in kept_ids]
        summary = dict(read.summary or {})
        first_t = records[0].get("t") if records else None
        summary.update(
            event=SUMMARY,
            since=summary.get("since", first_t),
            dropped_lines=int(summary.get("dropped_lines", 0)) + len(dropped) + read.skipped,
            dropped_steps=int(summary.get("dropped_steps", 0))
            + sum(1 for r in dropped if r.get("event") == "step"),
            dropped_rows=int(summary.get("dropped_rows", 0))
            + sum(int(r.get("rows") or 0) for r in dropped),
            compactions=int(summary.get("compactions", 0)) + 1,
            compacted_at=new[-1].get("t") if new else first_t,
        )
        lines = [summary, *kept, *new]
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines).encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._size, self._lines = len(text), len(lines)
