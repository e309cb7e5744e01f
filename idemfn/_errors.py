"""The exceptions idemfn raises.

    IdempotencyError           every error below carries ``.key``
    ├── AlreadyRunning         a live call owns the key
    ├── FingerprintMismatch    same key, other arguments
    ├── Halted                 a halted record with no exception to re-raise as itself
    ├── DeadlineExceeded       no finished record and the deadline has passed
    ├── OwnershipLost          the claim was taken over or halted before the owner finished
    └── StoreError             the store failed (unreachable, corrupt record, disk full)

Bad options and keys raise plain ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

from datetime import datetime

__all__ = [
    "AlreadyRunning",
    "DeadlineExceeded",
    "FingerprintMismatch",
    "Halted",
    "IdempotencyError",
    "OwnershipLost",
    "StoreError",
]


class IdempotencyError(Exception):
    """Base class of every idemfn error; ``.key`` is the stored key concerned.

    Every error can also be built from its message alone (the other fields then empty), as
    Celery's result backends rebuild an exception from ``type(exc)(*exc.args)``.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only constructors don't survive pickle's default reduce; these errors cross
        # process boundaries (task queues, result backends), so rebuild them from their state.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[IdempotencyError], args: tuple[object, ...], state: dict[str, object]
) -> IdempotencyError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class AlreadyRunning(IdempotencyError):
    """A live call owns the key: retry later, or pass ``wait=`` to wait for its outcome."""

    def __init__(
        self, message: str, *, key: str = "", owner: str = "", started_at: datetime | None = None
    ) -> None:
        super().__init__(message, key=key)
        self.owner = owner
        self.started_at = started_at


class FingerprintMismatch(IdempotencyError):
    """The key was first used with other arguments (``.stored`` and ``.given`` fingerprints)."""

    def __init__(self, message: str, *, key: str = "", stored: str = "", given: str = "") -> None:
        super().__init__(message, key=key)
        self.stored = stored
        self.given = given


class Halted(IdempotencyError):
    """The key's call ended without an outcome that can be replayed as itself.

    The owner crashed or was interrupted, or its exception could not be stored. A side effect
    may have happened: check it, then ``forget`` the key to allow another run.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str = "",
        reason: str = "",
        exc_type: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message, key=key)
        self.reason = reason
        self.exc_type = exc_type
        self.traceback = traceback


class DeadlineExceeded(IdempotencyError):
    """The key has no finished record and the call's deadline has passed: the body never ran."""


class OwnershipLost(IdempotencyError):
    """This call's claim was taken over or halted by another caller; its outcome is not recorded."""


class StoreError(IdempotencyError):
    """The store failed; the message names the store and the key."""
