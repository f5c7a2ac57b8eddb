"""The error tree of ``core``: bad input is a ``ValueError``, never retried."""

from __future__ import annotations


class CertRemoveError(Exception):
    """Base class of every error ``core`` raises on purpose."""


class InvalidInputError(CertRemoveError, ValueError):
    """Bad data, rows, labels or options. The model is left unchanged."""


class ConvergenceError(CertRemoveError, RuntimeError):
    """Training did not reach the gradient tolerance the certificate needs."""


class NumericalError(CertRemoveError, RuntimeError):
    """A factorisation failed or produced non-finite values (names lambda and the size)."""


class StateError(CertRemoveError, RuntimeError):
    """A state directory is missing, unreadable or inconsistent with its dataset."""


class StateNotFoundError(StateError):
    """The directory holds no model at all (no ``CURRENT``, no snapshot): a new state directory."""


class StateDamagedError(StateError):
    """A file of a state directory is missing, damaged or inconsistent (checksum, format or
    invariant). ``path`` is the file concerned; the message names it and says what to do. A
    damaged state is never served."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
