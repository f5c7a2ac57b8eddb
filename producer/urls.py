"""Broker URLs: hide their credentials before they reach a message, and their TLS options.

A broker URL may carry the Redis password (``redis://:secret@host:6379/0``, ``?password=`` on a
unix socket). Every message, exception text and log line that names the broker goes through
:func:`redact_url`, so an error on a terminal or in a CI log never shows the secret.

``rediss://`` URLs need TLS options on two clients that default differently: redis-py verifies
the server certificate against the system CAs, while kombu (Celery's transport) falls back to
``CERT_NONE`` with only a warning when it gets no options. :func:`tls_options` gives both the same
verified settings. Kombu also takes a URL's ``ssl_*`` query parameters *instead of* its
``broker_use_ssl`` (not merged with it), so Celery gets the URL without them
(:func:`split_tls_query`) and one merged set of options.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Query parameters whose values are secrets (redis-py takes any connection argument there).
_SECRET_PARAMS = re.compile(r"(?i)([?&;](?:password|passwd|pwd|ssl_password)=)[^&]*")
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
    """The certificate requirement ``value`` names: ``required``, ``optional`` or ``none``
    (any case; kombu's spellings ``CERT_REQUIRED`` ... too).

    Raises:
        ValueError: any other value.
    """
    name = value.lower().removeprefix("cert_")
    if name not in CERT_REQS:
        raise ValueError(
            f"ssl cert requirement must be one of {', '.join(CERT_REQS)}, got {value!r}"
        )
    return name


def split_tls_query(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without the ``ssl_*`` parameters of its query string, and those parameters."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    kept, params = [], {}
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name.startswith("ssl_"):
            params[name] = unquote(value)
        elif part:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), params


def tls_options(
    url: str, ca_certs: str | Path | None = None, cert_reqs: str | None = None
) -> dict[str, Any]:
    """Connection options for a ``rediss://`` URL; ``{}`` for any other URL.

    The same dict is passed to ``redis.Redis.from_url(url, **options)`` and to Celery as
    ``broker_use_ssl`` (with the URL from :func:`split_tls_query`): ``ssl_cert_reqs`` (default
    ``required``, never kombu's silent ``CERT_NONE``), ``ssl_ca_certs`` when given (else the
    system CA store), and any other ``ssl_*`` parameter of the URL's query string
    (``ssl_certfile``, ``ssl_keyfile`` for a client certificate). A parameter in the URL wins
    over the arguments, as it does in redis-py.

    Raises:
        ValueError: the certificate requirement is not ``required``, ``optional`` or ``none``.
    """
    if not is_tls(url):
        return {}
    _, query = split_tls_query(url)
    reqs = query.pop("ssl_cert_reqs", None) or cert_reqs or "required"
    options: dict[str, Any] = {"ssl_cert_reqs": CERT_REQS[check_cert_reqs(reqs)]}
    ca = query.pop("ssl_ca_certs", None) or ca_certs
    if ca:
        options["ssl_ca_certs"] = str(ca)
    for name, value in query.items():
        options[name] = _QUERY_PARSERS.get(name, str)(value)
    return options


# redis-py's own parsers of these query parameters (the rest are strings).
_QUERY_PARSERS: dict[str, Callable[[str], Any]] = {
    "ssl_check_hostname": lambda v: v.lower() not in ("0", "false", "no", "off"),
    "ssl_min_version": int,
}
