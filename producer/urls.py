"""Broker URLs: hide their credentials before they reach a message, and their TLS options.

A broker URL may carry the Redis password (``redis://:secret@host:6379/0``, ``?password=`` on a
unix socket). Every message, exception text and log line that names the broker goes through
:func:`redact_url`, so an error on a terminal or in a CI log never shows the secret.

``rediss://`` URLs need TLS options on two clients that default differently: redis-py verifies
the server certificate against the system CAs, while kombu (Celery's transport) falls back to
``CERT_NONE`` with only a warning when it gets no options. :func:`tls_options` gives both the same
verified settings.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

MASK = "***"

# Query parameters whose values are secrets (redis-py takes any connection argument there).
_SECRET_PARAMS = re.compile(r"(?i)([?&;](?:password|passwd|pwd)=)[^&]*")
# An authority without userinfo: nothing (a socket path), or a host and maybe a numeric port.
_HOST_PORT = re.compile(r"^(?:|(?:\[[0-9A-Fa-f:.]*\]|[^:@\[\]]+)(?::\d*)?)$")

CERT_REQS: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}


def redact_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` (the username, host and path stay).

    ``redis://:pw@h:6379/0`` -> ``redis://:***@h:6379/0``, ``rediss://user:pw@h`` ->
    ``rediss://user:***@h``, ``unix://:pw@/run/r.sock`` -> ``unix://:***@/run/r.sock`` and
    ``unix:///run/r.sock?db=1&password=pw`` -> ``...&password=***``. The userinfo is found as
    redis-py and kombu find it (the authority ends at the first ``/``, ``?`` or ``#``; the userinfo
    at its last ``@``), so a password they would send is a password this hides. A password with a
    raw ``/``, ``?`` or ``#`` (not percent-encoded) breaks that parse, and the error that follows
    must not show it either: such a URL is masked up to its last ``@`` (which also masks a socket
    path with an ``@`` in it; too much hidden beats a leak). Several URLs joined by ``;``
    (Celery's failover list) are redacted one by one.
    """
    if ";" in url and "://" in url.split(";", 1)[1]:
        return ";".join(redact_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{MASK}@{host}" if colon else f"{user}@{host}"
    elif "@" in tail and (
        not _HOST_PORT.match(authority) or "@" in re.split(r"[?#]", tail, maxsplit=1)[0]
    ):
        cut = rest.rfind("@")
        authority, tail = f"{MASK}{rest[cut:]}", ""
    tail = _SECRET_PARAMS.sub(lambda m: m.group(1) + MASK, tail)
    authority = _SECRET_PARAMS.sub(lambda m: m.group(1) + MASK, authority)
    return f"{scheme}{sep}{authority}{tail}"


def is_tls(url: str) -> bool:
    """True for a ``rediss://`` URL (Redis over TLS)."""
    return url.lower().startswith("rediss://")


def check_cert_reqs(value: str) -> str:
    """``value`` if it names a certificate requirement (``required``, ``optional``, ``none``).

    Raises:
        ValueError: any other value.
    """
    if value.lower() not in CERT_REQS:
        raise ValueError(
            f"ssl cert requirement must be one of {', '.join(CERT_REQS)}, got {value!r}"
        )
    return value.lower()


def tls_options(
    url: str, ca_certs: str | Path | None = None, cert_reqs: str | None = None
) -> dict[str, Any]:
    """Connection options for a ``rediss://`` URL; ``{}`` for any other URL.

    The same dict is passed to ``redis.Redis.from_url(url, **options)`` and to Celery as
    ``broker_use_ssl``: ``ssl_cert_reqs`` (default ``required``, never kombu's silent
    ``CERT_NONE``) and ``ssl_ca_certs`` when given (else the system CA store). ``ssl_*``
    parameters in the URL's query string still win in both clients.

    Raises:
        ValueError: ``cert_reqs`` is not ``required``, ``optional`` or ``none``.
    """
    if not is_tls(url):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": CERT_REQS[check_cert_reqs(cert_reqs or "required")]}
    if ca_certs:
        options["ssl_ca_certs"] = str(ca_certs)
    return options
