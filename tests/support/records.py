"""Records the tests put in a store behind the engine's back."""

from __future__ import annotations

import time

from idemfn._record import Entry

__all__ = ["finished", "foreign_entry", "processing"]


def foreign_entry(key: str, fingerprint: str, *, lease_until: float, owner: str = "") -> Entry:
    """A claim of ``key`` by another owner (by default one on another machine, judged by its
    lease), started a second ago, whose lease runs until ``lease_until`` (store time)."""
    now = time.time()
    return Entry(
        key,
        "processing",
        fingerprint,
        owner or "elsewhere/0badc0de/4242/77",
        "foreign-token",
        1,
        now - 1,
        lease_until=lease_until,
        ttl=3600.0,
    )


def processing(key: str, token: str = "t1", **fields: object) -> Entry:
    """A live claim of ``key`` (lease 30 s from now) by an owner of its own; ``fields`` replace
    the record's others."""
    return Entry(
        key,
        "processing",
        "fp",
        "me/m/1/1",
        token,
        1,
        time.time(),
        lease_until=time.time() + 30,
        ttl=60.0,
        **fields,  # type: ignore[arg-type]
    )


def finished(key: str, token: str = "t1", *, expires_in: float | None = 60.0) -> Entry:
    """An ``ok`` record of ``key`` finished now, expiring ``expires_in`` seconds from now (never
    if None)."""
    now = time.time()
    return Entry(
        key,
        "ok",
        "fp",
        "me/m/1/1",
        token,
        1,
        now - 1,
        ttl=expires_in,
        finished_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        payload=b"v",
    )
