"""Compact JSON for what every removal step writes: the journal of its answers and the ledger lines.

A step's journal holds each request's id, sample ids and enqueue time; at 8,192 requests a batch
the json module spent about 4.6 ms encoding it (floats through ``repr``), orjson 0.2 ms.
:func:`dumps` uses orjson where it takes the object and the json module for the rest (an int past
64 bits, a dict with non-string keys, a type orjson does not know), so what was JSON before still
is, and what the json module refused (``TypeError``, ``ValueError``) is still refused. The output
is compact (no spaces), in the caller's key order, UTF-8 (non-ASCII text as it is, not ``\\u``
escapes); readers use ``json.loads`` and get the same values either way.

Non-finite floats: orjson writes ``null``, the json module (``allow_nan=False``) refuses them.
The records written here hold clock times and enqueue times that are finite or None
(``worker.entries``), so neither case arises; the state of a model, where a non-finite value
would matter, is checked and written by the json module (``core.persist``, ``core.steplog``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps"]


def dumps(obj: Any) -> bytes:
    """``obj`` as compact JSON bytes (see the module docstring).

    Raises:
        TypeError, ValueError: ``obj`` is not JSON (as ``json.dumps`` says).
    """
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
