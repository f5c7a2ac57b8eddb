"""Compact JSON for what every removal step writes: the journal of its answers and the ledger lines.

A step's journal holds each request's id, sample ids and enqueue time; at 8,192 requests a batch
the json module spent about 5 ms encoding it (floats through ``repr``), orjson 0.2 ms.
:func:`dumps` hands orjson only what it writes exactly as the json module would read it back:
plain JSON values (``str``, ``int``, ``bool``, ``None``, finite ``float``, ``list``, ``tuple``,
``dict`` with ``str`` keys, nested), checked in one pass (about 1 ms for such a journal). Anything
else goes through the json module as before: what it refused (a NaN or infinity, a ``datetime``,
a ``UUID``, an ``Enum``, a dataclass; orjson would write them) is still refused, and what it
wrote (an int past 64 bits, a dict with int keys, subclasses of ``str`` and ``int``) it still
writes. The output is compact (no spaces), in the caller's key order, UTF-8 (non-ASCII text as
it is, not ``\\u`` escapes); readers use ``json.loads`` and get the same values either way.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["dumps"]

_SCALARS = frozenset({str, int, bool, type(None)})
_NUMBERS = frozenset({str, int, bool, type(None), float})


def _finite(values: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every float among ``values`` (plain scalars) is finite."""
    floats = [v for v in values if type(v) is float]
    try:
        return math.isfinite(math.fsum(floats))
    except OverflowError:  # finite values whose sum overflows: look at each
        return all(map(math.isfinite, floats))
    except ValueError:  # inf + -inf
        return False


def _plain(obj: Any) -> bool:
    """Whether ``obj`` holds only plain JSON values (see the module docstring)."""
    kind = type(obj)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(obj)
    if kind is dict:
        return all(type(k) is str for k in obj) and all(_plain(v) for v in obj.values())
    if kind is list or kind is tuple:
        kinds = set(map(type, obj))
        if kinds <= _SCALARS:
            return True
        if kinds <= _NUMBERS:
            return _finite(obj)
        return all(_plain(v) for v in obj)
    return False


def dumps(obj: Any, *, allow_nan: bool = False) -> bytes:
    """``obj`` as compact JSON bytes (see the module docstring). ``allow_nan``: what the json
    module does with a NaN or infinity (write ``NaN``/``Infinity``, or refuse it).

    Raises:
        TypeError, ValueError: ``obj`` is not JSON (as ``json.dumps`` says).
    """
    if _plain(obj):
        try:
            return orjson.dumps(obj)
        except TypeError:  # orjson.JSONEncodeError: an int past 64 bits, nesting too deep
            pass
    return json.dumps(obj, allow_nan=allow_nan, separators=(",", ":")).encode()
