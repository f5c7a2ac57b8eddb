"""Durable writes of the state directory: a file written and fsynced, a directory fsynced, and
several paths fsynced at once (independent fsyncs issued together share the file system's
journal commits). Files and bytes only (:mod:`core.snapshots` lays the directory out)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename or a new file in it)."""
    _fsync_path(path, directory=True)


def write_file(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` (and fsync it, unless the caller does: :func:`fsync_together`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


#: threads that fsync several files at once (:func:`fsync_together`), made on first use
_FSYNC_POOL: ThreadPoolExecutor | None = None
_FSYNC_POOL_LOCK = threading.Lock()


def _forget_pool_in_child() -> None:
    """After ``fork``: the child has none of the parent's threads, so it makes a pool of its own
    on first use (the parent's would queue its fsyncs for threads that never run them, and
    wait forever); the lock is new too (a parent thread may have held it at the fork)."""
    global _FSYNC_POOL, _FSYNC_POOL_LOCK
    _FSYNC_POOL = None
    _FSYNC_POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY if directory else os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_together(files: Sequence[Path], dirs: Sequence[Path] = ()) -> None:
    """fsync ``files`` and directories ``dirs`` concurrently, and return once all are durable
    (raising the first error). Independent fsyncs issued together share the file system's
    journal commits: a snapshot's files cost about one commit instead of one each."""
    jobs = [(p, False) for p in files] + [(p, True) for p in dirs]
    if len(jobs) <= 1:
        for path, directory in jobs:
            _fsync_path(path, directory)
        return
    global _FSYNC_POOL
    with _FSYNC_POOL_LOCK:
        if _FSYNC_POOL is None:
            _FSYNC_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="certremove-fsync")
        pool = _FSYNC_POOL
    futures = [pool.submit(_fsync_path, path, directory) for path, directory in jobs]
    wait(futures)  # every fsync done (or failed) before anything is raised or moved on
    for future in futures:
        future.result()
