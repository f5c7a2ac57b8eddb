"""Errors of the worker (bad configuration or state is a ``ValueError``/``RuntimeError``)."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of the errors the worker raises on purpose."""


class StateMissingError(WorkerError, RuntimeError):
    """The state directory holds no loadable model."""


class ServiceStoppedError(WorkerError, RuntimeError):
    """The service stopped serving (its persisted model could not be reloaded after a failure):
    the process must be restarted."""


class StateLockedError(WorkerError, RuntimeError):
    """Another worker process already serves this state directory."""


class StateDamagedError(StateMissingError):
    """The state directory's model is damaged, tampered with or rolled back (a file fails its
    checksum or an invariant, or rows the removal ledger says were removed are alive): it is never
    served. The message says what to do (``certremove state recover``)."""
