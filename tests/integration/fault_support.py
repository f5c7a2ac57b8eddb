"""Helpers of the fault tests (``test_fault_storm.py``, ``test_redis_hang.py``): a Redis of the
test's own that can be stopped and started again on the same port with the same data, a proxy
that can make Redis stop answering without closing a connection, a restartable worker process,
mounts, and the independent end-of-test check of the service's promises.

Nothing here trusts the worker's own account: the final check reads the statuses from Redis, the
persisted model with ``core.load_model`` and the ledger file with ``worker.ledger.read_records``.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import core
from producer import Client, schema
from tests.integration.conftest import make_settings
from worker.embedded_redis import RedisServer, start_redis
from worker.launcher import free_port, metrics_text, start_worker, stop_worker, wait_ready
from worker.ledger import read_records
from worker.settings import Settings

FINAL = (schema.STATUS_APPLIED, schema.STATUS_REJECTED)


# ----------------------------------------------------------------------------- redis
class OwnRedis:
    """A ``redis-server`` of one test: AOF with ``appendfsync always``, no RDB, in ``directory``
    (started by ``worker.embedded_redis.start_redis``, as every private Redis of the tests).

    :meth:`stop` (SIGTERM) and :meth:`start` again keep the port and the data.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = (
            "/usr/bin/redis-server"
            if os.path.exists("/usr/bin/redis-server")
            else shutil.which("redis-server") or "redis-server"
        )
        self.port = 0
        self.server: RedisServer | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0)

    def start(self) -> None:
        """Start it (on a free port the first time, on the same port afterwards)."""
        for _attempt in range(3):
            if not self.starts or self.port == 0:
                self.port = free_port()
            try:
                self.server = start_redis(
                    port=self.port,
                    directory=self.dir,
                    timeout=20,
                    exe=self.binary,
                    extra_args=["--appendonly", "yes", "--appendfsync", "always"],
                )
            except RuntimeError:
                if self.starts:  # the same port must come back: no other try makes sense
                    break
                continue
            self.starts += 1
            return
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """SIGTERM by pid and wait (with ``appendfsync always`` every write is on disk)."""
        if self.server is not None:
            self.server.stop()  # its directory is ours: the data stays for the next start


class _Link:
    """One client connection through a :class:`HangProxy` and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket, hung: bool) -> None:
        self.client, self.upstream, self.hung = client, upstream, hung
        self._closed = threading.Event()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            for sock in (self.client, self.upstream):
                try:
                    sock.close()
                except OSError:
                    pass

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class HangProxy:
    """A TCP proxy in front of a Redis that can stop answering without closing anything, as a
    network partition or a half-open connection after a failover does.

    :meth:`blackhole`: every connection, open or new, stops forwarding in both directions (what
    is sent is read and dropped) but stays open. :meth:`heal`: new connections forward again;
    the blackholed ones stay hung for good, like half-open TCP connections, so only a client
    that gives up on them (a socket timeout) recovers.

    Args:
        upstream: ``(host, port)`` of the Redis, or the path of its unix socket.
    """

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._blackholed = False
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="hang-proxy", daemon=True).start()

    @classmethod
    def to(cls, broker_url: str) -> tuple[HangProxy, str]:
        """A proxy in front of the Redis of ``broker_url`` (``redis://`` or ``redis+socket://``)
        and the broker URL that goes through it (same credentials and database); skips the test
        on ``rediss://`` (the server's certificate would not name the proxy)."""
        parts = urlsplit(broker_url)
        if parts.scheme == "redis+socket":
            proxy = cls(parts.path)
            db = parse_qs(parts.query).get("virtual_host", ["0"])[0]
            path, query = f"/{db}", ""
        elif parts.scheme == "redis":
            proxy = cls((parts.hostname or "127.0.0.1", parts.port or 6379))
            path, query = parts.path, parts.query
        else:
            pytest.skip(f"the hang proxy forwards plain redis:// only, not {parts.scheme}://")
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{proxy.port}" if auth else f"127.0.0.1:{proxy.port}"
        return proxy, urlunsplit(("redis", netloc, path, query, ""))

    def blackhole(self) -> None:
        """Stop forwarding on every connection, open or new; close none."""
        with self._lock:
            self._blackholed = True
            for link in self._links:
                link.hung = True

    def heal(self) -> None:
        """Forward new connections again; the blackholed ones stay hung."""
        with self._lock:
            self._blackholed = False

    def hung_links(self) -> int:
        """Connections open and hung now."""
        with self._lock:
            return sum(1 for link in self._links if link.hung and not link.closed)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.upstream)
            return sock
        return socket.create_connection(self.upstream, timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                link = _Link(client, upstream, hung=self._blackholed)
                self._links.append(link)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(link, src, dst), name="hang-proxy-pump", daemon=True
                ).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        while not link.closed and not self._stop.is_set():
            try:
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(65536)
            except (OSError, ValueError):  # closed by the other pump
                break
            if not data:
                break
            if link.hung:
                continue  # into the void: nothing crosses, nothing is closed
            try:
                dst.sendall(data)
            except OSError:
                break
        link.close()


# ----------------------------------------------------------------------------- worker
@dataclass
class Worker:
    """One worker configuration, started (and killed) as often as the test likes; every
    process appends to the same log file."""

    settings: Settings
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.settings.metrics_port

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start a process (a fresh metrics port each time) without waiting for it."""
        self.settings = self.settings.with_overrides(metrics_port=free_port())
        self.proc = start_worker(self.settings, self.log)
        self.starts += 1
        return self.proc

    def start(self, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """Start a process and wait until it serves metrics (its model is loaded)."""
        proc = self.spawn()
        try:
            wait_ready(proc, self.port, timeout=timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- worker log ---\n{self.log_tail()}") from exc
        return proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid."""
        if self.proc is not None:
            stop_worker(self.proc, kill=True)
            self.exits.append(self.proc.returncode)

    def stop(self) -> None:
        """SIGTERM by pid (SIGKILL after 15 s)."""
        if self.proc is not None and self.proc.poll() is None:
            stop_worker(self.proc)
            self.exits.append(self.proc.returncode)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status of the current process once it ended, None if still running."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exits.append(code)
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.port)


def worker_settings(
    broker_url: str, model: str, state: Path, consumer: str, **overrides: Any
) -> Settings:
    """The settings of every fault test: CPU, short periodic check, quick claims, short backoff,
    a 5 s lease (and so Redis timeouts of at most half of it)."""
    fields: dict[str, Any] = dict(
        drain_interval=1.0,
        claim_idle_ms=1000,
        consumer=consumer,
        max_backoff=2.0,
        lease_ttl_ms=5000,
        redis_timeout=2.5,
        visibility_timeout=30,
        torch_threads=1,
    )
    fields.update(overrides)
    return make_settings(state, broker_url, model, **fields)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text(port)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# ----------------------------------------------------------------------------- mounts
def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` on ``path``; skip the test when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")


def umount(path: Path) -> None:
    """Unmount ``path`` (lazily if busy), every mount stacked on it."""
    for _ in range(4):
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                return
        if subprocess.run(["mountpoint", "-q", str(path)]).returncode != 0:
            return


def fill(directory: Path, name: str = "filler") -> Path:
    """Write zeros into ``directory/name`` until the file system is full; return the file."""
    path = directory / name
    chunk = b"\0" * (64 * 1024)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        small = b"\0" * 512
        try:
            while True:
                f.write(small)
        except OSError:
            pass
    return path


# ----------------------------------------------------------------------------- sending
def send(client: Client, ids: list[list[Any]], sent: dict[str, list[Any]]) -> list[str]:
    """Enqueue one request per id list; remember what each request id asked for."""
    rids = client.enqueue_many(ids)
    for rid, group in zip(rids, ids, strict=True):
        sent[rid] = list(group)
    return rids


def statuses(client: Client, rids: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(rids), 2000):
        out.update(client.statuses(rids[start : start + 2000]))
    return out


def wait_final(
    client: Client, rids: list[str], timeout: float, worker: Worker | None = None
) -> dict[str, dict[str, Any]]:
    """Wait until every request is applied or rejected (bounded). When ``worker`` died with a
    non-zero status meanwhile, it is restarted (as a supervisor would) and that is recorded."""
    deadline = time.monotonic() + timeout
    while True:
        st = statuses(client, rids)
        if all(s.get("status") in FINAL for s in st.values()):
            return st
        if time.monotonic() >= deadline:
            return st
        if worker is not None and worker.proc is not None and worker.proc.poll() is not None:
            worker.exits.append(worker.proc.returncode)
            worker.start()
        time.sleep(0.25)


def pending_count(r: redis.Redis, model: str) -> int:
    try:
        info = r.xpending(schema.stream_key(model), schema.group_name(model))
    except redis.ResponseError:
        return 0
    return int(info["pending"])


# ----------------------------------------------------------------------------- invariants
@dataclass
class Outcome:
    """What the final check counted (figures for docs/reliability.md)."""

    requests: int = 0
    applied_removed: int = 0
    applied_already_removed: int = 0
    applied_unknown: int = 0
    rejected: int = 0
    #: requests answered by a retrain from scratch together with an earlier request for the same
    #: sample id (both removed it in that one retrain; neither says "already removed")
    folded_in_one_retrain: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    by_version: Counter[int] = field(default_factory=Counter)
    final_version: int = 0
    rows_removed: int = 0
    rows_alive: int = 0
    budget_used: float = 0.0
    budget_total: float = 0.0

    def line(self) -> str:
        return (
            f"requests={self.requests} applied(removed)={self.applied_removed} "
            f"applied(already_removed)={self.applied_already_removed} rejected={self.rejected} "
            f"ids_folded_in_one_retrain={self.folded_in_one_retrain} "
            f"methods={dict(self.by_method)} versions_answered={len(self.by_version)} "
            f"final_version={self.final_version} rows_removed={self.rows_removed} "
            f"rows_alive={self.rows_alive} budget={self.budget_used:.4g}/{self.budget_total:.4g}"
        )


def check_invariants(
    client: Client,
    state: Path,
    sent: dict[str, list[Any]],
    *,
    st: dict[str, dict[str, Any]] | None = None,
    dead_letters_allowed: int = 0,
) -> Outcome:
    """The service's promises, checked from Redis, the persisted model and the ledger file.

    ``sent`` maps each valid request id to the (known) sample ids it asked for. Checks: every
    request is final; none rejected; every applied request either removed its ids (``method``
    and ``model_version`` set, ids not alive in the persisted model) or says they were removed
    already; each sample id was removed by exactly one request and appears once in the ledger's
    ``x``; each request id is once in the ledger, with the method and version of its status;
    the rows the model lacks are exactly the ledger's; the budget holds; nothing is pending.
    """
    rids = list(sent)
    st = st if st is not None else statuses(client, rids)
    out = Outcome(requests=len(rids))
    not_final = {r: st[r] for r in rids if st[r].get("status") not in FINAL}
    assert not not_final, f"{len(not_final)} requests not final, e.g. {list(not_final.items())[:3]}"
    rejected = {r: st[r] for r in rids if st[r]["status"] == schema.STATUS_REJECTED}
    out.rejected = len(rejected)
    assert not rejected, f"{len(rejected)} valid requests rejected: {list(rejected.items())[:3]}"

    model = core.load_model(state, device="cpu")
    alive = model.alive.cpu().numpy()
    removed_by: dict[Any, list[str]] = {}
    for rid in rids:
        s, ids = st[rid], sent[rid]
        assert not s.get("unknown_ids"), (rid, s)
        already = list(s.get("already_removed_ids") or [])
        rows, unknown = model.rows_for_ids(ids)
        assert not unknown, (rid, ids, unknown)
        assert not any(alive[r] for r in rows), f"request {rid} {s} but {ids} alive in the model"
        if s.get("method"):
            assert s["method"] in (schema.METHOD_NEWTON, schema.METHOD_RETRAIN), (rid, s)
            assert isinstance(s.get("model_version"), int) and s["model_version"] >= 1, (rid, s)
            out.applied_removed += 1
            out.by_method[s["method"]] += 1
            out.by_version[s["model_version"]] += 1
            for i in ids:
                if i not in already:
                    removed_by.setdefault(i, []).append(rid)
        else:
            # answered at once: every id was removed before (no step, so no method or version)
            assert sorted(already) == sorted(ids), f"applied without method: {rid} {s} {ids}"
            out.applied_already_removed += 1

    # each requested id removed by exactly one request, the others saw it removed already; or
    # by one retrain from scratch that folded every pending request for it (worker.batch: a
    # retrain removes all its groups at once, so each of them is answered by it)
    every_id = {i for ids in sent.values() for i in ids}

    def one_retrain(rs: list[str]) -> bool:
        answers = {(st[r]["method"], st[r]["model_version"], st[r].get("applied_at")) for r in rs}
        return len(answers) == 1 and next(iter(answers))[0] == schema.METHOD_RETRAIN

    twice = {
        i: [(r, st[r]["method"], st[r]["model_version"]) for r in rs]
        for i, rs in removed_by.items()
        if len(rs) > 1 and not one_retrain(rs)
    }
    assert not twice, f"sample ids removed by two requests: {list(twice.items())[:5]}"
    out.folded_in_one_retrain = sum(len(rs) - 1 for rs in removed_by.values())
    never = every_id - set(removed_by)
    assert not never, f"ids no request removed (all say 'already removed'): {sorted(never)[:10]}"

    # the ledger file: each request id once, each sample id once, same answers as the statuses
    records = list(read_records(state))
    rid_count: Counter[str] = Counter()
    x_count: Counter[Any] = Counter()
    ledger_answer: dict[str, tuple[str, str, Any]] = {}
    for rec in records:
        for rid in rec["ids"]:
            rid_count[rid] += 1
            ledger_answer[rid] = (rec["s"], rec.get("m", ""), rec.get("v"))
        for i in rec.get("x") or []:
            x_count[i] += 1
    dup_rids = [r for r, c in rid_count.items() if c > 1]
    assert not dup_rids, f"request ids twice in the ledger: {dup_rids[:5]}"
    dup_x = [i for i, c in x_count.items() if c > 1]
    assert not dup_x, f"sample ids removed twice per the ledger: {dup_x[:5]}"
    for rid in rids:
        s = st[rid]
        assert rid in ledger_answer, f"request {rid} ({s}) missing from the ledger"
        if s.get("method"):
            want = (s["status"], s["method"], s["model_version"])
            assert ledger_answer[rid] == want, (rid, ledger_answer[rid], want)
    removed_ids = {int(model.ids[r]) for r in (~alive).nonzero()[0].tolist()}
    assert set(x_count) == removed_ids, (
        f"ledger and model disagree: {len(set(x_count) - removed_ids)} only in the ledger, "
        f"{len(removed_ids - set(x_count))} only in the model"
    )
    assert set(removed_by) == {i for i in removed_ids if i in every_id}

    out.final_version = int(model.version)
    out.rows_removed = len(removed_ids)
    out.rows_alive = int(alive.sum())
    out.budget_used, out.budget_total = float(model.budget_used), float(model.budget_total)
    assert model.budget_used <= model.budget_total, (model.budget_used, model.budget_total)
    assert max(out.by_version, default=0) <= model.version

    r = client.redis
    assert pending_count(r, client.model) == 0, "entries still pending in the consumer group"
    dead = r.xlen(schema.dead_letter_key(client.model))
    assert dead <= dead_letters_allowed, (
        f"{dead} dead letters: {r.xrange(schema.dead_letter_key(client.model))[:3]}"
    )
    return out
