"""The store interface: a few atomic primitives, and nothing about what records mean.

Every rule of what a call does (who may claim, what an abandoned claim becomes, what a replay
returns) lives once, in ``idemfn._engine``, above these primitives; a store only has to make each
primitive atomic. That is what lets one conformance suite hold every store to one behaviour.
How to write a store: ``Store``'s docstring.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from .. import _lease
from .._errors import StoreError
from .._lease import prunable_claim
from .._logs import UNREADABLE
from .._record import Entry, decode, encode
from .._signing import MAGIC, Signer, SigningKey, signer_for, unsigned
from .._wakeups import AsyncWatch, LocalAsyncWatch, LocalWatch, Watch
from ..events import log_fields
from .awaiting import to_the_end

__all__ = [
    "Corrupt",
    "Store",
    "TamperedRecord",
    "offload",
    "prunable",
    "removable_at",
    "remove_judged",
    "skip_corrupt",
]

#: What ``Store.scan(corrupt=...)`` calls with each record it cannot decode: (key, error).
Corrupt = Callable[[str, StoreError], None]

logger = logging.getLogger("idemfn")

T = TypeVar("T")


_SIGNED = MAGIC[:1]  # the first byte of every signed record, and of no unsigned one


class TamperedRecord(StoreError):
    """A record failed its signature check: it was never unpickled."""


def skip_corrupt(key: str, error: StoreError) -> None:
    """A ``corrupt=`` for sweeps (prune): log the record and go on."""
    logger.warning(
        "idemfn: skipping a record that cannot be read: %s",
        error,
        extra=log_fields(key, UNREADABLE),
    )


class Store(abc.ABC):
    """Where records live: the interface every store implements, and the one to subclass.

    A store keeps one entry per stored key and makes each primitive atomic; it knows nothing
    of what records mean. Who may claim, what an abandoned claim becomes and what a replay
    returns are decided once, above the store, which is what lets one conformance suite
    (``idemfn.testing.StoreContract``) hold every store to one behaviour. Every store is safe
    to share between threads (see each store for processes) and is a context manager that
    closes it on exit.

    Writing a store: implement ``claim``, ``get``, ``swap``, ``release``, ``delete`` and
    ``scan``; override ``prune``, ``renew``, ``time``, ``close`` and ``bytes_used`` where the
    backend does better. Async callers use the awaitable counterparts (``aclaim``, ``aget``,
    ``aswap``, ``arelease``, ``adelete``, ``atime``): by default they run the sync primitive
    in a worker thread, so that a store with only sync primitives never blocks an event loop;
    a store with a native async client overrides them. ``watch`` and ``awatch`` say when a
    waiter should look at a busy key again (by default: when this process settles it).
    The primitives take and return entries (``idemfn._record.Entry``,
    a named tuple that stores treat as a value): a store reads only an entry's ``key``,
    ``token``, ``status`` (``"processing"``, ``"ok"`` or ``"halted"``) and ``expires_at``
    (UNIX seconds on the store's clock; None: never), through ``entry.is_expired(now)``. It
    stores ``self.encode(entry)`` and reads stored bytes back with ``self.decode(key, data)``
    (``self.decoded`` in ``scan``), which sign and verify records when the store has signing
    keys (``self.sign_with(signing_key)`` in ``__init__``). It raises ``StoreError`` for
    whatever the backend fails with (``self.error(...)`` builds one naming the store, the
    action and the key), chaining the backend's error.

    Attributes:
        claims_first: True when ``claim`` costs no more than ``get`` (one round trip that
            writes nothing when a live record is there): a call then claims at once instead
            of reading first. Default False.
        signer: Signs the records this store writes and verifies those it reads; None
            (the default) when records are not signed, and signatures are not checked.
    """

    claims_first: ClassVar[bool] = False
    signer: Signer | None = None

    def sign_with(self, signing_key: SigningKey | None) -> None:
        """Set the keys this store signs and verifies records with; call it in ``__init__``.

        Args:
            signing_key: One key (``str`` or ``bytes``, 16 bytes or more), or a list of them
                whose first signs and every one verifies; None for the keys of
                ``IDEMFN_SIGNING_KEY`` when it is set, else no signing.

        Raises:
            TypeError: A key that is neither ``str`` nor ``bytes``.
            ValueError: A key shorter than 16 bytes, or an empty list.
        """
        self.signer = signer_for(signing_key, option=f"{type(self).__name__}(signing_key=...)")

    @abc.abstractmethod
    def claim(self, entry: Entry) -> Entry | None:
        """Insert ``entry`` under ``entry.key`` if the key has no live entry.

        An entry past its ``expires_at`` counts as absent and is replaced. Otherwise nothing
        is written and the live entry is returned. Atomic: of any number of racing claims on
        one key (threads, processes, machines), exactly one returns None.

        Args:
            entry: The entry to insert: a new ``processing`` claim (or, when a test writes a
                record directly, a finished one).

        Returns:
            None when ``entry`` was inserted; else the live entry found, unchanged.

        Raises:
            StoreError: The backend failed, or the live record found cannot be decoded.
        """

    @abc.abstractmethod
    def get(self, key: str) -> Entry | None:
        """The live entry of ``key``. Never writes.

        Args:
            key: The stored key.

        Returns:
            The entry, or None when the key has none or its entry has expired.

        Raises:
            StoreError: The backend failed, or the record cannot be decoded
                (``TamperedRecord``, a subclass, when it fails its signature check).
        """

    @abc.abstractmethod
    def swap(self, key: str, token: str, entry: Entry) -> bool:
        """Replace the entry of ``key`` with ``entry`` if it is ``processing`` with ``token``.

        This is the fence every write after a claim goes through (a finished record, a lease
        renewal, a takeover): atomically, it writes nothing when the claim was taken over,
        halted, finished or deleted meanwhile. A finished entry is never replaced.

        Args:
            key: The stored key.
            token: The token of the claim the caller holds.
            entry: The entry to write in its place.

        Returns:
            True if the entry was replaced; False if nothing was written.

        Raises:
            StoreError: The backend failed, or the write was refused by a copy of the fence
                that disagrees with the record (see ``check_fence``).
        """

    @abc.abstractmethod
    def release(self, key: str, token: str) -> bool:
        """Remove ``key``'s entry if it is ``processing`` with ``token``.

        Fenced like ``swap``: a claim that was taken over, halted or finished removes nothing.
        A call releases its key this way after a ``retry_on`` exception.

        Args:
            key: The stored key.
            token: The token of the claim the caller holds.

        Returns:
            True if the entry was removed; False if nothing was.

        Raises:
            StoreError: The backend failed.
        """

    @abc.abstractmethod
    def delete(self, key: str, token: str | None = None) -> bool:
        """Remove ``key``'s entry, whatever its status: ``forget``, never a claim's own write.

        Without a ``token`` it must not depend on decoding the record: a record that cannot
        be decoded is removed too (``idemfn forget --force KEY`` repairs a store that way).

        Args:
            key: The stored key.
            token: When given, remove the entry only if its token is this one (prune's way
                not to remove a record claimed again since it looked).

        Returns:
            With ``token``: True if the entry was removed. Without: True if a live entry was
            removed; False if there was none, or it had expired (removing it is tidying,
            not forgetting).

        Raises:
            StoreError: The backend failed.
        """

    @abc.abstractmethod
    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        """Every stored entry whose key starts with ``prefix``, expired ones included.

        Entries are read one at a time (payloads may be large); an entry removed while the
        scan runs may be left out. ``idemfn ls``, ``stats`` and ``prune`` are built on it.

        Args:
            prefix: A plain prefix of the stored keys (no wildcards); "" for every key.
            corrupt: Called as ``corrupt(key, error)`` with each record that cannot be
                decoded, which is then skipped, so that one bad record does not hide the
                others (``decoded`` does this for a store's loop). None: raise instead.

        Yields:
            The entries, in no promised order.

        Raises:
            StoreError: The backend failed, or (without ``corrupt``) a record cannot be
                decoded; the error names its key.
        """

    def renew(self, entry: Entry, lease: float) -> Entry | None:
        """Extend the lease of the live claim ``entry`` to ``lease`` seconds from now.

        The heartbeat thread calls this while the body runs. The lease is set on the store's
        clock (``lease_until``) and on this machine's monotonic clock (``lease_mono``), and
        every later read of the key (``get``, ``claim``'s answer, ``scan``) must see it. This
        default is a ``swap``; a store whose renewals must not wait for, or conflict with,
        a claim's other work overrides it (``PostgresStore``).

        Args:
            entry: The claim as the caller holds it.
            lease: Seconds from now.

        Returns:
            The renewed entry, or None when the claim is no longer live (fenced as ``swap``
            is).

        Raises:
            StoreError: The backend failed.
        """
        renewed = entry._replace(lease_until=self.time() + lease, lease_mono=_lease.clock() + lease)
        return renewed if self.swap(entry.key, entry.token, renewed) else None

    # Async primitives (issue 16): the sync ones, run in a worker thread unless overridden.

    async def aclaim(self, entry: Entry) -> Entry | None:
        """``claim``, awaitable. This default runs ``claim`` in a worker thread."""
        return await offload(self.claim, entry)

    async def aget(self, key: str) -> Entry | None:
        """``get``, awaitable. This default runs ``get`` in a worker thread."""
        return await offload(self.get, key)

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        """``swap``, awaitable. This default runs ``swap`` in a worker thread."""
        return await offload(self.swap, key, token, entry)

    async def arelease(self, key: str, token: str) -> bool:
        """``release``, awaitable. This default runs ``release`` in a worker thread."""
        return await offload(self.release, key, token)

    async def adelete(self, key: str, token: str | None = None) -> bool:
        """``delete``, awaitable. This default runs ``delete`` in a worker thread."""
        return await offload(self.delete, key, token)

    async def atime(self) -> float:
        """``time``, awaitable: inline for this machine's clock (the default ``time``), in a
        worker thread for a store whose ``time`` asks its server."""
        if type(self).time is Store.time:
            return self.time()
        return await offload(self.time)

    def watch(self, key: str) -> Watch:
        """What a sync caller waiting for busy ``key`` waits on between looks.

        This default is woken when a claim of this process settles the key; other processes'
        settles are seen by looking again (polling). A store whose server can tell every
        machine (pub/sub, ``LISTEN``) overrides it.

        Args:
            key: The stored key.

        Returns:
            A ``Watch``: a context manager whose ``wait(seconds)`` returns when the key may
            have settled, or after ``seconds``.
        """
        return LocalWatch(key)

    def awatch(self, key: str) -> AsyncWatch:
        """``watch`` for async callers: ``await watch.wait(seconds)`` never blocks the loop.

        Args:
            key: The stored key.

        Returns:
            An ``AsyncWatch`` (an async context manager).
        """
        return LocalAsyncWatch(key)

    def time(self) -> float:
        """The store's clock, which every time in its entries is on.

        This default is this machine's wall clock; a store shared by machines returns the
        server's, so that a client whose clock is skewed judges leases and expiry the same.

        Returns:
            The time, in UNIX seconds.
        """
        return time.time()

    def prune(self) -> int:
        """Remove expired entries, and claims whose lease ran out more than their ttl ago.

        A claim is removed only when its owner is gone by the rule a call applies (a live
        owner on this machine keeps it, whatever the clocks say), and only if the key still
        holds the very entry judged. Records that cannot be decoded are logged and skipped.
        This default scans every entry; a store with an index on expiry overrides it.

        Returns:
            How many entries were removed.

        Raises:
            StoreError: The backend failed.
        """
        now = self.time()
        removed = 0
        for entry in self.scan(corrupt=skip_corrupt):  # one at a time: payloads may be large
            if prunable(entry, now) and remove_judged(self, entry):
                removed += 1
        return removed

    def bytes_used(self) -> int | None:
        """How many bytes the store takes, on disk or in the server (``idemfn stats``).

        Returns:
            The size, or None when the store cannot tell (this default).
        """
        return None

    # (issue 15) For the idemfn command, which must not create a store where it only looks.
    @classmethod
    def _exists_at(cls, where: str | os.PathLike[str]) -> bool:
        """Whether a store of this class already exists at ``where`` (its path or URL), so that
        a look never creates one by opening it. True by default: a server store is there when
        its server answers. Raises ``OSError`` when it cannot tell."""
        return True

    def close(self) -> None:  # noqa: B027  # optional hook: most stores hold nothing to close
        """Release the store's connections and files; it reopens them if used again."""

    def encode(self, entry: Entry) -> bytes:
        """The bytes to store for ``entry``: checksummed, and signed when the store has keys.

        Args:
            entry: The entry to store.

        Returns:
            What to store; ``decode`` reads it back.
        """
        data = encode(entry)
        signer = self.signer
        return data if signer is None else signer.sign(data)

    def decode(self, key: str, data: object) -> Entry:
        """The entry stored as ``data`` for ``key``; nothing in a bad record is loaded.

        Args:
            key: The stored key the data was read from (a record copied from another key is
                refused).
            data: What the backend returned: ``bytes`` (or a ``memoryview``).

        Returns:
            The entry.

        Raises:
            StoreError: ``data`` is not a record this idemfn reads (damaged, another
                version's, another key's); the message names the key and the way out.
                ``TamperedRecord``, a subclass, when it fails its signature check.
        """
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
        """After a write fenced on ``token`` was refused, tell a lost claim from a bad fence.

        For stores that keep the claim's token beside the record (a column, a hash field) and
        fence writes on that copy, which no checksum covers: if the record itself is still
        the claim of ``token``, the copy is damaged, and returning False would leave a caller
        that judged the claim abandoned looking again forever (issue 14, review).

        Args:
            key: The stored key.
            token: The token the refused write was fenced on.
            fence: The copy of the token the store fences writes on, as read.
            data: The stored record, as read with it.

        Raises:
            StoreError: The record is still the claim of ``token`` but ``fence`` disagrees,
                or the record cannot be decoded.
        """
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
        """``decode``, for ``scan``'s loop: a bad record goes to ``corrupt`` instead.

        Args:
            key: The stored key the data was read from.
            data: The stored record.
            corrupt: ``scan``'s ``corrupt`` callback, or None.

        Returns:
            The entry, or None when it could not be decoded and went to ``corrupt``.

        Raises:
            StoreError: The record cannot be decoded and ``corrupt`` is None.
        """
        try:
            return self.decode(key, data)
        except StoreError as exc:
            if corrupt is None:
                raise
            corrupt(key, exc)
            return None

    def error(self, action: str, key: str, cause: BaseException | str) -> StoreError:
        """A ``StoreError`` that names this store, the action and the key; raise it.

        Args:
            action: What the store could not do, as a verb (``"claim"``, ``"read"``).
            key: The stored key (or, for a store-wide step, what it was done to).
            cause: The backend's error, or why in words.

        Returns:
            The error, reading ``<store> could not <action> <key>: <cause>``.
        """
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


async def offload(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread (the loop's default executor), with this context's
    variables: how async callers drive a store's sync primitives without blocking the loop.

    Cancelled (once or more), it still waits for the thread's call to end before the
    cancellation goes on: a claim still running in the thread must land (or fail) before the
    engine undoes it, or the undo would come first and the claim be left with no one to run
    it. (A sync primitive that hangs holds the cancellation up until it returns.)"""
    import asyncio
    import contextvars
    import functools

    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await to_the_end(loop.run_in_executor(None, call))


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
