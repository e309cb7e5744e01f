"""Whether a claim is still held: its owner's process, and its lease.

One rule, used by the engine (is a processing record abandoned?), by prune (may a claim be
removed?) and by the command (is it shown as abandoned?): a sweep that judged liveness by
another clock than the engine's could remove a claim whose owner still runs its body.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from . import _owner
from ._record import Entry

__all__ = [
    "LEASE_EXPIRED",
    "OWNER_DIED",
    "abandoned_kind",
    "abandoned_reason",
    "clock",
    "prunable_claim",
    "utc_iso",
]

# The clock of same-machine leases (Entry.lease_mono): CLOCK_MONOTONIC, shared by every process
# of a machine until it reboots, and never set by anyone. Looked up here on every use, so that
# a model with a fake clock (tests/contract/test_state_machine.py) can replace it.
clock = time.monotonic


def utc_iso(ts: float) -> str:
    """UNIX seconds as an ISO 8601 UTC time to the millisecond, for messages."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _judged_on_monotonic(entry: Entry) -> bool:
    # On the owner's machine the monotonic clock decides: a wall clock set forwards (or back,
    # in the owner) by an hour must not hand a live claim to a second caller.
    return entry.lease_mono is not None and _owner.same_boot(entry.owner)


def abandoned_reason(entry: Entry, now: float) -> str | None:
    """Why a processing entry's owner is known to be gone, or None while it may run.

    ``now`` is the store's clock; it judges owners on other machines only.
    """
    dead = _owner.gone_reason(entry.owner)
    if dead is not None:
        return f"its owner {entry.owner} died: {dead}"
    if entry.lease_until is None:
        return None
    if _judged_on_monotonic(entry):
        ran_out = entry.lease_mono <= clock()  # type: ignore[operator]  # checked just above
    else:
        ran_out = entry.lease_until <= now
    if ran_out:
        return (
            f"its owner {entry.owner} stopped renewing its lease, which ran out at"
            f" {utc_iso(entry.lease_until)}"
        )
    return None


#: The ``reason`` words of the ``abandoned`` event (and of ``idemfn stats``'s
#: ``oldest_processing.abandoned_reason``): how the owner was found gone.
OWNER_DIED = "owner_died"
LEASE_EXPIRED = "lease_expired"


def abandoned_kind(reason: str) -> str:
    """The word for an ``abandoned_reason`` text: ``owner_died`` (its process is gone) or
    ``lease_expired`` (it stopped renewing its lease)."""
    return LEASE_EXPIRED if "stopped renewing" in reason else OWNER_DIED


def prunable_claim(entry: Entry, now: float) -> bool:
    """Whether prune may remove a processing entry: its owner is gone by the engine's own rule
    (``abandoned_reason``), and its lease ran out more than its ttl ago, timed on the same
    clock as the lease (monotonic on the owner's machine, so a wall clock set forwards removes
    nothing early)."""
    if entry.ttl is None or entry.lease_until is None:
        return False
    if abandoned_reason(entry, now) is None:
        return False
    if _judged_on_monotonic(entry):
        return entry.lease_mono + entry.ttl < clock()  # type: ignore[operator]  # see above
    return entry.lease_until + entry.ttl < now
