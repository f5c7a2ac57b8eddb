from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from kombu.transport import redis as kombu_redis

from worker.app import create_app
from worker.settings import Settings, SettingsError


def test_defaults_from_empty_env() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.model == "default"
    assert s.metrics_port == 9820
    assert s.metrics_addr == "127.0.0.1"
    assert s.max_batch == 8192
    assert 0.5 <= s.slice_seconds <= 1.0
    assert 10 <= s.drain_interval <= 30
    assert s.device is None
    assert s.consumer.startswith("default@")


def test_reads_every_variable() -> None:
    env = {
        "CERTREMOVE_BROKER_URL": "redis://h:1/3",
        "CERTREMOVE_MODEL": "mnist",
        "CERTREMOVE_STATE_DIR": "/x/y",
        "CERTREMOVE_METRICS_PORT": "0",
        "CERTREMOVE_DEVICE": "cpu",
        "CERTREMOVE_MAX_BATCH": "64",
        "CERTREMOVE_SLICE_SECONDS": "0.25",
        "CERTREMOVE_DRAIN_INTERVAL": "2",
        "CERTREMOVE_CONSUMER": "c1",
        "CERTREMOVE_MAX_FAILURES": "3",
        "CERTREMOVE_STATUS_TTL": "60",
    }
    s = Settings.from_env(env)
    assert (s.broker_url, s.model, s.state_dir, s.metrics_port) == (
        "redis://h:1/3",
        "mnist",
        Path("/x/y"),
        0,
    )
    assert (s.device, s.max_batch, s.slice_seconds, s.drain_interval) == ("cpu", 64, 0.25, 2.0)
    assert (s.consumer, s.max_failures, s.status_ttl) == ("c1", 3, 60)
    assert Settings.from_env(s.to_env()) == s


def test_overrides_win_and_none_is_ignored() -> None:
    s = Settings.from_env({"CERTREMOVE_MODEL": "a"}, model="b", device=None)
    assert s.model == "b"


@pytest.mark.parametrize(
    "var,value",
    [
        ("METRICS_PORT", "abc"),
        ("METRICS_PORT", "70000"),
        ("DEVICE", "tpu"),
        ("MODEL", "bad name!"),
        ("MAX_BATCH", "0"),
        ("DRAIN_INTERVAL", "120"),
        ("HESSIAN", "float16"),
    ],
)
def test_bad_values_raise(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match="CERTREMOVE|model|positive"):
        Settings.from_env({f"CERTREMOVE_{var}": value})


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.model = "x"  # type: ignore[misc]


def test_redis_timeout_parses_and_round_trips() -> None:
    assert Settings.from_env({}).redis_timeout == 15.0
    s = Settings.from_env({"CERTREMOVE_REDIS_TIMEOUT": "2.5", "CERTREMOVE_LEASE_TTL_MS": "5000"})
    assert s.redis_timeout == 2.5
    assert s.to_env()["CERTREMOVE_REDIS_TIMEOUT"] == "2.5"
    assert Settings.from_env(s.to_env()) == s
    assert Settings(redis_timeout=0.25).redis_timeout == 0.25  # under kombu's 1 s BRPOP: safe


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "nan", "inf", "-inf", "1e400", "abc"])
def test_bad_redis_timeouts_raise(value: str) -> None:
    with pytest.raises(SettingsError, match="CERTREMOVE_REDIS_TIMEOUT"):
        Settings.from_env({"CERTREMOVE_REDIS_TIMEOUT": value})


def test_redis_timeout_is_at_most_half_the_lease() -> None:
    assert Settings(lease_ttl_ms=5000, redis_timeout=2.5).redis_timeout == 2.5
    # unset, it follows a short lease instead of refusing a configuration that worked before
    assert Settings(lease_ttl_ms=5000).redis_timeout == 2.5
    assert Settings.from_env({"CERTREMOVE_LEASE_TTL_MS": "8000"}).redis_timeout == 4.0
    assert Settings(lease_ttl_ms=60_000).redis_timeout == 15.0
    with pytest.raises(SettingsError, match="at most half of CERTREMOVE_LEASE_TTL_MS"):
        Settings(lease_ttl_ms=5000, redis_timeout=2.6)
    # a timeout set explicitly is checked against the lease, wherever it comes from
    with pytest.raises(SettingsError, match="CERTREMOVE_REDIS_TIMEOUT"):
        Settings.from_env({"CERTREMOVE_LEASE_TTL_MS": "20000", "CERTREMOVE_REDIS_TIMEOUT": "15"})


def test_the_redis_timeout_reaches_celerys_broker_connections() -> None:
    settings = Settings(model="timeouts", broker_url="redis://127.0.0.1:1/0", redis_timeout=4.0)
    options = create_app(settings).conf.broker_transport_options
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 4.0
    assert options["health_check_interval"] == 4.0
    assert options["visibility_timeout"] == 600 and options["queue_order_strategy"] == "priority"
    # the names kombu's Redis channel takes from the transport options
    assert {"socket_timeout", "socket_connect_timeout", "health_check_interval"} <= set(
        kombu_redis.Channel.from_transport_options
    )


def test_hessian_reaches_the_served_model(tmp_path: Path) -> None:
    """``CERTREMOVE_HESSIAN`` picks the direct solver's Hessian of the model the worker loads
    (``worker.runtime.load_model``), and round-trips through the environment."""
    from worker.cli import train_model  # noqa: PLC0415
    from worker.runtime import load_model  # noqa: PLC0415

    train_model("digits", tmp_path / "s", overwrite=True, device="cpu")
    s = Settings.from_env({"CERTREMOVE_HESSIAN": "bfloat16"}, state_dir=tmp_path / "s")
    assert s.hessian == "bfloat16" and Settings.from_env(s.to_env()) == s
    assert load_model(s).solve_options.hessian == "bfloat16"
    assert load_model(Settings(state_dir=tmp_path / "s")).solve_options.hessian == "float32"


def test_the_hessian_names_are_cores() -> None:
    """The settings check ``CERTREMOVE_HESSIAN`` against a copy of core's names (so that reading
    them needs no torch): the copy must not drift."""
    from core.solvers import HESSIANS  # noqa: PLC0415
    from worker.settings import HESSIANS as NAMES  # noqa: PLC0415

    assert NAMES == tuple(HESSIANS)
