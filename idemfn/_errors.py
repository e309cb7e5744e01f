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

    ``except idemfn.IdempotencyError`` catches every error of idemfn's own (bad options and
    keys raise plain ``TypeError`` / ``ValueError`` instead). Every error pickles, and can be
    built from its message alone (the other fields then empty), as Celery's result backends
    rebuild an exception from ``type(exc)(*exc.args)``.

    Args:
        message: What happened and what to do about it.
        key: The stored key concerned (``name:key``); empty when none is.

    Attributes:
        key: The stored key concerned (``name:key``); empty when none is.
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
    """A live call owns the key: retry later, or pass ``wait=`` to wait for its outcome.

    Raised when the key's record is ``processing`` and its owner is alive after ``wait``
    seconds, and at once to a call that re-enters its own key from its body.

    Args:
        message: What happened and what to do about it.
        key: The stored key.
        owner: The owner of the live claim (host, boot id, pid namespace, pid, start time).
        started_at: When the live claim was made (aware UTC), if known.

    Attributes:
        owner: The owner of the live claim (host, boot id, pid namespace, pid, start time).
        started_at: When the live claim was made (aware UTC), or None.
    """

    def __init__(
        self, message: str, *, key: str = "", owner: str = "", started_at: datetime | None = None
    ) -> None:
        super().__init__(message, key=key)
        self.owner = owner
        self.started_at = started_at


class FingerprintMismatch(IdempotencyError):
    """The key was first used with other arguments: use another key, or narrow ``fingerprint=``.

    Checked before the record's status, so it is raised even while the first call still runs.

    Args:
        message: What happened and what to do about it.
        key: The stored key.
        stored: The hex fingerprint in the key's record.
        given: The hex fingerprint of this call's arguments.

    Attributes:
        stored: The hex fingerprint in the key's record.
        given: The hex fingerprint of this call's arguments.
    """

    def __init__(self, message: str, *, key: str = "", stored: str = "", given: str = "") -> None:
        super().__init__(message, key=key)
        self.stored = stored
        self.given = given


class Halted(IdempotencyError):
    """The key's call ended without an outcome that can be replayed as itself.

    The owner crashed or was interrupted (a ``KeyboardInterrupt``, ``SystemExit`` or
    ``CancelledError`` is replayed only as ``Halted``), its claim was found abandoned with
    ``on_abandoned="halt"``, or its exception or result could not be stored or loaded back.
    A side effect may have happened: check it, then ``forget`` the key to allow another run.

    Args:
        message: What happened and what to do about it.
        key: The stored key.
        reason: Why the call halted (which owner, how it was found gone; what could not be
            stored).
        exc_type: The qualified name of the exception the call ended with, if any.
        traceback: That exception's traceback, as text, if any.

    Attributes:
        reason: Why the call halted.
        exc_type: The qualified name of the exception the call ended with, or None.
        traceback: That exception's traceback, as text, or None.
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
    """The key has no finished record and the call's ``deadline=`` has passed: the body never ran.

    Nothing was claimed or stored. A finished record is replayed even after the deadline.

    Args:
        message: What happened.
        key: The stored key.
    """


class OwnershipLost(IdempotencyError):
    """This call's claim was taken over, halted or forgotten while its body ran.

    Raised in the owner, after its body: its outcome is not recorded (every write after a
    claim is fenced on the claim's token), and the key's record is whatever the other caller
    made it. Usually the owner's lease ran out while it still ran: give it a longer
    ``lease=``.

    Args:
        message: What happened.
        key: The stored key.
    """


class StoreError(IdempotencyError):
    """The store failed: unreachable, refused, corrupt or tampered record, disk full.

    The message names the store, what it could not do and the key. Nothing was replayed
    wrongly: a record that cannot be read is never loaded, and the body does not run on it.

    Args:
        message: Which store, what it could not do, which key, and why.
        key: The stored key (or, for a store-wide step, what the store was doing it to).
    """
