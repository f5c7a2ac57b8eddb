"""``certremove demo`` end to end: embedded Redis, training, worker, deletions, final report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_runs_with_an_embedded_redis_and_retrains(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CERTREMOVE_BROKER_URL"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "demo",
            "--json",
            "--requests",
            "150",
            "--max-removals",
            "50",
            "--state",
            str(tmp_path / "state"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["applied"] == report["requests"] == 150
    assert report["applied_newton"] + report["applied_retrain"] == 150
    assert report["retrains"] >= 1 and report["model_version"] >= 2
    assert 0 <= report["budget_used"] <= report["budget_total"]
    assert report["broker_url"].startswith("redis+socket://")
    assert 0 < report["accuracy_after"] <= 1
