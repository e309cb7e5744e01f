"""The store interface: a few atomic primitives, and nothing about what records mean.

Every rule of the contract (who may claim, what an abandoned claim becomes, what a replay
returns) lives once, in ``idemfn._engine``, above these primitives; a store only has to make each
primitive atomic. That is what lets one conformance suite hold every store to one behaviour.

Writing a store: subclass ``Store`` and implement ``claim``, ``get``, ``swap``, ``release``,
``delete`` and ``scan``; override ``prune``, ``time`` and ``close`` where the backend does
better. Translate the backend's own errors to ``StoreError`` (``self.error(...)`` builds one that
names the store and the key). Write an entry as ``self.encode(entry)`` and read stored bytes
with ``self.decode(key, data)``: they sign and verify records when the store has signing keys
(``self.sign_with(signing_key)`` in ``__init__``), and ``decode`` raises ``StoreError`` for
bytes that are not a record (``self.decoded`` in ``scan``, which passes them to its ``corrupt``
callback instead). Hold the store to ``idemfn.testing.StoreContract``.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import ClassVar

from .. import _lease
from .._errors import StoreError
from .._lease import prunable_claim
from .._record import Entry, decode, encode
from .._signing import MAGIC, Signer, SigningKey, signer_for, unsigned

__all__ = [
    "Corrupt",
    "Store",
    "TamperedRecord",
    "prunable",
    "removable_at",
    "remove_judged",
    "skip_corrupt",
]

#: What ``Store.scan(corrupt=...)`` calls with each record it cannot decode: (key, error).
Corrupt = Callable[[str, StoreError], None]

logger = logging.getLogger("idemfn")


_SIGNED = MAGIC[:1]  # the first byte of every signed record, and of no unsigned one


class TamperedRecord(StoreError):
    """A record failed its signature check: it was never unpickled."""


def skip_corrupt(key: str, error: StoreError) -> None:
    """A ``corrupt=`` for sweeps (prune): log the record and go on."""
    logger.warning("idemfn: skipping a record that cannot be read: %s", error)


class Store(abc.ABC):
    """Where records live. Safe to share between threads; see each store for processes."""

    #: True when ``claim`` costs no more than ``get`` (one round trip that writes nothing
    #: when a live record is there): the engine then claims at once instead of reading first.
    claims_first: ClassVar[bool] = False

    #: Signs the records this store writes and verifies those it reads (None: records are not
    #: signed, and signatures are not checked).
    signer: Signer | None = None

    def sign_with(self, signing_key: SigningKey | None) -> None:
        """Sign and verify records with ``signing_key`` (one key, or a list whose first key
        signs), or with ``IDEMFN_SIGNING_KEY`` when it is None and that is set."""
        self.signer = signer_for(signing_key, option=f"{type(self).__name__}(signing_key=...)")

    @abc.abstractmethod
    def claim(self, entry: Entry) -> Entry | None:
        """Insert ``entry`` under ``entry.key`` if the key has no live entry, and return None.

        An entry past its ``expires_at`` counts as absent and is replaced. Otherwise nothing is
        written and the live entry is returned. Atomic: of any number of racing claims on one
        key, exactly one returns None.
        """

    @abc.abstractmethod
    def get(self, key: str) -> Entry | None:
        """The live entry of ``key``, or None (absent or expired). Never writes."""

    @abc.abstractmethod
    def swap(self, key: str, token: str, entry: Entry) -> bool:
        """Replace the entry of ``key`` with ``entry`` if it is ``processing`` with ``token``.

        This is the fence every write after a claim goes through: it returns False, writing
        nothing, when the claim was taken over, halted, finished or deleted meanwhile. A
        finished entry is never replaced.
        """

    @abc.abstractmethod
    def release(self, key: str, token: str) -> bool:
        """Remove ``key``'s entry if it is ``processing`` with ``token``; True if removed.

        Fenced like ``swap``: a claim that was taken over, halted or finished removes nothing.
        """

    @abc.abstractmethod
    def delete(self, key: str, token: str | None = None) -> bool:
        """Remove ``key``'s entry, whatever its status (only if its token is ``token``, when
        given: prune uses that not to remove a record claimed again since it looked); True if
        removed. This is ``forget``, never a write of a claim's owner."""

    @abc.abstractmethod
    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        """Every stored entry whose key starts with ``prefix``, expired ones included.

        A record that cannot be decoded raises ``StoreError`` naming its key; with ``corrupt``,
        it is passed to ``corrupt(key, error)`` and skipped instead, so that one bad record
        does not hide the others (``decoded`` does this for a store's loop).
        """

    def renew(self, entry: Entry, lease: float) -> Entry | None:
        """Extend the lease of the live claim ``entry`` to ``lease`` seconds from now (on the
        store's clock, and on this machine's lease clock); return the renewed entry, or None
        when the claim is no longer live (fenced as ``swap`` is). The heartbeat thread calls
        this; a store whose renewals must not wait for, or conflict with, a claim's other work
        overrides it (``PostgresStore``)."""
        renewed = entry._replace(lease_until=self.time() + lease, lease_mono=_lease.clock() + lease)
        return renewed if self.swap(entry.key, entry.token, renewed) else None

    def time(self) -> float:
        """The store's clock, in UNIX seconds. Stores shared by machines use the server's."""
        return time.time()

    def prune(self) -> int:
        """Remove expired entries, and claims whose lease ran out more than their ttl ago.

        Returns how many were removed.
        """
        now = self.time()
        removed = 0
        for entry in self.scan(corrupt=skip_corrupt):  # one at a time: payloads may be large
            if prunable(entry, now) and remove_judged(self, entry):
                removed += 1
        return removed

    def bytes_used(self) -> int | None:
        """How many bytes the store takes (on disk, or in the server), when it can tell."""
        return None

    def close(self) -> None:  # noqa: B027  # optional hook: most stores hold nothing to close
        """Release connections and files. The store reopens them if used again."""

    def encode(self, entry: Entry) -> bytes:
        """The bytes to store for ``entry``: signed when the store has signing keys."""
        data = encode(entry)
        signer = self.signer
        return data if signer is None else signer.sign(data)

    def decode(self, key: str, data: object) -> Entry:
        """The entry stored as ``data`` (bytes) for ``key``; ``StoreError`` naming the key when
        it is not a record this idemfn reads, ``TamperedRecord`` when it fails its signature
        check (nothing in it is loaded)."""
        if type(data) is not bytes:  # (the replay path: one check when it is)
            if not isinstance(data, (bytes, memoryview)):
                raise self.error("read", key, "the stored value is not an idemfn record")
            data = bytes(data)
        signer = self.signer
        if signer is not None:
            try:
                data = signer.verify(data)
            except ValueError as exc:
                raise self._tampered(
                    key,
                    str(exc),
                    "Either it was written without the signing keys this store has (signing_key="
                    " or IDEMFN_SIGNING_KEY; records from before signing was turned on are"
                    " unsigned), or someone changed it: ",
                ) from None
        elif data[:1] == _SIGNED:
            data = unsigned(data)  # no keys here: nothing to verify it with
        try:
            entry = decode(data)
        except ValueError as exc:
            raise self._corrupt("read", key, str(exc)) from None
        if entry.key != key:  # a record copied from another key (signed, it still verifies)
            if signer is not None:
                raise self._tampered(key, f"it is a copy of {entry.key!r}'s record", "")
            raise self._corrupt("read", key, f"it is {entry.key!r}'s record")
        return entry

    def _corrupt(self, action: str, key: str, why: str) -> StoreError:
        return self.error(
            action,
            key,
            f"the record is corrupt: {why}; nothing in it was loaded, and the body did not run."
            " Find out what damaged the store, then delete the record (`idemfn forget --force"
            f" {key}`), knowing that the next call runs the body again",
        )

    def check_fence(self, key: str, token: str, fence: object, data: object) -> None:
        """After a write fenced on ``token`` was refused: raise ``StoreError`` if the stored
        record (``data``) is still that claim, so that only the copy of its token that the
        store fences writes on (``fence``) disagrees. A caller that judged the claim abandoned
        could neither halt it nor take it over, and looked again forever (issue 14, review)."""
        entry = self.decode(key, data)
        if entry.status == "processing" and entry.token == token and fence != token:
            why = f"it is the claim of token {token!r}, but the fence kept beside it says {fence!r}"
            raise self._corrupt("update", key, why)

    def _tampered(self, key: str, why: str, cause: str) -> TamperedRecord:
        return TamperedRecord(
            f"{self!r}: the record for {key!r} failed its signature check ({why}) and is not"
            f" loaded. {cause}find out who can write to the store, then delete it"
            f" (`idemfn forget --force {key}`)",
            key=key,
        )

    def decoded(self, key: str, data: object, corrupt: Corrupt | None) -> Entry | None:
        """``decode``, for ``scan``: a corrupt record goes to ``corrupt`` (None is returned),
        or raises ``StoreError`` when ``corrupt`` is None."""
        try:
            return self.decode(key, data)
        except StoreError as exc:
            if corrupt is None:
                raise
            corrupt(key, exc)
            return None

    def error(self, action: str, key: str, cause: BaseException | str) -> StoreError:
        """A ``StoreError`` that names this store, the action and the key."""
        return StoreError(f"{self!r} could not {action} {key!r}: {cause}", key=key)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def removable_at(entry: Entry) -> float | None:
    """When prune may remove ``entry`` (None: never): when it expires, or for a claim, when
    its lease ran out ``ttl`` ago. Server stores hand this to the server's own expiry."""
    if entry.expires_at is not None:
        return entry.expires_at
    if entry.finished_at is None and entry.ttl is not None and entry.lease_until is not None:
        return entry.lease_until + entry.ttl
    return None


def remove_judged(store: Store, entry: Entry) -> bool:
    """Remove ``entry``, which prune read and judged, only if the key still holds it: a claim
    through ``release`` (fenced on it still being processing with its token), since a caller
    that halted it meanwhile kept the token, and removing that fresh halted record would let
    the body run again. A finished record is never rewritten under its token: ``delete``."""
    if entry.status == "processing":
        return store.release(entry.key, entry.token)
    return store.delete(entry.key, entry.token)


def prunable(entry: Entry, now: float) -> bool:
    """Whether prune removes ``entry``: expired, or a claim whose owner is gone (by the
    engine's rule: ``idemfn._lease``) and whose lease ran out more than its ttl ago."""
    if entry.is_expired(now):
        return True
    return entry.finished_at is None and prunable_claim(entry, now)
