"""Start and stop a worker subprocess (the demo, the integration tests, the load benchmark)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now (for the metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(
    settings: Settings, log_path: Path, *, loglevel: str = "INFO"
) -> subprocess.Popen[bytes]:
    """Run ``certremove worker`` for ``settings`` in a new process group; output to ``log_path``."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--loglevel", loglevel],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def metrics_text(port: int, addr: str = "127.0.0.1", timeout: float = 2.0) -> str:
    """The metrics endpoint's text exposition."""
    with urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 90.0) -> None:
    """Wait until the worker serves metrics (its model is loaded).

    Raises:
        RuntimeError: the worker exited or did not come up in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with status {proc.returncode}")
        try:
            metrics_text(port, timeout=0.5)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"worker did not serve metrics on port {port} within {timeout:.0f} s")


def stop_worker(
    proc: subprocess.Popen[bytes], *, kill: bool = False, timeout: float = 15.0
) -> None:
    """SIGKILL (``kill``) or SIGTERM the worker by its pid, then wait for it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
