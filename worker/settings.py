"""Worker settings: one frozen object built from ``CERTREMOVE_*`` variables at the entry point.

Nothing below the entry point reads the environment: the Celery app, the service, the metrics
server and the CLI all receive this object.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from producer import schema


class SettingsError(ValueError):
    """A ``CERTREMOVE_*`` variable has a value the worker cannot use."""


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
        max_deliveries: deliveries after which an entry goes to the dead-letter stream.
        consumer: stable consumer name in the group (default ``{model}@{hostname}``).
        visibility_timeout: kombu visibility timeout for Celery messages (wake-ups only).
        torch_threads: CPU threads for torch; 0 picks one less than the CPUs (at least 1), so
            Redis, Celery and producers on the same machine do not stall its parallel regions.
        data_dir: the source images of a DP-extractor model (``--data-dir`` of
            ``certremove extractor``), needed for a full-pipeline retrain.
        pipeline_retrain: when the extractor's group privacy is spent, retrain extractor,
            features and head (True) or reject further requests with a reason (False).
        retrain_lead: fraction of a noise epoch's ``max_removals`` left when the next epoch
            starts fitting in a background thread (0 turns it off: retrains then block).
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
    max_deliveries: int = 5
    consumer: str = ""
    visibility_timeout: int = 600
    torch_threads: int = 0
    data_dir: Path | None = None
    pipeline_retrain: bool = True
    retrain_lead: float = 0.2

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
        if self.max_batch < 1 or self.max_deliveries < 1 or self.slice_seconds <= 0:
            raise SettingsError("max_batch, max_deliveries and slice_seconds must be positive")
        if not 0 < self.drain_interval <= 30:
            # DESIGN.md §4 asks for 10-30 s; shorter is allowed (tests), longer would stall.
            raise SettingsError("CERTREMOVE_DRAIN_INTERVAL must be in (0, 30] seconds")
        if not 0 <= self.retrain_lead < 1:
            raise SettingsError("CERTREMOVE_RETRAIN_LEAD must lie in [0, 1)")
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
            ("max_deliveries", "MAX_DELIVERIES", int),
            ("consumer", "CONSUMER", str),
            ("visibility_timeout", "VISIBILITY_TIMEOUT", int),
            ("torch_threads", "TORCH_THREADS", int),
            ("data_dir", "DATA_DIR", Path),
            ("pipeline_retrain", "PIPELINE_RETRAIN", _flag),
            ("retrain_lead", "RETRAIN_LEAD", float),
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

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

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
            "CERTREMOVE_MAX_DELIVERIES": str(self.max_deliveries),
            "CERTREMOVE_CONSUMER": self.consumer,
            "CERTREMOVE_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "CERTREMOVE_TORCH_THREADS": str(self.torch_threads),
            "CERTREMOVE_RETRAIN_LEAD": str(self.retrain_lead),
        }
        if self.device:
            out["CERTREMOVE_DEVICE"] = self.device
        if self.data_dir is not None:
            out["CERTREMOVE_DATA_DIR"] = str(self.data_dir)
        out["CERTREMOVE_PIPELINE_RETRAIN"] = "1" if self.pipeline_retrain else "0"
        return out


def _flag(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (case-insensitive)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
