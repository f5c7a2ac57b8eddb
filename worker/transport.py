"""kombu's Redis transport, except that a malformed list item is logged and dropped.

kombu parses each item it pops from a queue list (``BRPOP`` in ``Channel._brpop_read``, ``RPOP``
in ``Channel._get``) with ``json.loads`` and hands it on as a message envelope; an item that is not
JSON, or JSON that is not an envelope, raises out of the worker's event loop and ends the worker
(Celery's "Unrecoverable error"). Anyone who can ``LPUSH`` onto ``certremove.{model}`` could stop
the service that way. :class:`Channel` checks the item first: anything that is not an envelope
kombu can deliver (and acknowledge, and restore) is dropped with one warning line carrying a short,
escaped excerpt. What the envelope carries (content type, task name, arguments) is checked one
layer up, by :mod:`worker.consumer`.

The two methods are kombu's own with the parsing replaced (kombu 5.7, which pyproject.toml requires;
the attribute look-ups that still allow for 5.5 and 5.6 are harmless). Its :class:`QoS` frees
a message's prefetch slot also when the acknowledgement fails in Redis (a hung or lost
connection), where kombu's would leave the consumer waiting forever. The consumer installs
:class:`Transport` on its connection (:func:`guard`) whatever the URL's scheme (``redis``,
``rediss``, ``redis+socket``).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu import Connection
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger("certremove.worker")

#: bytes of a dropped item shown in its warning (escaped, so the line stays short and printable)
EXCERPT_BYTES = 120
_EXCERPT_CHARS = 160


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return repr(value).encode("utf-8", "replace")


def printable(value: Any, limit: int = EXCERPT_BYTES) -> str:
    """At most ``limit`` bytes of ``value`` (bytes, str or anything else) as one printable ASCII
    line: control and non-ASCII characters escaped, ``...`` when cut."""
    raw = _as_bytes(value)
    text = ascii(raw[:limit].decode("utf-8", "replace"))[1:-1]
    cut = len(raw) > limit or len(text) > _EXCERPT_CHARS
    return text[:_EXCERPT_CHARS] + ("..." if cut else "")


def excerpt(raw: Any) -> str:
    """A short, safe excerpt of a message for a log line: its size and :func:`printable` text."""
    return f"{len(_as_bytes(raw))} bytes: '{printable(raw)}'"


def warn_dropped(where: str, reason: str, raw: Any) -> None:
    """Log one warning line for a malformed broker message that is dropped."""
    log.warning(
        "dropped a malformed broker message on %s: %s (%s)",
        where,
        reason,
        excerpt(raw),
    )


def envelope_problem(payload: Any, codecs: dict[str, Any]) -> str | None:
    """Why ``payload`` (a parsed list item) is not a message envelope kombu can deliver, acknowledge
    and restore, or None when it is one."""
    if not isinstance(payload, dict):
        return f"not a message envelope (a JSON {type(payload).__name__})"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "not a message envelope (no properties)"
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        return "no delivery tag"
    info = props.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "no delivery info"
    if not isinstance(payload.get("headers") or {}, dict):
        return "headers are not an object"
    for key in ("content-type", "content-encoding"):
        if not isinstance(payload.get(key) or "", str):
            return f"{key} is not a string"
    body, encoding = payload.get("body"), props.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return "the body is not a string"
    if encoding is not None and encoding not in codecs:
        return f"unknown body encoding '{printable(encoding, 40)}'"
    if body and encoding:
        try:
            codecs[encoding].decode(body)
        except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            return f"the body does not decode as {encoding} ({exc})"
    return None


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's Redis ack emulation, except that an acknowledgement or rejection that fails in
    Redis (a timeout, a lost connection) still frees the message's prefetch slot.

    kombu removes the tag from its unacked index in Redis first and only then forgets the
    message locally; when the Redis part raises, the message stays counted as delivered, and
    with a prefetch of 1 the consumer never takes another one: a worker that runs and beats but
    never drains again. Forgetting it locally is safe: the tag left in Redis's unacked index is
    restored by kombu after the visibility timeout, one more wake-up, and wake-ups carry nothing
    (the stream is the record, docs/design.md "Doorbell"). The error still goes on to Celery.
    """

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except BaseException:
            self._quick_ack(delivery_tag)  # kombu's local forget (virtual.QoS.ack)
            raise

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except BaseException:
            self._quick_ack(delivery_tag)
            raise


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel; a list item that is not a deliverable envelope is dropped, and an
    acknowledgement that fails in Redis frees its prefetch slot all the same (:class:`QoS`)."""

    QoS = QoS

    def _parse_item(self, item: Any, queue: str) -> Any:
        """The envelope in ``item``, or None (logged) when it is malformed."""
        try:
            payload = loads(bytes_to_str(item))
        except (ValueError, TypeError, KeyError) as exc:  # kombu's object hook may raise these
            warn_dropped(queue, f"not JSON ({type(exc).__name__}: {exc})", item)
            return None
        problem = envelope_problem(payload, self.codecs)
        if problem is not None:
            warn_dropped(queue, problem, item)
            return None
        return payload

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._parse_item(item, dest)
            if payload is None:
                raise kombu_redis.Empty()
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's own reset
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: Any = None) -> Any:
        expire = getattr(self, "_maybe_update_queues_expire", None)  # kombu >= 5.6
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                key = self._q_for_pri(queue, pri)
                while item := client.rpop(key):
                    payload = self._parse_item(item, queue)
                    if payload is not None:
                        if expire is not None:
                            expire(client, queue)
                        return payload
            if expire is not None:
                expire(client, queue)
            raise kombu_redis.Empty()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def guard(conn: Connection) -> Connection:
    """Make ``conn`` (not yet connected) use :class:`Transport` when it would use kombu's Redis
    transport; any other transport (e.g. Sentinel) is left as it is. Returns ``conn``."""
    if conn.get_transport_cls() is kombu_redis.Transport:
        conn.transport_cls = f"{__name__}.Transport"  # a name: what Celery logs as the scheme
    return conn
