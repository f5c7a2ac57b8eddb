"""Worker settings: one frozen object built from ``CERTREMOVE_*`` variables at the entry point.

Nothing below the entry point reads the environment: the Celery app, the service, the metrics
server and the CLI all receive this object.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from producer import schema
from producer.urls import check_cert_reqs, redact_url, split_tls_query, tls_options
from worker.release_policy import ReleasePolicy


class SettingsError(ValueError):
    """A ``CERTREMOVE_*`` variable has a value the worker cannot use."""


#: ``CERTREMOVE_HESSIAN``'s values: the names of ``core.solvers.HESSIANS``, written here so that
#: reading the settings does not import torch (tests/worker/test_settings.py keeps them equal)
HESSIANS = ("float32", "bfloat16")


@dataclass(frozen=True)
class Settings:
    """Everything the worker is configured by (see README "Configuration").

    Attributes:
        broker_url: kombu-style Redis URL for Celery and the request stream.
        model: model name; selects the stream key, consumer group and queues.
        state_dir: the model's state directory (``certremove train --state``).
        metrics_port: port of the operator metrics endpoint (0 picks a free port).
        metrics_addr: address it binds (default loopback: the budget gauges are private).
        device: ``cuda``, ``cpu`` or None for cuda when available.
        max_batch: most stream entries folded into one Newton step.
        slice_seconds: time slice of one drain task before it yields to other tasks.
        drain_interval: seconds between periodic checks for pending entries.
        claim_idle_ms: idle time after which another consumer's pending entries are claimed.
        max_failures: processing failures an entry causes on its own (served alone, with the
            infrastructure answering) before it goes to the dead-letter stream; disk, Redis and
            process failures never count (they are retried with backoff).
        status_ttl: seconds a final status hash lives in Redis (0: for good); the ledger in the
            state directory keeps the permanent record.
        stream_retention: seconds acknowledged entries stay in the request stream before they
            are trimmed (entries not yet acknowledged are never trimmed).
        ledger_rotate_mb: rotate ``ledger.jsonl`` into a gzipped segment past this size.
        lease_ttl_ms: life of the model's ownership lease in Redis without renewal.
        max_backoff: longest wait (seconds) between retries after an infrastructure failure.
        keep_snapshots: snapshots kept in the state directory (the newest valid one is what
            ``certremove state recover`` falls back to).
        consumer: stable consumer name in the group (default ``{model}@{hostname}``).
        visibility_timeout: kombu visibility timeout for Celery messages (wake-ups only).
        broker_connect_timeout: seconds the worker tries to reach Redis at start (exponential
            backoff, 0.5 s doubling up to 5 s) before it exits with status 4.
        redis_timeout: seconds each Redis connection of the worker (its redis-py client,
            Celery's broker connections) waits to connect and for a reply, and the interval of
            kombu's checks of its BRPOP and pub/sub connections. A Redis that stops answering but
            keeps the connection open (a partition, a half-open connection after a failover, a
            paused server) then fails the call with a timeout, handled like a lost connection
            (backoff, reconnect, retry; nothing is lost), where it would hold the worker forever.
            It must exceed the longest reply of a healthy Redis to a command of the worker: none
            blocks on the server but kombu's BRPOP (1 s), and kombu reads its reply only once the
            socket is readable, so a timeout under 1 s is safe for it. At most half of
            ``lease_ttl_ms``: a lease renewal that meets a hung connection waits this long before
            it tries again on a fresh one, and must still land before the lease lapses
            (``worker.lease``). Unset (None): 15 s, or half the lease when that is shorter.
        log_format: ``text`` or ``json`` (one JSON object per line, ``worker.logs``).
        broker_max_retries: retries (2, 4, 6 ... s apart, at most 30 s) to reach Redis at start
            and after losing it, before the worker exits with status 4.
        torch_threads: CPU threads for torch; 0 picks one less than the CPUs (at least 1), so
            Redis, Celery and producers on the same machine do not stall its parallel regions.
        hessian: the Hessian of a removal step's direct solve, ``float32`` (the default) or
            ``bfloat16`` (bfloat16 products summed in float32, then float64 refinement by CG:
            for large batches on a GPU; ``core.removal.SolveOptions``). The certificate
            charges whatever residual the solve leaves, so both are sound.
        data_dir: the source images of a DP-extractor model (``--data-dir`` of
            ``certremove extractor``), needed for a full-pipeline retrain.
        pipeline_retrain: when the extractor's group privacy is spent, retrain extractor,
            features and head (True) or reject further requests with a reason (False).
        retrain_lead: fraction of a noise epoch's ``max_removals`` left when the next epoch
            starts fitting in a background thread (0 turns it off: retrains then block).
        background_refactor: factor a fresh preconditioner for the Newton steps in a background
            thread when their conjugate gradients need more iterations (True), instead of one
            direct step of the drain doing it (False); ``worker.refactor``.
        redis_ssl_ca_certs: CA file that signed the Redis server's certificate, for a
            ``rediss://`` broker URL (default: the system CA store).
        release_dir: where the model's releases go (``<release_dir>/<model>/...``; default
            ``<state_dir>/releases``: point it at a volume of its own, ``worker.releases``).
        release_policy: ``epoch`` (default), ``every``, ``interval:<seconds>`` or ``manual``.
        receipt_key: the Ed25519 private key that signs removal receipts (None: no receipts).
        redis_ssl_cert_reqs: ``required`` (default), ``optional`` or ``none``: whether a
            ``rediss://`` server's certificate must verify. Passed to redis-py and to Celery
            alike, since kombu alone would not verify it.
    """

    broker_url: str = schema.DEFAULT_BROKER_URL
    model: str = schema.DEFAULT_MODEL
    state_dir: Path = Path("state")
    metrics_port: int = 9820
    metrics_addr: str = "127.0.0.1"
    device: str | None = None
    max_batch: int = 8192
    slice_seconds: float = 0.75
    drain_interval: float = 15.0
    claim_idle_ms: int = 10_000
    max_failures: int = 3
    status_ttl: int = 7 * 86400
    stream_retention: int = 86400
    ledger_rotate_mb: float = 64.0
    lease_ttl_ms: int = 30_000
    max_backoff: float = 30.0
    keep_snapshots: int = 3
    consumer: str = ""
    visibility_timeout: int = 600
    broker_max_retries: int = 10
    broker_connect_timeout: float = 30.0
    redis_timeout: float | None = None
    log_format: str = "text"
    torch_threads: int = 0
    hessian: str = "float32"
    data_dir: Path | None = None
    pipeline_retrain: bool = True
    retrain_lead: float = 0.2
    background_refactor: bool = True
    redis_ssl_ca_certs: Path | None = None
    redis_ssl_cert_reqs: str = "required"
    release_dir: Path | None = None
    release_policy: str = "epoch"
    receipt_key: Path | None = None

    def __post_init__(self) -> None:
        try:
            schema.check_model_name(self.model)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise SettingsError(f"CERTREMOVE_DEVICE must be cuda or cpu, got {self.device!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"CERTREMOVE_METRICS_PORT out of range: {self.metrics_port}")
        if self.torch_threads < 0:
            raise SettingsError("CERTREMOVE_TORCH_THREADS must be >= 0")
        if self.hessian not in HESSIANS:
            raise SettingsError(
                f"CERTREMOVE_HESSIAN must be one of {', '.join(HESSIANS)}, got {self.hessian!r}"
            )
        if self.max_batch < 1 or self.max_failures < 1 or self.slice_seconds <= 0:
            raise SettingsError("max_batch, max_failures and slice_seconds must be positive")
        if self.status_ttl < 0 or self.stream_retention < 0:
            raise SettingsError(
                "CERTREMOVE_STATUS_TTL and CERTREMOVE_STREAM_RETENTION must be >= 0"
            )
        if self.ledger_rotate_mb <= 0 or self.max_backoff <= 0:
            raise SettingsError(
                "CERTREMOVE_LEDGER_ROTATE_MB and CERTREMOVE_MAX_BACKOFF must be > 0"
            )
        if self.lease_ttl_ms < 1000:
            raise SettingsError("CERTREMOVE_LEASE_TTL_MS must be at least 1000")
        if self.keep_snapshots < 1:
            raise SettingsError("CERTREMOVE_KEEP_SNAPSHOTS must be at least 1")
        if self.broker_max_retries < 1:
            raise SettingsError("CERTREMOVE_BROKER_MAX_RETRIES must be at least 1")
        if not self.broker_connect_timeout > 0:
            raise SettingsError("CERTREMOVE_BROKER_CONNECT_TIMEOUT must be > 0 seconds")
        if self.redis_timeout is None:  # the default: 15 s, at most half the lease
            object.__setattr__(self, "redis_timeout", min(15.0, self.lease_ttl_ms / 2000))
        assert self.redis_timeout is not None
        if not (math.isfinite(self.redis_timeout) and self.redis_timeout > 0):
            raise SettingsError(
                f"CERTREMOVE_REDIS_TIMEOUT must be a finite number of seconds > 0, got "
                f"{self.redis_timeout!r}"
            )
        if self.redis_timeout * 2000 > self.lease_ttl_ms:
            raise SettingsError(
                f"CERTREMOVE_REDIS_TIMEOUT ({self.redis_timeout:g} s) must be at most half of "
                f"CERTREMOVE_LEASE_TTL_MS ({self.lease_ttl_ms} ms): a lease renewal that meets a "
                "hung connection waits that long before it tries again, and must still land "
                "before the lease lapses"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(
                f"CERTREMOVE_LOG_FORMAT must be text or json, got {self.log_format!r}"
            )
        if not 0 < self.drain_interval <= 30:
            # 10-30 s by design (docs/design.md "Doorbell"); shorter is fine (tests).
            raise SettingsError("CERTREMOVE_DRAIN_INTERVAL must be in (0, 30] seconds")
        if not 0 <= self.retrain_lead < 1:
            raise SettingsError("CERTREMOVE_RETRAIN_LEAD must lie in [0, 1)")
        try:
            ReleasePolicy.parse(self.release_policy)
        except ValueError as exc:
            raise SettingsError(f"CERTREMOVE_RELEASE_POLICY: {exc}") from exc
        try:
            object.__setattr__(
                self, "redis_ssl_cert_reqs", check_cert_reqs(self.redis_ssl_cert_reqs)
            )
        except ValueError as exc:
            raise SettingsError(f"CERTREMOVE_REDIS_SSL_CERT_REQS: {exc}") from exc
        if not self.consumer:
            object.__setattr__(self, "consumer", f"{self.model}@{socket.gethostname()}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CERTREMOVE_*`` variables (``env`` defaults to os.environ).

        Raises:
            SettingsError: a variable does not parse or is out of range.
        """
        env = os.environ if env is None else env
        fields: dict[str, Any] = {}
        spec: list[tuple[str, str, Any]] = [
            ("broker_url", "BROKER_URL", str),
            ("model", "MODEL", str),
            ("state_dir", "STATE_DIR", Path),
            ("metrics_port", "METRICS_PORT", int),
            ("metrics_addr", "METRICS_ADDR", str),
            ("device", "DEVICE", str),
            ("max_batch", "MAX_BATCH", int),
            ("slice_seconds", "SLICE_SECONDS", float),
            ("drain_interval", "DRAIN_INTERVAL", float),
            ("claim_idle_ms", "CLAIM_IDLE_MS", int),
            ("max_failures", "MAX_FAILURES", int),
            ("status_ttl", "STATUS_TTL", int),
            ("stream_retention", "STREAM_RETENTION", int),
            ("ledger_rotate_mb", "LEDGER_ROTATE_MB", float),
            ("lease_ttl_ms", "LEASE_TTL_MS", int),
            ("max_backoff", "MAX_BACKOFF", float),
            ("keep_snapshots", "KEEP_SNAPSHOTS", int),
            ("consumer", "CONSUMER", str),
            ("visibility_timeout", "VISIBILITY_TIMEOUT", int),
            ("broker_max_retries", "BROKER_MAX_RETRIES", int),
            ("broker_connect_timeout", "BROKER_CONNECT_TIMEOUT", float),
            ("redis_timeout", "REDIS_TIMEOUT", float),
            ("log_format", "LOG_FORMAT", str),
            ("torch_threads", "TORCH_THREADS", int),
            ("hessian", "HESSIAN", str),
            ("data_dir", "DATA_DIR", Path),
            ("pipeline_retrain", "PIPELINE_RETRAIN", _flag),
            ("retrain_lead", "RETRAIN_LEAD", float),
            ("background_refactor", "BACKGROUND_REFACTOR", _flag),
            ("redis_ssl_ca_certs", "REDIS_SSL_CA_CERTS", Path),
            ("redis_ssl_cert_reqs", "REDIS_SSL_CERT_REQS", str),
            ("release_dir", "RELEASE_DIR", Path),
            ("release_policy", "RELEASE_POLICY", str),
            ("receipt_key", "RECEIPT_KEY", Path),
        ]
        for name, var, kind in spec:
            raw = env.get(f"CERTREMOVE_{var}")
            if raw is None or raw == "":
                continue
            try:
                fields[name] = kind(raw)
            except ValueError as exc:
                raise SettingsError(
                    f"CERTREMOVE_{var}={raw!r} is not a valid {kind.__name__.strip('_')}"
                ) from exc
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def __repr__(self) -> str:
        # The broker URL may carry the Redis password; a repr ends up in logs and tracebacks.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["broker_url"] = redact_url(self.broker_url)
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def releases_dir(self) -> Path:
        """Where releases go: ``release_dir``, else ``<state_dir>/releases``."""
        return self.release_dir if self.release_dir is not None else self.state_dir / "releases"

    def tls_options(self) -> dict[str, Any]:
        """redis-py / ``broker_use_ssl`` options for a ``rediss://`` broker URL, else ``{}``."""
        return tls_options(self.broker_url, self.redis_ssl_ca_certs, self.redis_ssl_cert_reqs)

    def celery_broker_url(self) -> str:
        """The broker URL for Celery: on ``rediss://`` without its ``ssl_*`` query parameters,
        which kombu would take instead of ``broker_use_ssl`` (:meth:`tls_options` has them)."""
        return split_tls_query(self.broker_url)[0] if self.tls_options() else self.broker_url

    def to_env(self) -> dict[str, str]:
        """The ``CERTREMOVE_*`` variables that rebuild these settings in a child process."""
        out = {
            "CERTREMOVE_BROKER_URL": self.broker_url,
            "CERTREMOVE_MODEL": self.model,
            "CERTREMOVE_STATE_DIR": str(self.state_dir),
            "CERTREMOVE_METRICS_PORT": str(self.metrics_port),
            "CERTREMOVE_METRICS_ADDR": self.metrics_addr,
            "CERTREMOVE_MAX_BATCH": str(self.max_batch),
            "CERTREMOVE_SLICE_SECONDS": str(self.slice_seconds),
            "CERTREMOVE_DRAIN_INTERVAL": str(self.drain_interval),
            "CERTREMOVE_CLAIM_IDLE_MS": str(self.claim_idle_ms),
            "CERTREMOVE_MAX_FAILURES": str(self.max_failures),
            "CERTREMOVE_STATUS_TTL": str(self.status_ttl),
            "CERTREMOVE_STREAM_RETENTION": str(self.stream_retention),
            "CERTREMOVE_LEDGER_ROTATE_MB": str(self.ledger_rotate_mb),
            "CERTREMOVE_LEASE_TTL_MS": str(self.lease_ttl_ms),
            "CERTREMOVE_MAX_BACKOFF": str(self.max_backoff),
            "CERTREMOVE_KEEP_SNAPSHOTS": str(self.keep_snapshots),
            "CERTREMOVE_CONSUMER": self.consumer,
            "CERTREMOVE_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "CERTREMOVE_BROKER_MAX_RETRIES": str(self.broker_max_retries),
            "CERTREMOVE_BROKER_CONNECT_TIMEOUT": str(self.broker_connect_timeout),
            "CERTREMOVE_REDIS_TIMEOUT": str(self.redis_timeout),
            "CERTREMOVE_LOG_FORMAT": self.log_format,
            "CERTREMOVE_TORCH_THREADS": str(self.torch_threads),
            "CERTREMOVE_HESSIAN": self.hessian,
            "CERTREMOVE_RETRAIN_LEAD": str(self.retrain_lead),
            "CERTREMOVE_REDIS_SSL_CERT_REQS": self.redis_ssl_cert_reqs,
        }
        if self.device:
            out["CERTREMOVE_DEVICE"] = self.device
        if self.data_dir is not None:
            out["CERTREMOVE_DATA_DIR"] = str(self.data_dir)
        if self.redis_ssl_ca_certs is not None:
            out["CERTREMOVE_REDIS_SSL_CA_CERTS"] = str(self.redis_ssl_ca_certs)
        out["CERTREMOVE_PIPELINE_RETRAIN"] = "1" if self.pipeline_retrain else "0"
        out["CERTREMOVE_BACKGROUND_REFACTOR"] = "1" if self.background_refactor else "0"
        out["CERTREMOVE_RELEASE_POLICY"] = self.release_policy
        if self.release_dir is not None:
            out["CERTREMOVE_RELEASE_DIR"] = str(self.release_dir)
        if self.receipt_key is not None:
            out["CERTREMOVE_RECEIPT_KEY"] = str(self.receipt_key)
        return out


def _flag(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (case-insensitive)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
