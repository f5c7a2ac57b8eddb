"""Every ``certremove`` command, run as the real console script, answers bad input with a
non-zero exit status and one line on stderr, never a traceback; an unreachable (or silent)
broker fails within seconds; ``--version`` and ``-h`` work everywhere."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import torch

from producer import schema

NOWHERE = "redis://127.0.0.1:1/0"


def certremove_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m worker.cli``."""
    script = Path(sys.executable).with_name("certremove")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]


def run_cli(
    args: list[str], *, cwd: Path | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "CERTREMOVE_DEBUG"}
    environ.update({"CERTREMOVE_BROKER_URL": NOWHERE, "CERTREMOVE_DEVICE": "cpu", **env})
    return subprocess.run(
        [*certremove_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=environ,
    )


def assert_one_line_error(out: subprocess.CompletedProcess[str], code: int | None) -> str:
    """Exit ``code`` (any non-zero when None), no traceback, exactly one line on stderr."""
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    if code is None:
        assert out.returncode != 0, text
    else:
        assert out.returncode == code, text
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


# (command line; {tmp} a fresh folder, {file} a plain file, {empty} an empty folder; the exit
# status, None for any non-zero; a text the line must contain)
CASES: list[tuple[str, int | None, str]] = [
    # train
    ("train --dataset digits --state {tmp}/s --device foo", 2, "device"),
    ("train --dataset digits --state {file}", 2, "is a file"),
    ("train --dataset digits --state {file}/sub", 2, "not a directory"),
    ("train --dataset 'x;y/../z' --state {tmp}/s", 2, "unknown dataset"),
    ("train --dataset {empty}/none.npz --state {tmp}/s", 2, "does not exist"),
    ("train --dataset synthetic:n=abc --state {tmp}/s", 2, "synthetic"),
    ("train --dataset mnist --state {tmp}/s", 2, "--data-dir"),
    ("train --dataset mnist --data-dir {file} --state {tmp}/s", 2, "MNIST"),
    ("train --dataset digits --state {tmp}/s --lam abc", 2, "--lam"),
    ("train --dataset digits --state {tmp}/s --lam 0", 2, "lam"),
    ("train --dataset digits --state {tmp}/s --sigma -1", 2, "sigma"),
    ("train --dataset digits --state {tmp}/s --epsilon 5", 2, "--calibration analytic"),
    ("train --dataset digits --state {tmp}/s --calibration nope", 2, "--calibration"),
    ("train --dataset digits --state {tmp}/s --accounting nope", 2, "'exact', 'bound'"),
    ("train --dataset digits --state {tmp}/s --max-removals 0", 2, "--max-removals"),
    ("train --dataset digits --state {tmp}/s --max-removals lots", 2, "--max-removals"),
    ("train --dataset digits --state {tmp}/s --binary-classes 3", 2, "--binary-classes"),
    ("train --state {tmp}/s", 2, "Missing option '--dataset'"),
    ("trian", 2, "No such command"),
    ("train --nope", 2, "No such option"),
    # worker (start-up belongs to worker/cli.py's worker command)
    ("worker --state {tmp}/missing", None, ""),
    ("worker --state {file}", None, ""),
    ("worker --state {empty} --model 'bad name!'", None, "model name"),
    ("worker --state {empty} --metrics-port abc", 2, "--metrics-port"),
    ("demo --requests 0", 2, "--requests"),
    # producer commands
    ("enqueue", 2, "Missing argument"),
    (f"enqueue 1 --broker-url {NOWHERE}", 2, "cannot reach Redis"),
    ("enqueue 1 --model 'bad/name'", 2, "model name"),
    ("enqueue 1 --broker-url http://x", 2, "broker URL"),
    (f"status abc --broker-url {NOWHERE}", 2, "cannot reach Redis"),
    (f"status --broker-url {NOWHERE}", None, "Redis"),
    ("loadtest --requests 0 --rate 1", 2, "--requests"),
    ("loadtest --requests 1 --rate abc", 2, "--rate"),
    (f"loadtest --requests 1 --rate 1 --broker-url {NOWHERE}", 2, "cannot reach Redis"),
    ("loadtest --requests 1 --rate 1 --output /nonexistent/dir/x.json", 2, "does not exist"),
    ("loadtest --requests 1 --rate 1 --output {empty}", 2, "is a directory"),
    (f"deadletters list --broker-url {NOWHERE}", 2, "cannot reach Redis"),
    ("deadletters list --limit abc", 2, "--limit"),
    ("deadletters replay", 2, "--all"),
    (f"owner show --broker-url {NOWHERE}", 2, "cannot reach Redis"),
    ("owner reset --model 'a b'", 2, "model name"),
    # state
    ("state verify --state {tmp}/missing", 2, "not a directory"),
    ("state verify --state {file}", 2, "not a directory"),
    ("state recover --state {file}", 2, "not a directory"),
    ("state recover --state {empty} --yes", 1, "no valid snapshot"),
    # operations (report and health belong to their own modules)
    ("report --state {file}", None, ""),
    ("health --url http://127.0.0.1:1/metrics", 1, ""),
    # extractor (forwarded to its own app)
    ("extractor train --dataset mnist --out {tmp}/x.pt", 2, "--data-dir"),
    ("extractor train --dataset mnist", 2, "Missing option '--out'"),
    (
        "extractor extract --model {tmp}/no.pt --dataset mnist --out {tmp}/o.npz "
        "--data-dir {empty}",
        2,
        "not found",
    ),  # fmt: skip
    ("extractor nope", 2, "No such command"),
]


#: cases run at once by :func:`case_runs`: most of a case is the interpreter importing torch
#: (about 4 s of one core), so on two cores the module takes half the time
CASE_WORKERS = max(2, min(4, os.cpu_count() or 2))


@pytest.fixture(scope="module")
def case_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[tuple[subprocess.CompletedProcess[str], float]]]]:
    """Every selected case of :data:`CASES` started at once, :data:`CASE_WORKERS` at a time,
    each in a fresh folder holding ``file`` (a plain file) and ``empty`` (an empty folder): the
    command's result and its own seconds, by command line."""
    selected = [
        item.callspec.params["command"]
        for item in request.session.items
        if "case_runs" in item.fixturenames
    ]

    def run(command: str) -> tuple[subprocess.CompletedProcess[str], float]:
        tmp = tmp_path_factory.mktemp("case")
        (tmp / "file").write_text("not a directory\n")
        (tmp / "empty").mkdir()
        args = [
            a.format(tmp=tmp, file=tmp / "file", empty=tmp / "empty") for a in shlex.split(command)
        ]
        started = time.monotonic()
        out = run_cli(args, cwd=tmp)
        return out, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=CASE_WORKERS) as pool:
        yield {command: pool.submit(run, command) for command in selected}


@pytest.mark.parametrize(("command", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(
    case_runs: dict[str, Future[tuple[subprocess.CompletedProcess[str], float]]],
    command: str,
    code: int | None,
    needle: str,
) -> None:
    out, seconds = case_runs[command].result()
    line = assert_one_line_error(out, code)
    assert needle in line
    if NOWHERE in command:  # an unreachable broker fails at once, it is not retried for long
        assert seconds < 15


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_train_on_cuda_without_a_gpu(tmp_path: Path) -> None:
    out = run_cli(["train", "--dataset", "digits", "--state", str(tmp_path / "s"),
                   "--device", "cuda"])  # fmt: skip
    assert "no usable CUDA device" in assert_one_line_error(out, 2)
    assert not (tmp_path / "s").exists()


def test_a_silent_broker_fails_within_seconds() -> None:
    """A server that accepts the connection but never answers (not Redis, or hung)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        started = time.monotonic()
        out = run_cli(["enqueue", "1", "--broker-url", url], timeout=60)
        elapsed = time.monotonic() - started
    assert "cannot reach Redis" in assert_one_line_error(out, 2)
    assert elapsed < 20


def test_version() -> None:
    from importlib.metadata import version

    out = run_cli(["--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"certremove {version('certremove')}"


HELP_COMMANDS = [
    [], ["train"], ["worker"], ["demo"], ["enqueue"], ["status"], ["loadtest"], ["report"],
    ["health"], ["deadletters"], ["deadletters", "list"], ["deadletters", "replay"], ["owner"],
    ["owner", "show"], ["owner", "reset"], ["state"], ["state", "verify"],
    ["state", "snapshots"], ["state", "recover"], ["extractor", "train"],
]  # fmt: skip


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "certremove")
def test_dash_h_is_help_everywhere(command: list[str]) -> None:
    out = run_cli([*command, "-h"])
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert "--help" in out.stdout and "-h" in out.stdout


@pytest.mark.parametrize("command", [[], ["train"]], ids=["certremove", "train"])
def test_dash_h_is_the_same_as_help(command: list[str]) -> None:
    assert run_cli([*command, "-h"]).stdout == run_cli([*command, "--help"]).stdout


def test_no_arguments_prints_the_help() -> None:
    out = run_cli([])
    assert out.returncode == 2 and "Usage:" in out.stdout and "Traceback" not in out.stderr


def test_a_redis_error_after_connecting_is_one_line(
    broker_url: str, model_name: str, rclient: redis.Redis
) -> None:
    """An error Redis answers to a command (here WRONGTYPE: the stream's key holds a string)
    ends in one line, exit 1 (the catch-all of ``worker.cli.main``)."""
    rclient.set(schema.stream_key(model_name), "not a stream")
    out = run_cli(["enqueue", "1", "--broker-url", broker_url, "--model", model_name])
    assert "WRONGTYPE" in assert_one_line_error(out, 1)
