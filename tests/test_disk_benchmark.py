"""benchmarks/disk.py end to end: the state directory's real snapshot writes (``Model.save``
with a journal, ``keep=3``) and bare fsyncs, timed; its JSON and its refusal of bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "disk.py"


def test_it_times_real_snapshots_and_fsyncs(tmp_path):
    out = tmp_path / "disk.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "d"), "--count", "4",
         "--interval", "0", "--json", "--output", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    for kind in ("snapshot", "fsync"):
        s = result[kind]
        assert s["count"] == 4
        assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert 0 <= s["over_100ms"] <= s["over_50ms"] <= 4
    # the real state directory: the newest three snapshots kept, CURRENT naming the last
    state = tmp_path / "d" / "state"
    snaps = sorted(p.name for p in (state / "snapshots").iterdir())
    assert len(snaps) == 3
    assert (state / "CURRENT").read_text().strip() == f"snapshots/{snaps[-1]}"


def test_bad_options_are_refused_with_a_message():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and "--count and --keep must be at least 1" in proc.stderr
