"""The worker over ``rediss://`` with a password: its redis-py client and Celery both verify the
server with the configured CA, and the password appears nowhere in its log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery

from producer import Client, schema
from producer.urls import tls_options
from tests.integration.conftest import StartWorker
from tests.redis_servers import start_tls_redis

pytestmark = pytest.mark.integration

PASSWORD = "s3cret"


def test_worker_serves_over_tls_with_a_password_and_never_logs_it(
    state: Path, tmp_path: Path, model_name: str, start_worker_process: StartWorker
) -> None:
    server = start_tls_redis(tmp_path / "redis", password=PASSWORD)
    try:
        ca = Path(server.client_options["ssl_ca_certs"])
        worker = start_worker_process(state, server.url, model_name, redis_ssl_ca_certs=ca)
        with Client(server.url, model=model_name, ssl_ca_certs=ca) as client:
            rids = client.enqueue_many([[i] for i in range(20)])
            st = client.wait(rids, timeout=60)
            assert {s["status"] for s in st.values()} == {"applied"}
            # A request that only Celery carries (no stream entry from a producer): applied,
            # so the worker's kombu consumer reads over TLS too.
            plain = Celery(broker=server.url)
            plain.conf.update(task_serializer="json", accept_content=["json"])
            plain.conf.broker_use_ssl = tls_options(server.url, ca)
            plain.send_task(
                schema.TASK_REMOVE,
                kwargs={"request_id": "celery-1", "sample_ids": [100], "requested_at": time.time()},
                queue=schema.queue_name(model_name),
            )
            plain.close()
            assert client.wait(["celery-1"], timeout=30)["celery-1"]["status"] == "applied"
        worker.stop()
        log = worker.log_text()
        assert "rediss://" in log  # Celery's banner names the broker, redacted
        assert PASSWORD not in log
    finally:
        server.stop()
