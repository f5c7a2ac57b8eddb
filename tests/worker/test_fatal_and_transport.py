"""The pieces behind the worker's fault handling, without a process (see
tests/integration/test_worker_faults.py for the real worker)."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.exceptions import OperationalError
from kombu.transport.redis import Channel as KombuChannel

from worker import fatal
from worker.consumer import body_problem
from worker.errors import StateLockedError, StateMissingError
from worker.settings import Settings, SettingsError
from worker.transport import Transport, envelope_problem, excerpt, guard

CODECS = KombuChannel.codecs
SETTINGS = Settings(broker_url="redis://:hunter2@10.0.0.1:6380/3", state_dir=Path("/srv/state"))


def test_excerpt_is_short_printable_and_single_line() -> None:
    text = excerpt(b"\x1b[31mred\nline\xff" + b"A" * 10_000)
    assert text.startswith("10014 bytes: '") and text.isprintable() and text.isascii()
    assert len(text) < 200 and "\n" not in text and "..." in text
    assert excerpt("é") == "2 bytes: '\\xe9'"


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "x",
        5,
        {},
        {"body": 5},
        {"properties": {"delivery_tag": "t"}},
        {"properties": {"delivery_tag": "t", "delivery_info": {"exchange": ""}}},
    ],
)
def test_non_envelopes_are_refused(payload: object) -> None:
    assert envelope_problem(payload, CODECS) is not None


def _envelope(**props: object) -> dict[str, object]:
    info = {"exchange": "", "routing_key": "certremove.m"}
    properties = {"delivery_tag": "t", "delivery_info": info, "body_encoding": "base64", **props}
    return {
        "body": "W10=",
        "headers": {},
        "content-type": "application/json",
        "properties": properties,
    }


def test_an_envelope_passes_and_a_bad_body_encoding_does_not() -> None:
    assert envelope_problem(_envelope(), CODECS) is None
    assert "base64" in str(envelope_problem({**_envelope(), "body": "!!!not*b64"}, CODECS))
    assert "rot13" in str(envelope_problem(_envelope(body_encoding="rot13"), CODECS))


def test_body_problem_checks_shape_arguments_and_callbacks() -> None:
    def remove(request_id: str | None = None, sample_ids: object = None) -> None: ...

    assert body_problem([[], {"request_id": "a", "sample_ids": [1]}, {}], remove) is None
    assert body_problem([[], {}, None], remove) is None
    bad_bodies: list[object] = ["x", {"args": 1}, [[], {}], [5, {}, {}], [[], [], {}]]
    for bad in bad_bodies:
        assert body_problem(bad, remove) is not None
    assert "fit" in str(body_problem([[1, 2, 3], {}, {}], remove))
    assert "fit" in str(body_problem([[], {"nope": 1}, {}], remove))
    assert "callbacks" in str(body_problem([[], {}, {"callbacks": [{"task": "x"}]}], remove))


def test_guard_swaps_in_the_transport_whatever_the_scheme() -> None:
    for url in ("redis://h:1/0", "rediss://h:1/0", "redis+socket:///tmp/r.sock"):
        assert guard(Connection(url)).get_transport_cls() is Transport
    memory = guard(Connection("memory://"))
    assert memory.get_transport_cls() is not Transport


@pytest.mark.parametrize(
    "exc,code,words",
    [
        (redis.AuthenticationError("invalid username-password pair"), 2, "credentials"),
        (OperationalError("WRONGPASS invalid username-password pair"), 2, "credentials"),
        (SettingsError("CERTREMOVE_X is bad"), 2, "CERTREMOVE_X"),
        (StateMissingError("no model in /srv/state: run it"), 3, "no model"),
        (StateLockedError("another worker (pid 7) already serves /srv/state"), 3, "pid 7"),
        (OperationalError("Error 111 connecting to 10.0.0.1:6380."), 4, "cannot reach Redis"),
        (redis.ConnectionError("Error 111"), 4, "cannot reach Redis"),
        (OSError(errno.EADDRINUSE, "Address already in use"), 4, "127.0.0.1:9820"),
        (PermissionError(errno.EACCES, "denied", "/srv/state/x"), 3, "/srv/state"),
        (KeyError("boom"), 1, "KeyError"),
    ],
)
def test_classify(exc: BaseException, code: int, words: str) -> None:
    got, message = fatal.classify(exc, SETTINGS)
    assert got == code and words in message and "\n" not in message


def test_fatal_masks_the_broker_password() -> None:
    error = fatal.fatal(4, "failed on redis://:hunter2@10.0.0.1:6380/3", SETTINGS)
    assert isinstance(error, SystemExit) and error.code == 4
    assert "hunter2" not in error.message and fatal.last() is error
    _, message = fatal.classify(redis.AuthenticationError("x"), SETTINGS)
    assert "hunter2" not in message and "10.0.0.1:6380" in message


class _HungPipe:
    def execute(self) -> None:
        raise redis.TimeoutError("Timeout reading from socket")


@pytest.mark.parametrize("how", ["ack", "reject", "requeue"])
def test_a_failed_acknowledgement_still_frees_the_prefetch_slot(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.transport import redis as kombu_redis

    from worker.transport import QoS

    def hung(self: Any, *args: Any, **kwargs: Any) -> _HungPipe:
        return _HungPipe()

    def run(cls: Any) -> bool:
        qos = cls(channel=SimpleNamespace(do_restore=False), prefetch_count=1)
        qos._quick_append("tag-1", object())  # delivered, as kombu's append leaves it
        assert not qos.can_consume()
        monkeypatch.setattr(cls, "_remove_from_indices", hung)
        monkeypatch.setattr(cls, "restore_by_tag", lambda *a, **k: _HungPipe().execute())
        with pytest.raises(redis.TimeoutError):
            if how == "ack":
                qos.ack("tag-1")
            else:
                qos.reject("tag-1", requeue=how == "requeue")
        qos._flush()
        return bool(qos.can_consume())

    assert run(QoS)  # the slot is free: the consumer takes the next wake-up
    assert not run(kombu_redis.QoS)  # kombu's own keeps it (the defect this guards against)
