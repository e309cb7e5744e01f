"""The ``extra`` of every line idemfn logs (issue 21): ``idemfn_key``, ``idemfn_key_hash`` and
``idemfn_decision``, which structured loggers pick up as the record's attributes.

Every record idemfn logs has the three attributes, so that a formatter naming them never fails
on one of its lines. A line about one key has its key and ``key_hash(key)``; a line about no
single key (a store's watches, its cleanup, its clock, a task queue's setup) has None for both.
``idemfn_decision`` is an event name where the line reports one (``halted``, ``busy``,
``store_error``, ...), else one of the words below, listed on the Logging page.
"""

from __future__ import annotations

from typing import Final

from ._errors import OwnershipLost
from .events import OWNERSHIP_LOST, STORE_ERROR, log_fields

__all__ = [
    "CHECKPOINT_FAILED",
    "CLEANUP_FAILED",
    "CLOCK_PARTIAL",
    "DROPPED",
    "QUEUE_SETUP",
    "RENEW_FAILED",
    "UNREADABLE",
    "UNREPLICATED",
    "WATCH_FAILED",
    "about",
    "failed",
    "no_key",
]

# The words of lines that report no decision of the state machine.
DROPPED: Final = "dropped"  # a claim dropped without being settled: its lease will run out
RENEW_FAILED: Final = "renew_failed"  # a lease renewal failed unexpectedly (not a StoreError)
UNREADABLE: Final = "unreadable"  # a sweep skipped a record that cannot be read
UNREPLICATED: Final = "unreplicated"  # a write too few Redis replicas acknowledged
WATCH_FAILED: Final = "watch_failed"  # waiters poll: pub/sub or LISTEN/NOTIFY failed
CLEANUP_FAILED: Final = "cleanup_failed"  # expired records could not be removed
CHECKPOINT_FAILED: Final = "checkpoint_failed"  # DiskStore's WAL checkpoint failed
CLOCK_PARTIAL: Final = "clock_partial"  # a cluster primary did not answer for the clock
QUEUE_SETUP: Final = "queue_setup"  # a task queue set up so that idemfn cannot see its retries


def no_key(decision: str) -> dict[str, str | None]:
    """The ``extra`` of a line about no single key."""
    return {"idemfn_key": None, "idemfn_key_hash": None, "idemfn_decision": decision}


def about(key: str | None, decision: str) -> dict[str, str | None]:
    """The ``extra`` of a line about ``key``, which may be unknown (None)."""
    if key is None:
        return no_key(decision)
    return dict(log_fields(key, decision))


def failed(problem: BaseException) -> str:
    """The decision word of a line saying that a key could not be settled because of
    ``problem``: ``ownership_lost`` when the claim was taken over, else ``store_error``."""
    return OWNERSHIP_LOST if isinstance(problem, OwnershipLost) else STORE_ERROR
