"""A Redis password never reaches a message, and the producer works over ``rediss://``.

Each server here is the test module's own (tests/redis_servers.py), never the Redis on 6379.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import Client, schema
from tests.redis_servers import make_client_cert, start_password_redis, start_tls_redis
from worker.embedded_redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret"
WRONG = "n0tTh1s"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m worker.cli ARGS`` as a user runs it (its own process, real stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_password_redis(tmp_path_factory.mktemp("auth"), PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_tls_redis(tmp_path_factory.mktemp("tls"), password=PASSWORD)
    yield server
    server.stop()


def test_the_cli_with_a_wrong_or_no_password_fails_in_one_line_without_it(
    password_redis: RedisServer, model_name: str
) -> None:
    assert f":{PASSWORD}@" in password_redis.url
    wrong = password_redis.url.replace(PASSWORD, WRONG)
    none = password_redis.url.replace(f":{PASSWORD}@", "")
    for url, reason in ((wrong, "refused the credentials"), (none, "needs a password")):
        out = cli("status", "some-id", "--model", model_name, "--broker-url", url)
        text = out.stdout + out.stderr
        assert out.returncode == 2, text
        assert PASSWORD not in text and WRONG not in text
        (line,) = text.strip().splitlines()
        assert line.startswith("error:") and reason in line, line
    assert ":***@127.0.0.1:" in cli("enqueue", "1", "--broker-url", wrong).stderr
    assert redis.Redis.from_url(password_redis.url).ping()  # the server itself is fine


def test_the_cli_with_the_right_password_works_and_never_prints_it(
    password_redis: RedisServer, model_name: str
) -> None:
    common = ["--model", model_name, "--broker-url", password_redis.url, "--json"]
    out = cli("enqueue", "7", *common)
    assert out.returncode == 0, out.stderr
    rid = out.stdout.strip().split('"')[-2]
    status = cli("status", rid, *common)
    assert status.returncode == 0 and '"status": "queued"' in status.stdout, status.stderr
    for run in (out, status):
        assert PASSWORD not in run.stdout + run.stderr


def test_client_messages_name_the_url_redacted(
    password_redis: RedisServer, model_name: str
) -> None:
    wrong = password_redis.url.replace(PASSWORD, WRONG)
    with Client(wrong, model=model_name) as client:
        assert WRONG not in repr(client)
        with pytest.raises(ConnectionError) as err:
            client.enqueue([1])
    assert WRONG not in str(err.value) and ":***@" in str(err.value)
    # A raw '#' makes the URL unparsable; urllib's own message would quote a piece of it.
    with pytest.raises(ValueError, match="percent-encode") as bad:
        Client("redis://:pq#zx@127.0.0.1:1/0", model=model_name)
    assert "pq" not in str(bad.value) and "zx" not in str(bad.value)


def test_the_producer_enqueues_and_reads_status_over_tls(
    tls_redis: RedisServer, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_redis.url.startswith("rediss://")
    ca = tls_redis.client_options["ssl_ca_certs"]
    with Client(tls_redis.url, model=model_name, ssl_ca_certs=ca) as client:
        rid = client.enqueue([1, 2])
        assert client.status(rid)["status"] == "queued"
        # the doorbell's drain message went through kombu, over TLS as well
        assert client.redis.llen(schema.queue_name(model_name)) == 1
    # ssl_* in the URL (Celery's documented form) and the CA as an argument: both clients get
    # both (kombu alone would take the URL's set and drop the CA). A database of its own: kombu
    # pools producers per process by URL, not by TLS options.
    query_url = tls_redis.url.rsplit("/", 1)[0] + "/3?ssl_cert_reqs=required"
    with Client(query_url, model=model_name, ssl_ca_certs=ca) as client:
        client.enqueue([5])
        assert client.redis.llen(schema.queue_name(model_name)) == 1
    # the worker's variables configure the producer too (here: the CLI)
    out = cli(
        "enqueue", "3", "--model", model_name, "--broker-url", tls_redis.url,
        env={"CERTREMOVE_REDIS_SSL_CA_CERTS": ca},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr


def test_tls_verifies_the_server_certificate_in_both_clients(
    tls_redis: RedisServer, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the CA the server's certificate does not verify: redis-py refuses, and so does
    kombu (left alone it would connect with CERT_NONE)."""
    monkeypatch.delenv("CERTREMOVE_REDIS_SSL_CA_CERTS", raising=False)
    monkeypatch.delenv("CERTREMOVE_REDIS_SSL_CERT_REQS", raising=False)
    # kombu pools producers per process by URL, not by TLS options: a database of its own keeps
    # each client here off a pool another one opened with other options.
    base = tls_redis.url.rsplit("/", 1)[0]
    with Client(f"{base}/7", model=model_name) as client:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            client.redis.ping()
        with pytest.raises(Exception, match="certificate verify failed"):
            client.celery.send_task(
                schema.TASK_DRAIN, queue=schema.queue_name(model_name), retry=False
            )
    # an explicit "none" is the operator's choice (a test network, say), and it is honoured
    with Client(f"{base}/8", model=model_name, ssl_cert_reqs="none") as client:
        assert client.status(client.enqueue([4]))["status"] == "queued"
        assert client.redis.llen(schema.queue_name(model_name)) == 1  # kombu connected too


def test_a_client_certificate_from_the_query_string_reaches_both_clients(
    tls_redis: RedisServer, model_name: str
) -> None:
    """A server that asks for client certificates: ``ssl_certfile`` / ``ssl_keyfile`` in the URL
    get redis-py and kombu through, merged with the CA given apart."""
    ca = Path(tls_redis.client_options["ssl_ca_certs"])
    cert, key = make_client_cert(ca)
    admin = redis.Redis.from_url(tls_redis.url, ssl_ca_certs=str(ca))
    admin.config_set("tls-auth-clients", "yes")
    try:
        base = tls_redis.url.rsplit("/", 1)[0]
        with Client(f"{base}/4", model=model_name, ssl_ca_certs=ca) as client:
            with pytest.raises(redis.ConnectionError):
                client.redis.ping()  # no certificate: refused
        url = f"{base}/5?ssl_certfile={cert}&ssl_keyfile={key}"
        with Client(url, model=model_name, ssl_ca_certs=ca) as client:
            client.enqueue([6])
            assert client.redis.llen(schema.queue_name(model_name)) == 1  # kombu's message
    finally:
        admin.config_set("tls-auth-clients", "no")
        admin.close()
