"""The worker's TLS settings: parsed like the other variables, handed to redis-py and Celery."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from worker.app import create_app
from worker.settings import Settings, SettingsError


def test_tls_variables_parse_and_round_trip() -> None:
    env = {
        "CERTREMOVE_BROKER_URL": "rediss://:pw@redis.internal:6380/0",
        "CERTREMOVE_REDIS_SSL_CA_CERTS": "/etc/certremove/ca.pem",
        "CERTREMOVE_REDIS_SSL_CERT_REQS": "Optional",
    }
    s = Settings.from_env(env)
    assert (s.redis_ssl_ca_certs, s.redis_ssl_cert_reqs) == (
        Path("/etc/certremove/ca.pem"),
        "optional",
    )
    assert Settings.from_env(s.to_env()) == s
    assert s.tls_options() == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": "/etc/certremove/ca.pem",
    }
    assert Settings.from_env({}).redis_ssl_cert_reqs == "required"
    with pytest.raises(SettingsError, match="CERTREMOVE_REDIS_SSL_CERT_REQS"):
        Settings.from_env({"CERTREMOVE_REDIS_SSL_CERT_REQS": "sometimes"})


def test_plain_redis_urls_get_no_tls_options() -> None:
    s = Settings(broker_url="redis://h:6379/0", redis_ssl_ca_certs=Path("/ca.pem"))
    assert s.tls_options() == {}
    assert s.celery_broker_url() == "redis://h:6379/0"


def test_celery_gets_verified_tls_and_the_url_without_its_ssl_parameters() -> None:
    url = "rediss://:pw@h:6380/0?ssl_cert_reqs=required&ssl_certfile=/c.pem"
    settings = Settings(broker_url=url, model="tlsapp", redis_ssl_ca_certs=Path("/ca.pem"))
    app = create_app(settings)
    assert app.conf.broker_url == "rediss://:pw@h:6380/0"
    assert app.conf.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
    }
    plain = create_app(Settings(broker_url="redis://h:6379/0", model="plainapp"))
    assert not plain.conf.broker_use_ssl


def test_the_repr_hides_the_password() -> None:
    s = Settings(broker_url="redis://:hunter2@h:6379/0", model="m")
    assert "hunter2" not in repr(s) and "redis://:***@h:6379/0" in repr(s)
    assert "model='m'" in repr(s)
