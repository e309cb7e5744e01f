"""The metrics idemfn's events make: one definition for OpenTelemetry, Prometheus and the docs.

Names follow OpenTelemetry's semantic-convention style (a dotted namespace, the unit apart,
durations in seconds as ``*.duration`` histograms); Prometheus gets the same metrics under the
names its exporters derive from those (dots to underscores, ``_seconds`` for the unit,
``_total`` for a counter). Label values are the events' own words (``idemfn.events``), which
``idemfn stats`` uses too.
"""

from __future__ import annotations

from typing import Final

from .events import (
    COMPLETED,
    DECISIONS,
    HALTED,
    OWNERSHIP_LOST,
    RELEASED,
    WAITED,
    Event,
)

__all__ = [
    "ATTEMPT",
    "BODY_DURATION",
    "BODY_OUTCOMES",
    "BUCKETS",
    "DECISION",
    "DECISIONS_COUNTER",
    "FUNCTION",
    "KEY",
    "KEY_HASH",
    "OUTCOME",
    "PROMETHEUS",
    "REASON",
    "STORE",
    "WAIT_DURATION",
    "body_outcome",
    "wait_outcome",
]

# Instruments (OpenTelemetry names).
DECISIONS_COUNTER: Final = "idemfn.decisions"  # counter, unit "{decision}": one per decision event
WAIT_DURATION: Final = "idemfn.wait.duration"  # histogram, "s": how long callers waited (waited)
BODY_DURATION: Final = "idemfn.body.duration"  # histogram, "s": claim to settle (completed, ...)

# Attributes (OpenTelemetry names; Prometheus labels drop the "idemfn." prefix).
DECISION: Final = "idemfn.decision"  # the event's name: claimed, replayed, ...
FUNCTION: Final = "idemfn.function"  # Event.function ("" for begin() used directly)
STORE: Final = "idemfn.store"  # Event.store: disk, redis, postgres, ...
REASON: Final = "idemfn.reason"  # Event.reason ("" where it has none)
OUTCOME: Final = "idemfn.outcome"  # body: completed, halted, released, ownership_lost;
#                                    wait: claimed, replayed, gave_up, failed,
#                                    cancelled
KEY: Final = "idemfn.key"  # span attribute only, never a metric label (unbounded)
KEY_HASH: Final = "idemfn.key_hash"  # span attribute only: events.key_hash(key)
ATTEMPT: Final = "idemfn.attempt"  # span attribute only

#: Histogram bucket bounds in seconds, for both waits and bodies: 1 ms to 5 minutes.
BUCKETS: Final = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

#: The events that end a body, and so record its duration.
BODY_OUTCOMES: Final = frozenset({COMPLETED, HALTED, RELEASED, OWNERSHIP_LOST})

#: Prometheus's names for the three instruments, and their label names.
PROMETHEUS: Final = {
    DECISIONS_COUNTER: ("idemfn_decisions_total", ("decision", "function", "store", "reason")),
    WAIT_DURATION: ("idemfn_wait_duration_seconds", ("function", "store", "outcome")),
    BODY_DURATION: ("idemfn_body_duration_seconds", ("function", "store", "outcome")),
}

assert set(BODY_OUTCOMES) <= set(DECISIONS)


def body_outcome(event: Event) -> str | None:
    """The ``outcome`` of ``event``'s body-duration observation, or None if it makes none
    (an event that ends no body, or one with no duration: an abandoned claim halted by
    another caller)."""
    if event.name in BODY_OUTCOMES and event.duration is not None:
        return event.name
    return None


def wait_outcome(event: Event) -> str | None:
    """The ``outcome`` of ``event``'s wait-duration observation, or None if it is no wait."""
    if event.name == WAITED and event.duration is not None:
        return event.status or "gave_up"
    return None
