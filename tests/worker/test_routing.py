"""producer.routing: what a Celery client needs, without torch or the worker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from producer import routing
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
