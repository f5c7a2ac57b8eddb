"""``certremove report`` (``worker/report.py``): a real image from a history the real service wrote
(real model, real Redis, blocking retrains), and clear one-line errors without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from producer import Client
from tests.conftest import make_state
from tests.worker.test_service import build
from worker.cli import app
from worker.history import HISTORY_NAME

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def served_history(state: Path, broker_url: str, rclient: redis.Redis, model_name: str) -> Path:
    """Serve 45 single-id requests in waves with max_removals 10: steps and blocking retrains."""
    client = Client(broker_url, model=model_name)
    service, _, _ = build(state, rclient, model_name, retrain_lead=0.0)
    for start in range(0, 45, 15):
        client.enqueue_many([[i] for i in range(start, start + 15)])
        for _ in range(10):
            service.drain()
            if service.retrain_due:
                service.retrain()
            elif not service.stream.has_work():
                break
    return state


def test_report_draws_a_png_from_a_served_history(
    tmp_path: Path, broker_url: str, rclient: redis.Redis, model_name: str
) -> None:
    state = served_history(
        make_state(tmp_path / "state", n=300, d=4, max_removals=10), broker_url, rclient, model_name
    )
    events = [json.loads(x)["event"] for x in (state / HISTORY_NAME).read_text().splitlines()]
    assert events[0] == "start" and events.count("retrain") >= 3 and "step" in events
    out = tmp_path / "report.png"
    res = runner.invoke(app, ["report", "--state", str(state), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    drawn = json.loads(res.stdout)
    assert drawn["model"] == model_name and drawn["rows_removed"] == 45
    assert drawn["retrains"] == {"max_removals": events.count("retrain")}
    assert drawn["versions"][0] == 1 and drawn["versions"][-1] == 1 + events.count("retrain")
    # the human line, and an SVG too
    res = runner.invoke(app, ["report", "--state", str(state), "--out", str(tmp_path / "r.svg")])
    assert res.exit_code == 0 and "wrote" in res.stdout
    assert (tmp_path / "r.svg").read_bytes().lstrip().startswith(b"<?xml")


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("no state dir", 2, "is not a directory"),
        ("no history", 1, "no history yet"),
        ("torn history only", 1, "no history yet"),
        ("missing out folder", 2, "does not exist"),
        ("bad suffix", 2, "name a .png"),
        ("out is a directory", 2, "is a directory"),
    ],
)
def test_report_bad_input_exits_with_one_line(
    tmp_path: Path, state: Path, case: str, code: int, words: str
) -> None:
    out = tmp_path / "report.png"
    if case == "no state dir":
        state = tmp_path / "nowhere"
    elif case == "torn history only":
        (state / HISTORY_NAME).write_bytes(b'{"t": 1, "event": "st')
    elif case in ("missing out folder", "bad suffix", "out is a directory"):
        (state / HISTORY_NAME).write_text(
            json.dumps({"t": 1.0, "event": "start", "model": "m", "version": 1}) + "\n"
        )
        out = {
            "missing out folder": tmp_path / "no" / "r.png",
            "bad suffix": tmp_path / "r.txt",
            "out is a directory": tmp_path,
        }[case]
        if case == "out is a directory":
            out = tmp_path / "dir.png"
            out.mkdir()
    res = runner.invoke(app, ["report", "--state", str(state), "--out", str(out)])
    assert res.exit_code == code, res.output
    assert words in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert isinstance(res.exception, SystemExit)


def test_a_minimal_history_still_draws(tmp_path: Path, state: Path) -> None:
    """A worker that started and served nothing yet: one 'start' line (no accuracy, no
    max_removals) draws without error."""
    rec = {"t": 1.7e9, "event": "start", "model": "m", "version": 3, "rows": 0}
    (state / HISTORY_NAME).write_text(json.dumps(rec) + "\n")
    out = tmp_path / "r.png"
    res = runner.invoke(app, ["report", "--state", str(state), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes().startswith(PNG)
