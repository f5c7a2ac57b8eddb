"""benchmarks/contention.py end to end: Newton steps timed with nothing, a fitting thread and a
fitting process beside them; its JSON and its refusal of bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "contention.py"


@pytest.mark.slow
def test_it_times_steps_beside_nothing_a_thread_and_a_process(tmp_path):
    out = tmp_path / "contention.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--batch", "50", "--rounds", "1",
         "--json", "--output", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    assert [r["setting"] for r in result["runs"]] == ["none", "thread", "process"]
    for r in result["runs"]:
        assert 0 < r["wall_median_ms"] <= r["wall_max_ms"]
        assert 0 < r["cpu_median_ms"]


def test_bad_options_are_refused_with_a_message():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "400", "--batch", "300"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "must stay below 90,000 rows" in proc.stderr
