"""Integration fixtures: a real ``certremove worker`` subprocess on its own database and model."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker.launcher import free_port, start_worker, stop_worker, wait_ready
from worker.settings import Settings


def make_settings(state: Path, broker_url: str, model: str, **overrides: Any) -> Settings:
    """Settings of a test worker: ``state``, ``broker_url`` and ``model``, a free metrics port,
    the CPU, consumer ``{model}-w``; ``overrides`` replace or add fields."""
    fields: dict[str, Any] = dict(
        broker_url=broker_url,
        model=model,
        state_dir=state,
        metrics_port=free_port(),
        device="cpu",
        consumer=f"{model}-w",
    )
    fields.update(overrides)
    return Settings(**fields)


def run_to_exit(settings: Settings, log: Path, timeout: float = 60) -> tuple[int, str, float]:
    """Start a worker expected to exit on its own; its exit status, output and run time (the
    test fails when it is still running after ``timeout`` s)."""
    start = time.monotonic()
    proc = start_worker(settings, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the worker did not exit within {timeout} s:\n{log.read_text()[-3000:]}")
    return code, log.read_text(errors="replace"), time.monotonic() - start


@dataclass
class WorkerHandle:
    """A running worker process and what it serves."""

    settings: Settings
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return self.settings.metrics_port

    def stop(self, *, kill: bool = False) -> None:
        stop_worker(self.proc, kill=kill)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


StartWorker = Callable[..., WorkerHandle]


@pytest.fixture
def start_worker_process(tmp_path: Path, broker_url: str) -> Iterator[StartWorker]:
    """Start workers (stopped by pid at teardown): ``start(state, broker_url, model, **settings)``.

    Depending on ``broker_url`` orders the teardowns: the workers stop before the test's database
    is flushed or its keys deleted, so none writes a key back after the cleanup.
    """
    handles: list[WorkerHandle] = []

    def start(state: Path, broker_url: str, model: str, **overrides: Any) -> WorkerHandle:
        fields: dict[str, Any] = dict(drain_interval=2.0, claim_idle_ms=1000, visibility_timeout=30)
        fields.update(overrides)
        settings = make_settings(state, broker_url, model, **fields)
        log = tmp_path / f"worker-{len(handles)}.log"
        handle = WorkerHandle(settings, start_worker(settings, log), log)
        handles.append(handle)
        try:
            wait_ready(handle.proc, settings.metrics_port)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{handle.log_text()[-3000:]}") from exc
        return handle

    yield start
    for h in handles:
        h.stop()
