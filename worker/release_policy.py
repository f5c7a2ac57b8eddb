"""The release policy (``CERTREMOVE_RELEASE_POLICY``, ``worker/releases.py``): no numpy here, so
that the settings can check it without loading numpy."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __str__(self) -> str:
        return f"interval:{self.interval:g}" if self.kind == "interval" else self.kind
