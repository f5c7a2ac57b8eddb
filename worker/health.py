"""``certremove health``: is the worker serving? (the compose and Dockerfile health checks)

It reads the worker's metrics endpoint and checks ``certremove_heartbeat_timestamp_seconds``,
which the worker sets every few seconds from its event loop and after each task
(``worker.tasks``): exit 0 when the endpoint answers and the heartbeat is at most ``--max-age``
seconds old, else exit 1 with one line saying why. Fast on purpose: no torch, no ``core``, no
Redis.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from typing import Annotated

import typer

HEARTBEAT = "certremove_heartbeat_timestamp_seconds"
DEFAULT_MAX_AGE = 30.0
#: seconds to wait for the metrics endpoint
TIMEOUT_S = 5.0


def default_url() -> str:
    """The metrics URL of a worker on this host: ``CERTREMOVE_METRICS_ADDR`` (a wildcard address
    becomes 127.0.0.1) and ``CERTREMOVE_METRICS_PORT`` (9820)."""
    addr = os.environ.get("CERTREMOVE_METRICS_ADDR") or "127.0.0.1"
    if addr in ("0.0.0.0", "::", "[::]"):
        addr = "127.0.0.1"
    elif ":" in addr and not addr.startswith("["):
        addr = f"[{addr}]"
    port = os.environ.get("CERTREMOVE_METRICS_PORT") or "9820"
    return f"http://{addr}:{port}/metrics"


def heartbeat_value(text: str) -> float | None:
    """The heartbeat sample of a text exposition, or None when it has none."""
    for line in text.splitlines():
        rest = line[len(HEARTBEAT) :] if line.startswith(HEARTBEAT) else ""
        if rest[:1] not in (" ", "{"):
            continue
        if rest.startswith("{"):
            rest = rest.rsplit("}", 1)[-1]
        try:
            return float(rest.split()[0])
        except (IndexError, ValueError):
            return None
    return None


def check(
    url: str, max_age: float, *, timeout: float = TIMEOUT_S, now: float | None = None
) -> tuple[bool, str]:
    """``(healthy, one line)`` for the worker whose metrics ``url`` serves."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return False, f"no answer from {url} ({' '.join(str(reason).split())[:200]})"
    beat = heartbeat_value(text)
    if beat is None:
        return False, f"{url} serves no {HEARTBEAT} (not a certremove worker?)"
    if beat <= 0:
        return False, f"the worker at {url} has not started serving yet"
    age = max(0.0, (time.time() if now is None else now) - beat)
    if age > max_age:
        return False, (
            f"the worker's last heartbeat was {age:.1f} s ago (more than --max-age {max_age:g} s):"
            " it is wedged or stopped"
        )
    return True, f"ok: heartbeat {age:.1f} s ago ({url})"


def health(
    url: Annotated[
        str | None,
        typer.Option(help="Metrics URL (default: CERTREMOVE_METRICS_ADDR/PORT on this host)."),
    ] = None,
    max_age: Annotated[
        float, typer.Option("--max-age", help="Oldest heartbeat accepted, in seconds.")
    ] = DEFAULT_MAX_AGE,
) -> None:
    """Exit 0 when the worker's metrics answer and its heartbeat is fresh, else 1 with one line."""
    if not 0 < max_age < float("inf"):  # also refuses nan and inf (a stale beat would pass)
        print("error: --max-age must be a finite number of seconds > 0", file=sys.stderr)
        raise typer.Exit(2)
    ok, line = check(url or default_url(), max_age)
    if ok:
        print(line)
        return
    print(f"unhealthy: {line}", file=sys.stderr)
    raise typer.Exit(1)
