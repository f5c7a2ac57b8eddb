"""producer.routing: what a Celery client needs, without torch or the worker."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from producer import routing, schema
from worker.app import create_app
from worker.settings import Settings


def test_routes_and_config() -> None:
    routes = routing.task_routes("digits")
    assert routes == {
        "certremove.remove": {"queue": "certremove.digits"},
        "certremove.drain": {"queue": "certremove.digits"},
        "certremove.retrain": {"queue": "certremove.digits.retrain"},
    }
    conf = routing.celery_config("digits")
    assert conf["task_routes"] == routes and conf["accept_content"] == ["json"]
    assert conf["task_ignore_result"] is True
    with pytest.raises(ValueError):
        routing.queue("bad name")


def test_the_worker_app_uses_the_same_routes() -> None:
    app = create_app(Settings(model="digits", broker_url="redis://127.0.0.1:1/0"))
    assert app.conf.task_routes == routing.task_routes("digits")
    assert set(routing.TASK_KWARGS) <= set(app.tasks)


def test_importing_the_celery_app_and_routing_loads_no_torch() -> None:
    code = (
        "import sys, producer.routing, worker.app; "
        "bad = [m for m in ('torch', 'core', 'numpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(("given", "expected"), [(0, "0"), ("r-1", "r-1"), (None, None)])
def test_a_falsy_request_id_is_still_the_request_id(
    monkeypatch: pytest.MonkeyPatch,
    rclient: redis.Redis,
    broker_url: str,
    model_name: str,
    given: object,
    expected: str | None,
) -> None:
    # request_id=0 is a valid (integer) request id: the sender reads its status under "0", so
    # the task id must not replace it (only a missing request id does).
    from types import SimpleNamespace

    import worker.runtime

    rung: list[bool] = []
    service = SimpleNamespace(
        stream=SimpleNamespace(redis=rclient),
        doorbell=SimpleNamespace(ring=lambda: rung.append(True)),
    )
    monkeypatch.setattr(
        worker.runtime, "build_runtime", lambda *a, **k: SimpleNamespace(service=service)
    )
    app = create_app(Settings(model=model_name, broker_url=broker_url))
    result = app.tasks[routing.TASK_REMOVE].apply(
        kwargs={"request_id": given, "sample_ids": [1]}, task_id="task-id-1"
    )
    rid = result.get()
    assert rid == (expected or "task-id-1") and rung == [True]
    (entry,) = rclient.xrange(schema.stream_key(model_name))
    assert entry[1][b"request_id"].decode() == rid
