from __future__ import annotations

import re
import ssl

import pytest

from producer.urls import redact_url, split_tls_query, tls_options


@pytest.mark.parametrize(
    "url,expected",
    [
        # no credentials: unchanged
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis+socket:///tmp/r.sock?virtual_host=3", "redis+socket:///tmp/r.sock?virtual_host=3"),
        ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("redis://h:6380/0?ssl_ca_certs=/a@b.pem", "redis://h:6380/0?ssl_ca_certs=/a@b.pem"),
        ("", ""),
        # a password, with or without a username (the username stays)
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:secret@host:6380/2", "rediss://alice:***@host:6380/2"),
        ("redis://alice@host/1", "redis://alice@host/1"),
        ("redis://alice:@host", "redis://alice:***@host"),
        ("redis://:x@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis+socket://:secret@/tmp/r.sock", "redis+socket://:***@/tmp/r.sock"),
        ("unix://:secret@/tmp/r.sock?db=1", "unix://:***@/tmp/r.sock?db=1"),
        # percent-encoded and raw '@' in the password (clients split at the last '@')
        ("redis://:p%40ss%2Fw@host", "redis://:***@host"),
        ("redis://:p@ss@host:1/0", "redis://:***@host:1/0"),
        # query-string passwords (redis-py takes any connection argument there)
        ("unix:///tmp/r.sock?db=1&password=secret&x=1", "unix:///tmp/r.sock?db=1&password=***&x=1"),
        ("redis://h/0?PASSWORD=secret", "redis://h/0?PASSWORD=***"),
        (
            "rediss://h/0?ssl_keyfile=/k.pem&ssl_password=secret",
            "rediss://h/0?ssl_keyfile=/k.pem&ssl_password=***",
        ),
        # a raw '#', '/' or '?' in the password breaks the parse: mask up to the last '@'
        ("redis://:p#ss@host:6379", "redis://***@host:6379"),
        ("redis://:p/ss@host/0", "redis://***@host/0"),
        ("redis://:12/34@host", "redis://***@host"),
        ("redis://:12?34@host", "redis://***@host"),
        ("rediss://user:a?b@host/0", "rediss://***@host/0"),
        # Celery's failover list
        ("redis://:a@h1:1/0;redis://:b@h2:1/0", "redis://:***@h1:1/0;redis://:***@h2:1/0"),
        ("redis://:a;b@h", "redis://:***@h"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize("secret", ["sekrit", "pq#zx", "ab/yz", "xq?yz", "s@kzt", "ab;yz", "12/34"])
@pytest.mark.parametrize(
    "template",
    [
        "redis://:{}@host:6379/0",
        "rediss://user:{}@host:6380/1",
        "unix://:{}@/run/redis.sock",
        "unix:///run/redis.sock?password={}",
    ],
)
def test_no_piece_of_a_password_survives(template: str, secret: str) -> None:
    shown = redact_url(template.format(secret))
    assert not [p for p in re.split(r"[#/?@;]", secret) if len(p) > 1 and p in shown], shown


def test_tls_options_only_for_rediss() -> None:
    assert tls_options("redis://h:6379/0", "/ca.pem", "none") == {}
    assert tls_options("redis+socket:///tmp/r.sock") == {}
    assert tls_options("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options("REDISS://h:6380/0", "/ca.pem", "Optional") == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": "/ca.pem",
    }
    with pytest.raises(ValueError, match="required, optional, none"):
        tls_options("rediss://h/0", cert_reqs="maybe")


def test_the_urls_ssl_parameters_join_the_options_and_win() -> None:
    """Kombu would take the query's ssl_* set instead of broker_use_ssl: Celery gets the URL
    without them and one merged set, the same redis-py gets."""
    url = "rediss://:pw@h:6380/0?ssl_cert_reqs=CERT_OPTIONAL&x=1&ssl_certfile=/c.pem"
    assert split_tls_query(url) == (
        "rediss://:pw@h:6380/0?x=1",
        {"ssl_cert_reqs": "CERT_OPTIONAL", "ssl_certfile": "/c.pem"},
    )
    assert split_tls_query("rediss://h/0?ssl_ca_certs=%2Fca.pem") == (
        "rediss://h/0",
        {"ssl_ca_certs": "/ca.pem"},
    )
    assert split_tls_query("redis://h/0") == ("redis://h/0", {})
    assert tls_options(url, "/ca.pem", "required") == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,  # the URL's
        "ssl_ca_certs": "/ca.pem",  # the argument (the URL has none)
        "ssl_certfile": "/c.pem",
    }
    assert tls_options("rediss://h/0?ssl_ca_certs=/u.pem&ssl_check_hostname=false", "/ca.pem") == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/u.pem",
        "ssl_check_hostname": False,
    }
