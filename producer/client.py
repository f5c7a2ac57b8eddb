"""Enqueue deletion requests and read their status (docs/design.md "Enqueue").

The producer writes each request's ``queued`` status and appends it to the model's Redis Stream
in one server-side script (status first, so a late ``queued`` can never overwrite ``applied``),
then rings the doorbell (``producer.doorbell.ring``). It imports neither torch nor ``core`` nor
``worker``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from producer import schema
from producer.doorbell import ring
from producer.urls import redact_url, split_tls_query, tls_options

CHUNK = 1000

# KEYS[1] stream, KEYS[1+k] status hash of request k; ARGV[1] requested_at, then
# (request_id, sample_ids JSON) pairs. HSETNX keeps a repeated request id from overwriting a
# final status; the entry is appended anyway and the worker answers it as a repeat.
_ENQUEUE_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local now = ARGV[1]
for k = 2, #KEYS do
  local rid = ARGV[2 * k - 2]
  if redis.call('HSETNX', KEYS[k], 'status', 'queued') == 1 then
    redis.call('HSET', KEYS[k], 'requested_at', now)
  end
  redis.call('XADD', KEYS[1], '*', 'request_id', rid, 'sample_ids', ARGV[2 * k - 1],
             'requested_at', now)
end
return #KEYS - 1
"""


def append_requests(
    client: redis.Redis,
    model: str,
    requests: Sequence[tuple[str, str]],
    requested_at: float | None = None,
) -> None:
    """Write ``queued`` statuses and append ``(request_id, sample_ids_json)`` entries in one
    server-side script (used by :class:`Client` and by the ``certremove.remove`` task)."""
    keys = [schema.stream_key(model)] + [schema.status_key(model, rid) for rid, _ in requests]
    args: list[Any] = [repr(time.time() if requested_at is None else requested_at)]
    for rid, ids_json in requests:
        args += [rid, ids_json]
    client.register_script(_ENQUEUE_LUA)(keys=keys, args=args)


def encode_sample_ids(ids: Any) -> str:
    """The ``sample_ids`` field of a stream entry: a JSON list. A list or tuple of plain ints
    (the common request) is written without the json module, as the same JSON a reader parses
    (the worker reads ``[17]`` without it too); any other list goes through ``json.dumps``, so
    the worker answers a mistyped id as it always did, and anything that is not a list or tuple
    (a task message's ``None``, string or dict) as ``json.dumps`` writes it, which the worker
    rejects as not a list.

    Raises:
        TypeError, ValueError: what ``json.dumps`` raises for a value that is not JSON.
    """
    if not isinstance(ids, list | tuple):
        return json.dumps(ids)
    if all(type(i) is int for i in ids):
        return "[" + ",".join(map(str, ids)) + "]"
    return json.dumps(list(ids))


def redis_py_url(url: str) -> str:
    """The redis-py spelling of a kombu broker URL (``redis+socket://PATH`` -> ``unix://PATH``)."""
    if url.startswith("redis+socket://"):
        url = "unix://" + url[len("redis+socket://") :]
        url = url.replace("virtual_host=", "db=")
    return url


def resolve_broker_url(broker_url: str | None) -> str:
    """``broker_url``, else ``$CERTREMOVE_BROKER_URL``, else the default local Redis."""
    return broker_url or os.environ.get("CERTREMOVE_BROKER_URL") or schema.DEFAULT_BROKER_URL


def resolve_tls_options(
    broker_url: str, ca_certs: str | Path | None = None, cert_reqs: str | None = None
) -> dict[str, Any]:
    """TLS options of a ``rediss://`` URL (``{}`` otherwise): the arguments, else
    ``$CERTREMOVE_REDIS_SSL_CA_CERTS`` and ``$CERTREMOVE_REDIS_SSL_CERT_REQS`` (the worker's
    variables), else the system CA store and ``required``.

    Raises:
        ValueError: the certificate requirement is not ``required``, ``optional`` or ``none``.
    """
    return tls_options(
        broker_url,
        ca_certs or os.environ.get("CERTREMOVE_REDIS_SSL_CA_CERTS") or None,
        cert_reqs or os.environ.get("CERTREMOVE_REDIS_SSL_CERT_REQS") or None,
    )


def new_request_id() -> str:
    """A fresh unique request id."""
    return uuid.uuid4().hex


class Client:
    """Enqueue deletions for one model and read their status.

    Args:
        broker_url: kombu-style Redis URL (``redis://``, ``rediss://`` for TLS,
            ``redis+socket://``); default ``$CERTREMOVE_BROKER_URL`` or
            ``redis://127.0.0.1:6379/0``. A password goes in the URL (``redis://:PW@host``);
            messages show it as ``***``.
        model: the model name, which selects the stream and the Celery queues.
        ssl_ca_certs: for ``rediss://``, the CA file of the server's certificate (default
            ``$CERTREMOVE_REDIS_SSL_CA_CERTS``, else the system CA store).
        ssl_cert_reqs: for ``rediss://``, ``required`` (default), ``optional`` or ``none``
            (default ``$CERTREMOVE_REDIS_SSL_CERT_REQS``).
    """

    def __init__(
        self,
        broker_url: str | None = None,
        model: str = schema.DEFAULT_MODEL,
        *,
        ssl_ca_certs: str | Path | None = None,
        ssl_cert_reqs: str | None = None,
    ) -> None:
        self.broker_url = resolve_broker_url(broker_url)
        self.model = schema.check_model_name(model)
        self.tls = resolve_tls_options(self.broker_url, ssl_ca_certs, ssl_cert_reqs)
        try:
            self.redis = redis.Redis.from_url(redis_py_url(self.broker_url), **self.tls)
        except ValueError as exc:
            # urllib's parse errors quote pieces of the URL (``Port could not be cast ... 'pw'``
            # for a password with a raw '#'): name the URL redacted, and the cause only when
            # nothing in the URL needed hiding. ``from None`` keeps it out of tracebacks too.
            safe = redact_url(self.broker_url)
            cause = f": {exc}" if safe == self.broker_url else " (percent-encode the password)"
            raise ValueError(f"invalid broker URL {safe}{cause}") from None
        self._celery: Celery | None = None

    def __repr__(self) -> str:
        return f"Client({redact_url(self.broker_url)!r}, model={self.model!r})"

    def close(self) -> None:
        """Release the connections."""
        self.redis.close()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def celery(self) -> Celery:
        """A minimal Celery app used only to send tasks by name (JSON serializer)."""
        if self._celery is None:
            # rediss://: kombu alone would not verify the server (CERT_NONE), and would take the
            # URL's ssl_* parameters instead of broker_use_ssl: it gets the merged options only.
            url = split_tls_query(self.broker_url)[0] if self.tls else self.broker_url
            self._celery = Celery("certremove-producer", broker=url)
            self._celery.conf.update(task_serializer="json", accept_content=["json"])
            if self.tls:
                self._celery.conf.broker_use_ssl = self.tls
        return self._celery

    def warm(self) -> None:
        """Set up the Celery app and open its broker connection now, so that the first ring
        does not pay for it (tens of milliseconds, during which a producer sending in chunks
        sends nothing). For long-lived clients and load tests; nothing else needs it."""
        with self.celery.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)

    def enqueue(self, sample_ids: Sequence[int | str], request_id: str | None = None) -> str:
        """Append one deletion request and ring the doorbell; return its request id."""
        rid = request_id or new_request_id()
        self._append([(rid, sample_ids)])
        self.ring()
        return rid

    def enqueue_many(
        self,
        list_of_id_lists: Iterable[Sequence[int | str]],
        request_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Append many requests in pipelined chunks, ring once per chunk; return their ids."""
        lists = list(list_of_id_lists)
        rids = list(request_ids) if request_ids is not None else [new_request_id() for _ in lists]
        if len(rids) != len(lists):
            raise ValueError("request_ids and list_of_id_lists differ in length")
        for start in range(0, len(lists), CHUNK):
            self._append(
                list(zip(rids[start : start + CHUNK], lists[start : start + CHUNK], strict=True))
            )
            self.ring()
        return rids

    def _append(self, requests: list[tuple[str, Sequence[int | str]]]) -> None:
        encoded = []
        for rid, ids in requests:
            if not isinstance(ids, list | tuple):
                raise TypeError(f"sample_ids must be a list of ids, got {type(ids).__name__}")
            encoded.append((rid, encode_sample_ids(ids)))
        try:
            append_requests(self.redis, self.model, encoded)
        except redis.RedisError as exc:
            raise ConnectionError(
                f"cannot enqueue on {redact_url(self.broker_url)}: {exc}"
            ) from exc

    def ring(self) -> bool:
        """Ring the doorbell: send ``certremove.drain`` unless a drain already holds it."""
        return ring(self.redis, self.model, self._send_task)

    def _send_task(self, name: str, queue: str) -> None:
        self.celery.send_task(name, queue=queue)

    def status(self, request_id: str) -> dict[str, Any]:
        """The status of one request (empty dict if unknown)."""
        return schema.decode_status(self.redis.hgetall(schema.status_key(self.model, request_id)))

    def statuses(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The statuses of many requests, read in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            pipe.hgetall(schema.status_key(self.model, rid))
        return {
            rid: schema.decode_status(raw)
            for rid, raw in zip(request_ids, pipe.execute(), strict=True)
        }

    def wait(
        self, request_ids: Sequence[str], timeout: float = 60.0, poll: float = 0.05
    ) -> dict[str, dict[str, Any]]:
        """Wait until every request is ``applied`` or ``rejected``, or ``timeout`` seconds pass.

        Returns the last statuses read; requests still ``queued`` at the timeout are included
        as they are, so callers check ``status`` themselves.
        """
        deadline = time.monotonic() + timeout
        result: dict[str, dict[str, Any]] = {}
        todo = list(request_ids)
        while True:
            for start in range(0, len(todo), 5000):
                result.update(self.statuses(todo[start : start + 5000]))
            todo = [r for r in todo if result[r].get("status") not in _FINAL]
            if not todo or time.monotonic() >= deadline:
                return {rid: result[rid] for rid in request_ids}
            time.sleep(poll)


_FINAL = {schema.STATUS_APPLIED, schema.STATUS_REJECTED}
