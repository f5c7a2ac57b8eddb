"""Faults a real ``certremove worker`` process must survive, and the ones it must exit on.

- Malformed broker messages on the model's Celery queues (anyone who can ``LPUSH`` a list item)
  are logged with one warning line and dropped; the worker keeps serving.
- Fatal errors end the process with a non-zero status by class (README "Exit status") and one
  ``error:`` line, without a traceback and without the Redis password.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery

import core
from producer import Client, schema
from tests.integration.conftest import StartWorker, make_settings, run_to_exit
from tests.redis_servers import start_password_redis
from worker.launcher import free_port

pytestmark = pytest.mark.integration

DROPPED = "dropped a malformed broker message"


class _Unpickled:
    """Unpickling this creates ``path`` (the worker must refuse pickle without unpickling it)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.makedirs, (self.path,))


def _envelope(broker_url: str, task: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A real kombu envelope of ``task`` (sent by Celery to a scratch list, popped back)."""
    scratch = f"scratch.{time.monotonic_ns()}"
    app = Celery(broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        app.send_task(task, kwargs=kwargs or {}, queue=scratch)
    finally:
        app.close()
    client = redis.Redis.from_url(broker_url)
    try:
        raw = client.rpop(scratch)
    finally:
        client.close()
    assert isinstance(raw, bytes)
    return dict(json.loads(raw))


def _with_body(env: dict[str, Any], body: Any, *, raw: bytes | None = None) -> dict[str, Any]:
    out = copy.deepcopy(env)
    data = raw if raw is not None else json.dumps(body).encode()
    out["body"] = base64.b64encode(data).decode()
    return out


def malformed_items(broker_url: str, queue: str, marker: Path) -> list[tuple[str, bytes]]:
    """``(what, list item)`` of every kind of malformed message, addressed to ``queue``."""
    drain = _envelope(broker_url, schema.TASK_DRAIN)
    remove = _envelope(broker_url, schema.TASK_REMOVE, {"request_id": "r", "sample_ids": [1]})
    for env in (drain, remove):
        env["properties"]["delivery_info"]["routing_key"] = queue

    def edit(env: dict[str, Any], **changes: Any) -> dict[str, Any]:
        out = copy.deepcopy(env)
        for key, value in changes.items():
            *path, last = key.split("__")
            target = out
            for part in path:
                target = target[part]
            target[last.replace("_", "-") if last.startswith("content") else last] = value
        return out

    envelopes: list[tuple[str, Any]] = [
        ("bad base64 body", edit(drain, body="!!!not*base64")),
        (
            "pickle body",
            edit(
                _with_body(drain, None, raw=pickle.dumps(_Unpickled(marker))),
                content_type="application/x-python-serialize",
            ),
        ),
        ("JSON content type, body not JSON", _with_body(drain, None, raw=b"not json{")),
        ("unknown body encoding", edit(drain, properties__body_encoding="rot13")),
        ("unknown task", edit(drain, headers__task="certremove.nope")),
        ("task name not a string", edit(drain, headers__task=5)),
        ("no task id", edit(drain, headers__id=None)),
        ("no task header", edit(drain, headers={})),
        ("headers not an object", edit(drain, headers=[1])),
        ("no delivery tag", edit(drain, properties__delivery_tag=None)),
        ("body not [args, kwargs, embed]", _with_body(drain, "x")),
        ("body an object", _with_body(drain, {"args": 5})),
        ("drain with arguments", _with_body(drain, [[1, 2], {}, {}])),
        ("a callback", _with_body(drain, [[], {}, {"callbacks": [{"task": "x"}]}])),
        ("remove, unknown argument", _with_body(remove, [[], {"nope": 1}, {}])),
        ("remove, too many arguments", _with_body(remove, [[1, 2, 3, 4], {}, {}])),
        (
            "remove, request_id an object",
            _with_body(remove, [[], {"request_id": {"a": 1}, "sample_ids": [1]}, {}]),
        ),
        ("bad expires header", edit(drain, headers__expires="garbage")),
        ("bad timelimit header", edit(drain, headers__timelimit="garbage")),
    ]
    raw: list[tuple[str, bytes]] = [
        ("not JSON", b"garbage{"),
        ("not UTF-8", b"\xff\xfe\x00garbage"),
        ("a JSON list", b"[]"),
        ("a JSON object", b"{}"),
        ("a JSON string", b'"x"'),
        ("an object with a number body", b'{"body": 5}'),
        ("100 kB of junk", b"A" * 100_000),
    ]
    return raw + [(what, json.dumps(env).encode()) for what, env in envelopes]


def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(
    state: Path,
    tmp_path: Path,
    broker_url: str,
    model_name: str,
    start_worker_process: StartWorker,
) -> None:
    worker = start_worker_process(state, broker_url, model_name)
    client = Client(broker_url, model=model_name)
    marker = tmp_path / "unpickled"
    queues = [schema.retrain_queue_name(model_name), schema.queue_name(model_name)]
    sent = 0
    for queue in queues:
        items = malformed_items(broker_url, queue, marker)
        client.redis.lpush(queue, *[item for _, item in items])
        sent += len(items)

    rid = client.enqueue([5])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.status(rid).get("status") != "applied":
        assert worker.proc.poll() is None, worker.log_text()[-3000:]
        time.sleep(0.1)
    assert client.status(rid)["status"] == "applied"

    while time.monotonic() < deadline and worker.log_text().count(DROPPED) < sent:
        time.sleep(0.1)
    text = worker.log_text()
    assert worker.proc.poll() is None, text[-3000:]
    dropped = [line for line in text.splitlines() if DROPPED in line]
    assert len(dropped) == sent, "\n".join(dropped)
    assert all(len(line.encode()) < 600 for line in dropped)  # a short excerpt, never the item
    assert "AAAA" * 100 not in text and "Traceback" not in text and "Unrecoverable" not in text
    assert not marker.exists(), "the pickle body was unpickled"
    assert all(client.redis.llen(q) == 0 for q in queues)
    while time.monotonic() < deadline and client.redis.hlen("unacked"):
        time.sleep(0.1)
    assert client.redis.hlen("unacked") == 0  # dropped for good, never restored
    rid = client.enqueue([6])  # and it still serves
    assert client.wait([rid], timeout=30)[rid]["status"] == "applied"


# ---------------------------------------------------------------------------------- exit codes


def _one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert "Traceback" not in text and "Unrecoverable error" not in text, text[-3000:]
    return errors[0]


def test_no_model_exits_3(tmp_path: Path, broker_url: str, model_name: str) -> None:
    state = tmp_path / "empty"
    state.mkdir()
    code, text, _ = run_to_exit(make_settings(state, broker_url, model_name), tmp_path / "w.log")
    assert code == 3, text[-3000:]
    assert "no model" in _one_error_line(text)


def test_damaged_state_exits_3(
    state: Path, tmp_path: Path, broker_url: str, model_name: str
) -> None:
    current = state / (state / "CURRENT").read_text().strip()
    for path in current.iterdir():
        path.write_bytes(b"garbage")
    code, text, _ = run_to_exit(make_settings(state, broker_url, model_name), tmp_path / "w.log")
    assert code == 3, text[-3000:]
    assert str(state) in _one_error_line(text)


def test_a_journal_of_a_later_format_exits_3_before_serving(
    state: Path, tmp_path: Path, broker_url: str, model_name: str
) -> None:
    # a valid, checksummed snapshot whose journal a newer version wrote: refused whole (reading
    # part of it would lose the answers it holds), with the format named
    model = core.load_model(state, device="cpu")
    model.save(state, journal={"format": 99, "records": [{"s": "applied", "ids": ["r"]}]})
    code, text, _ = run_to_exit(make_settings(state, broker_url, model_name), tmp_path / "w.log")
    assert code == 3, text[-3000:]
    line = _one_error_line(text)
    assert "journal has format 99" in line and "newer certremove" in line, line


def test_unreachable_broker_exits_4_after_the_bounded_retries(
    state: Path, tmp_path: Path, model_name: str
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(state, url, model_name, broker_connect_timeout=1.0)
    code, text, took = run_to_exit(settings, tmp_path / "worker.log")
    assert code == 4, text[-3000:]
    assert "cannot reach Redis" in _one_error_line(text)
    assert "try 1 failed" in text and took < 45


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """``(port, password)`` of a private Redis with ``requirepass`` (skips without a binary)."""
    password = "s3cret-pw"
    server = start_password_redis(tmp_path / "redis", password)
    try:
        port = urlsplit(server.url).port
        assert port is not None
        yield port, password
    finally:
        server.stop()


@pytest.mark.parametrize("userinfo", [":wrong-password@", ""], ids=["wrong", "missing"])
def test_refused_credentials_exit_2_without_the_password(
    state: Path,
    tmp_path: Path,
    model_name: str,
    password_redis: tuple[int, str],
    userinfo: str,
) -> None:
    port, password = password_redis
    settings = make_settings(state, f"redis://{userinfo}127.0.0.1:{port}/0", model_name)
    code, text, took = run_to_exit(settings, tmp_path / "worker.log")
    assert code == 2, text[-3000:]
    assert "refused the credentials" in _one_error_line(text)
    assert "wrong-password" not in text and password not in text
    assert took < 45  # no retries: a wrong password does not fix itself
