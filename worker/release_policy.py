"""The release policy (``CERTREMOVE_RELEASE_POLICY``, ``worker/releases.py``): no numpy here, so
that the settings can check it without loading numpy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("certremove.worker")

POLICIES = ("every", "epoch", "interval", "manual")
DEFAULT_POLICY = "epoch"


@dataclass(frozen=True)
class ReleasePolicy:
    """``every``, ``epoch``, ``interval`` (at most one release per ``interval`` s) or
    ``manual``."""

    kind: str = DEFAULT_POLICY
    interval: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ReleasePolicy:
        """``every`` | ``epoch`` | ``interval:<seconds>`` | ``manual``.

        Raises:
            ValueError: anything else (or a non-positive interval).
        """
        raw = str(text).strip().lower()
        if raw in ("every", "epoch", "manual"):
            return cls(raw)
        if raw.startswith("interval:"):
            try:
                seconds = float(raw.split(":", 1)[1])
            except ValueError:
                seconds = float("nan")
            if not seconds > 0 or seconds == float("inf"):
                raise ValueError(f"interval:T needs T > 0 seconds, got {text!r}")
            return cls("interval", seconds)
        raise ValueError(f"expected every, epoch, interval:<seconds> or manual, got {text!r}")

    def due(
        self,
        last: dict[str, Any] | None,
        *,
        snapshot: int,
        version: int,
        epoch_released: Callable[[], bool],
        now: float,
        news: bool,
        requested: bool = False,
    ) -> bool:
        """Whether to release persisted snapshot ``snapshot`` of model version ``version`` now,
        after the release recorded ``last`` (None: none yet); ``epoch_released()``: its noise
        epoch has a release already; ``news``: applied requests no release covers yet;
        ``requested``: a manual request (``certremove release``)."""
        if last is not None and int(last.get("snapshot", -1)) == snapshot:
            if requested:
                log.info("release requested, but release %s is the current state", last["release"])
            return False  # this persisted state is out already
        if self.kind == "epoch":
            if epoch_released():
                if requested:
                    log.info(
                        "release requested, but noise epoch (version %d) has a release already "
                        "(policy epoch: never two of one epoch)",
                        version,
                    )
                return False
            return True
        if requested or self.kind == "every":
            return True
        if self.kind == "interval":
            if last is None:
                return True
            if now - float(last["created_at"]) < self.interval:
                return False
            return news or int(last["model_version"]) != version
        return False  # manual

    def __str__(self) -> str:
        return f"interval:{self.interval:g}" if self.kind == "interval" else self.kind
