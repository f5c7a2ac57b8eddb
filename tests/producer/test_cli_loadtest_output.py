"""``certremove loadtest --output``: a path that cannot be written fails before any deletion is
sent (one line, exit 2, nothing in the stream); a good one gets the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from producer import schema
from tests.test_cli_oneline import assert_one_line_error, run_cli


def _loadtest(broker_url: str, model: str, output: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_cli(["loadtest", "--requests", "3", "--rate", "0", "--output", str(output),
                    "--broker-url", broker_url, "--model", model, *extra])  # fmt: skip


def _nothing_sent(client: redis.Redis, model: str) -> None:
    assert client.xlen(schema.stream_key(model)) == 0
    assert list(client.scan_iter(match=f"certremove:{model}:*")) == []


@pytest.mark.parametrize("where", ["missing-dir", "a-directory", "under-a-file"])
def test_unwritable_output_fails_before_sending(
    tmp_path: Path, broker_url: str, model_name: str, rclient: redis.Redis, where: str
) -> None:
    (tmp_path / "file").write_text("x")
    output = {
        "missing-dir": Path("/nonexistent/dir/x.json"),
        "a-directory": tmp_path,
        "under-a-file": tmp_path / "file" / "x.json",
    }[where]
    line = assert_one_line_error(_loadtest(broker_url, model_name, output), 2)
    assert "--output" in line
    _nothing_sent(rclient, model_name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_before_sending(
    tmp_path: Path, broker_url: str, model_name: str, rclient: redis.Redis
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        line = assert_one_line_error(_loadtest(broker_url, model_name, folder / "x.json"), 2)
    finally:
        folder.chmod(0o700)
    assert "cannot be written" in line
    _nothing_sent(rclient, model_name)


def test_writable_output_gets_the_result(
    tmp_path: Path, broker_url: str, model_name: str, rclient: redis.Redis
) -> None:
    """No worker runs: the requests stay queued (exit 1), the result is written all the same."""
    output = tmp_path / "result.json"
    out = _loadtest(broker_url, model_name, output, "--timeout", "0.2", "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    result = json.loads(output.read_text())
    assert result["requests"] == 3 and result["not_applied"] == 3
    assert rclient.xlen(schema.stream_key(model_name)) == 3
