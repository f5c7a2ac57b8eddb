"""Python's cyclic garbage collector around the drain loop (``worker.service``).

The worker freezes what it loaded at start (``gc.freeze`` in ``worker.runtime``); what is left
for the collector to walk is what the batches make. :func:`collector_paused` holds it off for a
time slice.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector off for one time slice, then let it run again.

    A batch makes tens of thousands of objects that live until its answers are out (entries,
    groups, answers); each collection the allocations trigger meanwhile walks all of them
    (about a tenth of a batch's time), although nearly all are freed by reference counting when
    the batch ends. Cycles made during the slice are collected after it. Nothing changes when
    the collector was off already (the caller's choice)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
