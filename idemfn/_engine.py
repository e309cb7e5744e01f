"""The state machine: every rule of what a call does with a key, in one place.

(Over 600 lines on purpose: the decision table, the claim that settles it and the drivers are
one piece, read together.)

    (absent) --claim--> processing --complete--> ok
                            |------ halt ------> halted
                            |---- release ----> (absent)           retry_on, a task queue's retry
                            |-- owner gone, on_abandoned="halt" --> halted
                            '-- owner gone, on_abandoned="retry" -> processing (attempt + 1)
    ok, halted --expiry, forget, prune--> (absent)

``_deciding`` makes one decision from what the store holds and returns a ``Claim`` (run the
body), a ``Finished`` record (replay it) or ``Busy`` (a live owner has it). It, and the settling
of a claim, are written once as steps that yield store operations: ``drive`` runs them on the
store's sync primitives, ``adrive`` on its awaitable ones (see "Drivers"), so sync and async
callers follow one table. Every write after a claim goes through ``Store.swap`` or
``Store.release`` on the claim's token, fenced on the claim still being live, so a claim that was
taken over, halted or forgotten writes nothing.

This is also the low-level API for framework authors:

```python
outcome = idemfn.begin("emails:welcome:42", store=store, fingerprint="")
if isinstance(outcome, idemfn.Claim):
    with outcome:  # an exception inside halts (or releases) the claim
        receipt = send_welcome_email(42)
        outcome.complete(receipt)
else:
    receipt = outcome.replay()  # the recorded value, or the recorded exception
```
"""

from __future__ import annotations

import contextvars
import copy
import itertools
import logging
import os
import pickle
import time
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Final, TypeVar

from . import _lease, _owner
from ._errors import (
    AlreadyRunning,
    DeadlineExceeded,
    FingerprintMismatch,
    Halted,
    IdempotencyError,
    OwnershipLost,
    StoreError,
)
from ._heartbeat import heartbeat
from ._lease import abandoned_kind, abandoned_reason, utc_iso
from ._outcome import (
    PICKLE,
    NotLoadable,
    Serializer,
    describe_exception,
    replay_note,
    type_name,
)
from ._policy import Policy, deadline_timestamp
from ._queue_retry import is_retry_request, queue_will_retry
from ._record import Entry, Record
from ._steps import arun, run
from ._stores import Store, resolve_store
from ._stores.awaiting import to_the_end
from ._wakeups import AsyncWatch, Watch, settled
from .events import (
    ABANDONED,
    BUSY,
    CLAIMED,
    COMPLETED,
    DEADLINE_EXCEEDED,
    MISMATCH,
    OWNERSHIP_LOST,
    RELEASED,
    REPLAYED,
    STORE_ERROR,
    WAITED,
    Deferred,
    halted_reason,
    log_fields,
)
from .events import HALTED as HALTED_EVENT

__all__ = [
    "Busy",
    "Claim",
    "Finished",
    "abegin",
    "acomplete_or_log",
    "adecide",
    "adrive",
    "arun_in_transaction",
    "begin",
    "complete_or_log",
    "decide",
    "drive",
    "fork_generation",
    "report_refused",
    "run_in_transaction",
]

logger = logging.getLogger("idemfn")

R = TypeVar("R")
T = TypeVar("T")

PROCESSING: Final = "processing"
OK: Final = "ok"
HALTED: Final = "halted"

# Keys whose bodies run in the current context (thread or asyncio task): re-entering one of
# them from inside its own body must fail at once instead of waiting on itself.
_running: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "idemfn_running", default=frozenset()
)

# Claim tokens: a random per-process prefix and a counter. Unique across processes and
# machines, and far cheaper than a UUID per call. A forked child draws a new prefix.
_token_prefix = os.urandom(8).hex()
_token_counter = itertools.count(1)


def _new_token() -> str:
    return f"{_token_prefix}-{next(_token_counter)}"


# How many forks separate this process from the first: a Claim remembers the value of the
# process that claimed, so that a forked child can tell its parent's claims from its own.
_fork_generation = 0


def fork_generation() -> int:
    """How many forks separate this process from the first (a forked child's copy of a call
    in progress is not its own)."""
    return _fork_generation


def _reseed_tokens() -> None:
    global _token_prefix, _token_counter, _fork_generation
    _token_prefix = os.urandom(8).hex()
    _token_counter = itertools.count(1)
    _fork_generation += 1


os.register_at_fork(after_in_child=_reseed_tokens)

# The reason a claim's block left unsettled is halted with (idemfn.events.halted_reason reads it).
_INCOMPLETE: Final = "the claim's block ended without complete() or fail()"

_FIRST_POLL = 0.005  # seconds between looks at a busy key, doubling up to _MAX_POLL
_MAX_POLL = 0.25
_NEAR_POLL = 0.01  # at most, when the owner is another process here that the watch cannot hear


# Drivers. Everything the engine does with a store is written once, as steps (``idemfn._steps``)
# that yield store operations: tuples whose first item says which. ``drive`` runs them on the
# store's sync primitives, ``adrive`` on its awaitable ones; the decision table and the settling
# of claims know nothing of which.
_GET: Final = 0
_CLAIM: Final = 1
_SWAP: Final = 2
_RELEASE: Final = 3
_TIME: Final = 4
_TIME_OP: Final = (_TIME,)
# (_UNSTOPPABLE, op): run op to its end even when the async caller is cancelled meanwhile, then
# raise the cancellation: the steps an interrupted call takes to leave the store as it should
# be (undo its claim, write its outcome again) must not be cut short by a second cancellation.
_UNSTOPPABLE: Final = 5

Op = tuple[Any, ...]
Steps = Generator[Op, Any, T]


def _run(store: Store, op: Op) -> Any:
    kind = op[0]
    if kind == _SWAP:
        return store.swap(op[1], op[2], op[3])
    if kind == _TIME:
        return store.time()
    if kind == _CLAIM:
        return store.claim(op[1])
    if kind == _GET:
        return store.get(op[1])
    if kind == _UNSTOPPABLE:
        return _run(store, op[1])
    return store.release(op[1], op[2])


async def _arun(store: Store, op: Op) -> Any:
    kind = op[0]
    if kind == _SWAP:
        return await store.aswap(op[1], op[2], op[3])
    if kind == _TIME:
        return await store.atime()
    if kind == _CLAIM:
        return await store.aclaim(op[1])
    if kind == _GET:
        return await store.aget(op[1])
    if kind == _UNSTOPPABLE:
        return await to_the_end(_arun(store, op[1]))
    return await store.arelease(op[1], op[2])


def drive(store: Store, steps: Steps[T]) -> T:
    """Run ``steps`` to their end on ``store``'s sync primitives; return what they return."""
    return run(steps, _run, store)


async def adrive(store: Store, steps: Steps[T]) -> T:
    """Run ``steps`` to their end on ``store``'s awaitable primitives, never blocking the loop."""
    return await arun(steps, _arun, store)


class Finished:
    """A key's finished record, as ``begin`` returns it: the call must not run again.

    ``replay()`` returns the recorded value or raises the recorded exception; ``record`` says
    what the record holds without loading the value. Made by ``begin``, not by hand.

    Attributes:
        entry: The stored entry (``idemfn._record.Entry``): status, times, owner, payload.
        serializer: How the payload is read back (the policy's ``serializer``).
    """

    __slots__ = ("entry", "serializer")

    def __init__(self, entry: Entry, serializer: Serializer = PICKLE) -> None:
        self.entry = entry
        self.serializer = serializer

    @property
    def record(self) -> Record:
        """The finished record as an ``idemfn.Record``: status, times, attempt, and for a halted
        key its reason and exception type; its value is not loaded."""
        return self.entry.record()

    def replay(self) -> Any:
        """The call's outcome again, as a later call of an ``@idempotent`` function gets it.

        Returns:
            A fresh copy of the recorded value (status ``ok``).

        Raises:
            Exception: The recorded exception, rebuilt, with a note saying it was replayed
                (status ``halted``, when it was stored and still loads).
            Halted: A halted key whose exception was not stored or no longer loads, or whose
                owner died mid-call; its ``reason`` says which.
            StoreError: The recorded value no longer loads (its class moved or changed):
                forget the key to run the call again.
        """
        entry = self.entry
        if entry.status == OK:
            payload: bytes = entry.payload  # type: ignore[assignment]  # ok: never None
            try:
                if payload[:1] == b"\x80" and self.serializer.unpickles:  # the common case
                    return pickle.loads(payload)
                return self.serializer.load(payload)
            except Exception as exc:
                raise StoreError(
                    f"the recorded value of key {entry.key!r} could not be loaded"
                    f" ({type(exc).__name__}: {exc}); forget the key to run the call again",
                    key=entry.key,
                ) from exc
        if entry.payload is not None:
            try:
                recorded = self.serializer.load(entry.payload)
            except Exception:  # its class moved or changed since: replay it as Halted
                logger.warning(
                    "idemfn: the exception recorded for %r no longer loads",
                    entry.key,
                    extra=log_fields(entry.key, REPLAYED),
                )
            else:
                if isinstance(recorded, Exception):
                    _add_note(recorded, replay_note(entry.key, entry.finished_at))
                    raise recorded
        raise halted_error(entry)

    def __repr__(self) -> str:
        return f"<Finished {self.entry.key!r} {self.entry.status}>"


def halted_error(entry: Entry) -> Halted:
    what = f" ({entry.exc_type}: {entry.message})" if entry.exc_type else ""
    return Halted(
        f"the call for key {entry.key!r} halted{what}: {entry.reason}. A side effect may have"
        " happened: check it, then forget the key to allow another run",
        key=entry.key,
        reason=entry.reason or "halted",
        exc_type=entry.exc_type,
        traceback=entry.traceback,
    )


def _add_note(exc: BaseException, note: str) -> None:
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined]  # PEP 678; add_note is 3.11+
        except AttributeError:
            return
    notes.append(note)


class Busy:
    """A live owner holds the key; the driver may wait and look again."""

    __slots__ = ("entry",)

    def __init__(self, entry: Entry) -> None:
        self.entry = entry

    def error(self, note: str = "") -> AlreadyRunning:
        entry = self.entry
        return AlreadyRunning(
            f"key {entry.key!r} is being run by {entry.owner} since {utc_iso(entry.started_at)}"
            f"{note}; retry later, or pass wait= to wait for its outcome",
            key=entry.key,
            owner=entry.owner,
            started_at=datetime.fromtimestamp(entry.started_at, timezone.utc),
        )


class Claim:
    """This caller owns the key, as ``begin`` returns it: run the work, then settle the claim.

    Settle it exactly once: ``complete(value)`` records the outcome ``ok``; ``fail(exc)``
    records the exception ``halted`` (or releases the key for a ``retry_on`` exception);
    ``halt(exc)`` and ``release()`` do one of those whatever the policy says. Until then a
    heartbeat thread renews the claim's lease. Use it as a context manager:

    ```python
    step = idemfn.begin("emails:welcome:42", store=store)
    if isinstance(step, idemfn.Claim):
        with step:  # an exception escaping the block settles the claim as fail() does
            receipt = send_welcome_email(42)
            step.complete(receipt)
    else:
        receipt = step.replay()
    ```

    Inside the block the key counts as running in this context: re-entering it raises
    ``AlreadyRunning`` at once. A block that ends without settling halts the claim. A claim
    dropped unsettled stops being renewed, and is judged abandoned once its lease runs out.
    In a child process forked while it is held, settling records nothing: the claim is the
    parent's. Made by ``begin``, not by hand.

    Attributes:
        store: The store the claim is held in.
        entry: The stored claim (``idemfn._record.Entry``, for store authors), updated by
            each renewal; internal.
        policy: The ``Policy`` the claim was made with.
        function: The decorated function this is a call of (set by ``@idempotent``), or None;
            a task queue's retry releases the key only for its own function's exception.
        renew_at: When the heartbeat renews the lease next (``time.monotonic()``); internal.
        started: When the claim was made (``time.monotonic()``); internal.
    """

    __slots__ = (
        "__weakref__",
        "_context_token",
        "_generation",
        "_lost",
        "_settled",
        "_transactional",
        "_uncommitted",
        "entry",
        "function",
        "policy",
        "renew_at",
        "started",
        "store",
    )

    def __init__(self, store: Store, entry: Entry, policy: Policy) -> None:
        self.store = store
        self.entry = entry
        self.policy = policy
        # The decorated function this is a call of (set by @idempotent): a task queue retries
        # an exception only when it escapes the task's own function (see _queue_retry).
        self.function: object = None
        self._settled = False
        self._lost = False
        # transactional=True: the ok record goes into the body's transaction (run_in_transaction),
        # and counts only once that commits; _uncommitted while it has not.
        self._transactional = False
        self._uncommitted = False
        self._generation = _fork_generation  # a forked child's copy is not its own
        self._context_token: contextvars.Token[frozenset[str]] | None = None
        self.started = time.monotonic()  # (the body's time, for events)
        self.renew_at = self.started + policy.lease / 3
        heartbeat.add(self)

    @property
    def key(self) -> str:
        """The full stored key this claim holds."""
        return self.entry.key

    @property
    def token(self) -> str:
        """This claim's token: every write of the claim is fenced on it (a claim taken over
        gets a new one, so the old owner's writes fail with ``OwnershipLost``)."""
        return self.entry.token

    @property
    def attempt(self) -> int:
        """Which attempt at the key this is: 1, then one more for each takeover of an
        abandoned claim (``on_abandoned="retry"``)."""
        return self.entry.attempt

    def __repr__(self) -> str:
        state = "settled" if self._settled else ("lost" if self._lost else "live")
        return f"<Claim {self.key!r} attempt={self.attempt} {state}>"

    # Called by the heartbeat thread, until the outcome is written: serialising a large value
    # can outlast the lease, and a lapsed lease would hand a live claim to another caller.
    def renew(self) -> bool:
        """Renew the claim's lease (the heartbeat thread calls this; a caller need not).

        A store error is logged and retried soon. A claim that was taken over or halted
        meanwhile is marked lost, and its outcome will not be recorded.

        Returns:
            True while the claim is held (renew it again), False once it is lost.
        """
        self.renew_at = time.monotonic() + self.policy.lease / 3
        e = self.entry
        try:
            renewed = self.store.renew(e, self.policy.lease)
        except StoreError as exc:
            logger.warning(
                "idemfn: could not renew the lease of %r (will retry): %s",
                e.key,
                exc,
                extra=log_fields(e.key, STORE_ERROR),
            )
            self.renew_at = time.monotonic() + min(1.0, self.policy.lease / 10)
            if self.policy.observer.live:
                self._report_renewal(STORE_ERROR, detail=str(exc), error=exc)
            return True
        if renewed is not None:
            self.entry = renewed
            return True
        if not self._settled:  # (once settling, a failed renewal is the outcome written)
            self._lost = True
            logger.warning(
                "idemfn: the claim on %r was taken over or halted while its body ran",
                e.key,
                extra=log_fields(e.key, OWNERSHIP_LOST),
            )
            if self.policy.observer.live:
                self._report_renewal(OWNERSHIP_LOST, owner=e.owner, duration=self._body_time())
        return False

    def _report_renewal(self, name: str, **fields: Any) -> None:
        # On the heartbeat thread, which renews every claim of the store: a handler's
        # SystemExit or KeyboardInterrupt must not end it (every live claim would then look
        # abandoned once its lease ran out).
        try:
            self._report(name, reason="renew", **fields)
        except BaseException:
            logger.exception(
                "idemfn: an event handler interrupted the heartbeat's report on %r; ignored",
                self.key,
                extra=log_fields(self.key, name),
            )

    def _body_time(self) -> float:
        return time.monotonic() - self.started

    def _fenced_out(self, when: str) -> OwnershipLost:
        """The ``OwnershipLost`` of a settling write fenced out (reported ``ownership_lost``)."""
        lost = OwnershipLost(
            f"the claim on key {self.key!r} was taken over or halted by another caller {when}",
            key=self.key,
        )
        if self.policy.observer.live:
            self._report(OWNERSHIP_LOST, reason="settle", duration=self._body_time(), error=lost)
        return lost

    def _report(
        self,
        name: str,
        duration: float | None = None,
        reason: str | None = None,
        detail: str | None = None,
        owner: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Emit the event ``name`` about this claim (when some handler listens)."""
        entry = self.entry
        self.policy.observer.emit(
            name, self.store, entry.key, entry.attempt, duration, reason, detail, owner, None, error
        )

    def _report_outcome(self, entry: Entry, cause: BaseException | None) -> None:
        """Emit ``completed`` or ``halted`` for the outcome ``entry`` just recorded."""
        if entry.status == OK:
            self._report(COMPLETED, duration=self._body_time())
        else:
            self._report(
                HALTED_EVENT,
                duration=self._body_time(),
                reason=halted_reason(entry.reason, entry.exc_type),
                detail=entry.reason,
                error=cause,
            )

    def _settling(self) -> bool:
        """Start settling the claim; False (settle nothing) in a forked child of its owner."""
        if self._generation != _fork_generation:
            # A child forked inside the body, unwinding (sys.exit) or returning: only the
            # process that claimed may settle the claim, or its parent would lose it.
            logger.debug(
                "idemfn: a forked child leaves its parent's claim on %r",
                self.key,
                extra=log_fields(self.key, "forked"),
            )
            return False
        if self._settled:
            raise RuntimeError(f"the claim on {self.key!r} is already settled")
        self._settled = True
        return True

    # Settling. Each way to settle is written once, as steps (a generator of store operations,
    # see "Drivers" below) that the sync method and its async twin drive.

    def _writing(self, entry: Entry, cause: BaseException | None = None) -> Steps[None]:
        # The ok record of a transactional body is written in the body's transaction: until it
        # commits, the lease stays renewed (a slow COMMIT must not look abandoned), and if it
        # does not commit the claim is settled again (run_in_transaction).
        pending = self._transactional and entry.status == OK
        self._uncommitted = pending
        try:
            written = yield (_SWAP, entry.key, self.entry.token, entry)
        except Exception:
            raise
        except BaseException as interrupted:
            if not pending:  # (a transactional write is undone with its transaction)
                yield from self._finishing(entry)
            raise interrupted
        finally:
            if not pending:
                heartbeat.discard(self)
        if not written:
            self._uncommitted = False  # fenced out: nothing of this claim's to settle again
            heartbeat.discard(self)
            raise self._fenced_out(
                "before this call finished; its outcome is not recorded"
            ) from cause
        if not pending:
            settled(entry.key)
            if self.policy.observer.live:
                self._report_outcome(entry, cause)

    def _finishing(self, entry: Entry) -> Steps[None]:
        """Finish writing ``entry`` after an interruption (a cancelled task, Ctrl-C) came
        before the write's answer: it may or may not have landed. An outcome is not lost to
        the interruption: if the claim is still there unwritten, write it again."""
        try:
            found = yield (_UNSTOPPABLE, (_GET, entry.key))
            if found is not None and found.token == entry.token and found.status == PROCESSING:
                yield (_UNSTOPPABLE, (_SWAP, entry.key, entry.token, entry))
        except BaseException as problem:  # interrupted again, or the store failed
            logger.warning(
                "idemfn: the outcome of %r may not be recorded: its write was interrupted, and"
                " writing it again failed (%s); the key stays processing until its lease runs"
                " out",
                entry.key,
                type(problem).__name__,
                extra=log_fields(entry.key, STORE_ERROR),
            )
        else:
            settled(entry.key)
            if self.policy.observer.live:
                self._report_outcome(entry, None)

    def _finished_entry(self, status: str, **fields: Any) -> Steps[Entry]:
        try:
            now = yield _TIME_OP
        except Exception:
            raise
        except BaseException as interrupted:
            if self._transactional:  # its record is written in the body's transaction
                raise
            # Interrupted as it read the store's clock (a cancelled task, Ctrl-C), the claim is
            # settled already: write the outcome all the same, timed on this machine's clock
            # (its times only say when it expires), then let the interruption go on.
            entry = self._entry_at(time.time(), status, **fields)
            try:
                yield from self._finishing(entry)
            finally:
                heartbeat.discard(self)
            raise interrupted from None
        return self._entry_at(now, status, **fields)

    def _entry_at(self, now: float, status: str, **fields: Any) -> Entry:
        e = self.entry
        ttl = self.policy.ttl
        return Entry(
            e.key,
            status,
            e.fingerprint,
            e.owner,
            e.token,
            e.attempt,
            e.started_at,
            ttl=ttl,
            finished_at=now,
            expires_at=None if ttl is None else now + ttl,
            **fields,
        )

    def _completing(self, value: object) -> Steps[None]:
        if is_retry_request(value):
            yield from self._releasing(why="retry_request")
            return
        if not self._settling():
            return
        try:
            payload = self.policy.serializer.dump_value(value)
        except NotLoadable as problem:
            # It serialises but does not load back: recorded ok, every replay for the whole
            # ttl would fail. The body ran: halt with how to fix the type, return its value.
            entry = yield from self._finished_entry(
                HALTED, reason=str(problem), exc_type=None, message=None
            )
            yield from self._writing(entry, problem)
            logger.error(
                "idemfn: key %r halted: %s", self.key, problem, extra=log_fields(self.key, HALTED)
            )
            return
        except BaseException as problem:
            # Never leave the record processing: record why there is no value, then raise.
            kind = type_name(type(value))
            if isinstance(problem, Exception):
                reason = (
                    f"the call returned a {kind}, which could not be stored"
                    f" ({type(problem).__name__}: {problem})"
                )
            else:
                reason = f"interrupted by {type_name(type(problem))} while storing the result"
            entry = yield from self._finished_entry(
                HALTED, reason=reason, exc_type=None, message=None
            )
            yield from self._writing(entry, problem)
            logger.error(
                "idemfn: key %r halted: %s", self.key, reason, extra=log_fields(self.key, HALTED)
            )
            if not isinstance(problem, Exception):
                raise
            raise halted_error(entry) from problem
        yield from self._writing((yield from self._finished_entry(OK, payload=payload)))

    def _failing(self, exc: BaseException) -> Steps[None]:
        if isinstance(exc, self.policy.retry_on):
            yield from self._releasing(exc, why="retry_on")
        elif queue_will_retry(exc, self.function):
            yield from self._releasing(exc, why="queue_retry")
        else:
            yield from self._halting(exc)

    def _halting(self, exc: BaseException, reason: str | None = None) -> Steps[None]:
        if not self._settling():
            return
        try:
            described = describe_exception(exc, self.policy.serializer)
        except BaseException as problem:  # e.g. KeyboardInterrupt while pickling it
            reason = f"the call raised {type_name(type(exc))}, interrupted while storing it"
            entry = yield from self._finished_entry(
                HALTED, reason=reason, exc_type=type_name(type(exc))
            )
            yield from self._writing(entry)
            raise problem from exc
        entry = yield from self._finished_entry(
            HALTED,
            payload=described.payload,
            reason=reason or described.reason,
            exc_type=described.exc_type,
            message=described.message,
            traceback=described.traceback,
        )
        yield from self._writing(entry, exc)

    def _releasing(self, cause: BaseException | None = None, why: str = "released") -> Steps[None]:
        if not self._settling():
            return
        try:
            released = yield (_RELEASE, self.key, self.entry.token)
        finally:
            heartbeat.discard(self)
        if not released:
            raise self._fenced_out("before this call could release it") from cause
        settled(self.key)
        if self.policy.observer.live:
            self._report(RELEASED, reason=why, duration=self._body_time(), error=cause)

    def _exiting(self, exc: BaseException | None) -> Steps[None]:
        if self._settled or self._generation != _fork_generation:
            return  # settled in the block, or a forked child's copy (see _settling)
        if exc is not None:
            try:
                yield from self._failing(exc)
            except StoreError as problem:
                # The body's own exception says what happened: raise that, not the store's.
                _not_recorded(self, problem, exc)
            return
        logger.warning(
            "idemfn: the claim block for %r ended without complete()",
            self.key,
            extra=log_fields(self.key, HALTED),
        )
        yield from self._halting(RuntimeError(_INCOMPLETE), _INCOMPLETE)

    def complete(self, value: object) -> None:
        """Record ``value`` as the key's outcome: the record becomes ``ok``, replayed after.

        A value that serialises but would not load back is not recorded ``ok`` (every replay
        would fail): the key is halted with the reason why, and this returns, so the caller
        still has its value. An ``rq.Retry`` is not an outcome: the key is released, so that
        the retried job runs again. In a child process forked while the claim is held, this
        records nothing: the claim is its parent's.

        Args:
            value: What the call returned.

        Raises:
            OwnershipLost: The claim was taken over, halted or forgotten meanwhile; nothing
                was recorded.
            Halted: The value could not be serialised; the key was recorded halted with why.
            RuntimeError: The claim was settled already.
            StoreError: The store failed to record it (the key stays processing until its
                lease runs out).
        """
        self._settle(self._completing(value))

    async def acomplete(self, value: object) -> None:
        """``complete`` for coroutines: the store's async primitives, never blocking the loop.

        Args:
            value: What the call returned.

        Raises:
            OwnershipLost: As ``complete``.
            Halted: As ``complete``.
            RuntimeError: As ``complete``.
            StoreError: As ``complete``.
        """
        await self._asettle(self._completing(value))

    def fail(self, exc: BaseException) -> None:
        """Settle the claim for a call that raised ``exc``, as ``@idempotent`` does.

        The key is released (``release``) when ``exc`` is in the policy's ``retry_on``, or a
        task queue (Celery, RQ) will run the call again after it; otherwise it is recorded
        ``halted`` with ``exc`` (``halt``). The caller re-raises ``exc`` afterwards.

        Args:
            exc: The exception the call raised.

        Raises:
            OwnershipLost: The claim was taken over, halted or forgotten meanwhile (chained
                from ``exc``); nothing was recorded.
            RuntimeError: The claim was settled already.
            StoreError: The store failed to record it.
        """
        self._settle(self._failing(exc))

    async def afail(self, exc: BaseException) -> None:
        """``fail`` for coroutines.

        Args:
            exc: The exception the call raised.

        Raises:
            OwnershipLost: As ``fail``.
            RuntimeError: As ``fail``.
            StoreError: As ``fail``.
        """
        await self._asettle(self._failing(exc))

    def halt(self, exc: BaseException) -> None:
        """Record the key ``halted`` with ``exc``, whatever ``retry_on`` says.

        Later calls replay ``exc`` itself when it could be stored and loads back (its type,
        message and traceback are kept either way), else ``Halted``.

        Args:
            exc: The exception to record.

        Raises:
            OwnershipLost: The claim was taken over, halted or forgotten meanwhile.
            RuntimeError: The claim was settled already.
            StoreError: The store failed to record it.
        """
        self._settle(self._halting(exc))

    async def ahalt(self, exc: BaseException) -> None:
        """``halt`` for coroutines.

        Args:
            exc: The exception to record.

        Raises:
            OwnershipLost: As ``halt``.
            RuntimeError: As ``halt``.
            StoreError: As ``halt``.
        """
        await self._asettle(self._halting(exc))

    def release(self, cause: BaseException | None = None) -> None:
        """Delete the claim without recording anything, so that the next call runs again.

        Args:
            cause: The exception that made the call release the key, if any: an
                ``OwnershipLost`` raised here is chained from it.

        Raises:
            OwnershipLost: The claim was taken over, halted or forgotten meanwhile.
            RuntimeError: The claim was settled already.
            StoreError: The store failed to delete it.
        """
        self._settle(self._releasing(cause))

    async def arelease(self, cause: BaseException | None = None) -> None:
        """``release`` for coroutines.

        Args:
            cause: The exception that made the call release the key, if any.

        Raises:
            OwnershipLost: As ``release``.
            RuntimeError: As ``release``.
            StoreError: As ``release``.
        """
        await self._asettle(self._releasing(cause))

    def _settle(self, steps: Steps[None]) -> None:
        try:
            drive(self.store, steps)
        except StoreError as problem:
            self._store_failed(problem)
            raise

    async def _asettle(self, steps: Steps[None]) -> None:
        try:
            await adrive(self.store, steps)
        except StoreError as problem:
            self._store_failed(problem)
            raise

    def _store_failed(self, problem: StoreError) -> None:
        """Report ``store_error`` (reason ``settle``): the store failed to settle the claim."""
        if self.policy.observer.live:
            self._report(STORE_ERROR, reason="settle", detail=str(problem), error=problem)

    def __enter__(self) -> Claim:
        """Mark the key as running in this context (re-entering it raises at once)."""
        self._context_token = _running.set(_running.get() | {self.key})
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Settle a claim the block left unsettled: an escaping exception as ``fail()`` does
        (halted, or released for a ``retry_on`` exception); a block that ends without settling
        halts the key and logs a warning."""
        self._leave_context()
        if not self._settled:  # (the common case, settled in the block: no steps to drive)
            drive(self.store, self._exiting(exc))

    async def __aenter__(self) -> Claim:
        """``__enter__``, for ``async with``."""
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``__exit__`` for ``async with``, on the store's async primitives: a body that was
        cancelled (``CancelledError``, a ``BaseException``) is halted."""
        self._leave_context()
        if not self._settled:
            await adrive(self.store, self._exiting(exc))

    def _leave_context(self) -> None:
        if self._context_token is not None:
            _running.reset(self._context_token)
            self._context_token = None


def run_in_transaction(
    claim: Claim, transaction: AbstractContextManager[object], body: Callable[[], R]
) -> R:
    """Run ``body`` for ``claim`` inside ``transaction`` (the store's ``transaction(key)``, which
    writes the key's ``ok`` record in it), so that the body's database writes and the record
    commit together, or neither does (``transactional=True``).

    Whatever keeps the transaction from committing is settled as an exception of the body: the
    body's own exception, a failure to write the record, or an error at COMMIT (a deferred
    constraint, a serialization failure). Nothing of the transaction was written, but the body
    ran, and what it did outside the database may have happened: the key is halted with that
    error, or released when it is in ``retry_on``, at once (issue 14: a failed COMMIT used to
    leave the key processing until its lease ran out). A transaction that cannot even start
    releases the key: nothing ran. The error is raised as itself. A body that returns a request
    to run it again (an ``rq.Retry``) has its transaction rolled back, then its key released.
    """
    claim._transactional = True
    started = False
    with claim:
        try:
            with transaction:
                started = True
                value = body()
                if is_retry_request(value):
                    raise _RunAgain  # the task runs the body again: its writes must not stay
                claim.complete(value)
        except BaseException as exc:
            if drive(claim.store, _after_transaction(claim, exc, started)):
                return value
            raise
        _committed(claim)
    return value


async def arun_in_transaction(
    claim: Claim,
    transaction: AbstractAsyncContextManager[object],
    body: Callable[[], Awaitable[R]],
) -> R:
    """``run_in_transaction`` for an ``async def`` body, in the store's ``atransaction(key)``."""
    claim._transactional = True
    started = False
    async with claim:
        try:
            async with transaction:
                started = True
                value = await body()
                if is_retry_request(value):
                    raise _RunAgain
                await claim.acomplete(value)
        except BaseException as exc:
            if await adrive(claim.store, _after_transaction(claim, exc, started)):
                return value
            raise
        _committed(claim)
    return value


class _RunAgain(Exception):
    """Rolls back the transaction of a body that returned a request to run it again (an
    ``rq.Retry``): released, its key runs the body again, so its writes must not commit."""


def _committed(claim: Claim) -> None:
    heartbeat.discard(claim)  # committed: the outcome is recorded
    claim._uncommitted = False
    settled(claim.key)
    if claim.policy.observer.live:
        claim._report(COMPLETED, duration=claim._body_time())


def _after_transaction(claim: Claim, exc: BaseException, started: bool) -> Steps[bool]:
    """Settle ``claim`` once ``exc`` escaped its transaction (``started``: it began, and the
    body ran in it). True: the call returns the body's value after all (a request to run it
    again, now released; an ok record that committed although COMMIT's answer was lost)."""
    if isinstance(exc, _RunAgain):  # rolled back: as for retry_on, the key is released
        yield from _releasing_or_log(claim, None, "retry_request")
        return True
    if not started:  # no transaction, no body: the next call runs it
        yield from _releasing_or_log(claim, exc, "not_started")
        return False
    if not claim._uncommitted:
        return False
    # The ok record went down with the transaction: settle the claim again, for exc. It may
    # have committed after all, when only COMMIT's answer was lost: then the value is returned
    # (an interrupt is still raised; the record stays ok).
    claim._settled = claim._uncommitted = False
    # Its events wait until it is known whether the transaction committed after all (then the
    # call completed: an ownership_lost on the way would be false).
    policy = claim.policy
    held: Deferred | None = None
    if policy.observer.live:
        claim.policy, held = _holding(policy)
    try:
        yield from claim._failing(exc)
    except StoreError as problem:
        _not_recorded(claim, problem, exc)
    except OwnershipLost as lost:
        try:
            entry = yield (_GET, claim.key)
        except StoreError:
            raise lost from lost.__cause__
        if entry is not None and entry.status == OK and entry.token == claim.token:
            logger.warning(
                "idemfn: the COMMIT of key %r failed (%s), yet its ok record is there: the"
                " transaction committed",
                claim.key,
                type(exc).__name__,
                extra=log_fields(claim.key, COMPLETED),
            )
            if held is not None:
                held.pending.clear()
                held.emit(
                    COMPLETED,
                    claim.store,
                    claim.key,
                    attempt=claim.attempt,
                    duration=claim._body_time(),
                )
            return isinstance(exc, Exception)
        raise lost
    finally:
        claim.policy = policy
        if held is not None:
            held.flush()
    return False


def _holding(policy: Policy) -> tuple[Policy, Deferred]:
    """A copy of ``policy`` whose events are held (its ``Deferred``) until flushed to
    ``policy``'s observer: for steps whose events may not stand, or must come later."""
    held = copy.copy(policy)
    held.observer = deferred = Deferred(policy.observer)
    return held, deferred


def _releasing_or_log(claim: Claim, cause: BaseException | None, why: str) -> Steps[None]:
    try:
        yield from claim._releasing(cause, why)
    except StoreError as problem:
        _not_recorded(claim, problem, cause)


def complete_or_log(claim: Claim, value: object) -> None:
    """``claim.complete(value)``, for the decorator: when the store fails to record the outcome
    of a body that ran, the caller still gets its value, and the failure is logged."""
    try:
        drive(claim.store, claim._completing(value))
    except StoreError as problem:
        _not_recorded(claim, problem, None)


async def acomplete_or_log(claim: Claim, value: object) -> None:
    """``complete_or_log`` for the async wrapper. A task cancelled while its outcome is being
    written writes it again if it did not land (``Claim._finishing``), then is cancelled."""
    try:
        await adrive(claim.store, claim._completing(value))
    except StoreError as problem:
        _not_recorded(claim, problem, None)


def _not_recorded(claim: Claim, problem: StoreError, exc: BaseException | None) -> None:
    key = claim.key
    what = "the value is returned" if exc is None else f"its {type(exc).__name__} is raised"
    message = (
        f"idemfn: the outcome of key {key!r} could not be recorded ({problem}); {what}, and"
        " the key stays processing until its lease runs out, then halts (or, with"
        ' on_abandoned="retry", runs again)'
    )
    logger.error("%s", message, extra=log_fields(key, STORE_ERROR))
    claim._store_failed(problem)
    if exc is not None:
        _add_note(exc, message)


def reentered(busy: AlreadyRunning) -> bool:
    """Whether ``busy`` was raised for a call that re-entered its own key from its body."""
    return busy.key in _running.get()


def _new_claim(key: str, fingerprint: str, attempt: int, now: float, policy: Policy) -> Entry:
    return Entry(
        key,
        PROCESSING,
        fingerprint,
        _owner.current(),
        _new_token(),
        attempt,
        now,
        lease_until=now + policy.lease,
        ttl=policy.ttl,
        lease_mono=_lease.clock() + policy.lease,
    )


def _past_deadline(key: str, deadline: float, state: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"key {key!r} {state} and its deadline {utc_iso(deadline)} has passed: the call did not"
        " start",
        key=key,
    )


Due = Callable[[], "float | None"]  # when a call must no longer start; called only if it would


def _check_fingerprint(entry: Entry, key: str, fingerprint: str) -> None:
    if fingerprint and entry.fingerprint and entry.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"key {key!r} was first used with other arguments (fingerprint"
            f" {entry.fingerprint[:12]}…, this call {fingerprint[:12]}…). Use another key"
            " for other arguments, or fingerprint=[...] to compare only some of them",
            key=key,
            stored=entry.fingerprint,
            given=fingerprint,
        )


def _reads_first(store: Store, deadline: Due | None) -> bool:
    """Whether a decision reads the key before claiming it.

    Replay first: a finished key costs one read and no write. A store whose claim is as cheap
    as a read (one round trip that writes nothing over a live record) claims at once: a first
    call is then two round trips, claim and complete. Not with a deadline: a finished record
    is replayed after it, so it must be looked at before the deadline."""
    return not store.claims_first or deadline is not None


def _report_replayed(store: Store, entry: Entry, policy: Policy) -> None:
    """Emit ``replayed`` for the finished ``entry`` (callers test ``observer.live`` first)."""
    policy.observer.emit(REPLAYED, store, entry.key, attempt=entry.attempt, status=entry.status)


def _reported(claim: Claim, abandoned: tuple[Entry, str] | None) -> Steps[None]:
    """Report ``claim``, just made: ``claimed`` (after ``abandoned``, for the takeover of
    ``abandoned``'s entry and reason). A handler's interrupt undoes the claim: no one would
    run it."""
    try:
        if abandoned is not None:
            entry, reason = abandoned
            _report_abandoned(claim.store, entry, claim.policy, reason, "taken_over")
        claim._report(CLAIMED)
    except BaseException:
        yield from _dropping(claim)
        raise


def _deciding(
    store: Store,
    key: str,
    fingerprint: str,
    policy: Policy,
    deadline: Due | None,
    entry: Entry | None,
) -> Steps[Claim | Finished | Busy]:
    """The decision table: one decision on ``key`` from what the store holds (``entry``, the
    first read's answer; None when nothing was there or nothing was read). Claim it (absent or
    expired), replay it (finished), halt or take over an abandoned claim (``on_abandoned``), or
    report a live owner (``Busy``)."""
    while True:
        if entry is None:
            now = yield _TIME_OP
            due = None if deadline is None else deadline()
            if due is not None and now > due:
                raise _past_deadline(key, due, "has no finished record")
            claimed = _new_claim(key, fingerprint, 1, now, policy)
            entry = yield from _undone_if_interrupted((_CLAIM, claimed), claimed, store, policy)
            if entry is None or entry.token == claimed.token:
                # (Its own claim: the client sent it again after its answer was lost, as
                # redis-py retries on a timeout, and the second try found the first's record.)
                claim = Claim(store, claimed, policy)
                if policy.observer.live:  # (steps only then: a first call pays nothing)
                    yield from _reported(claim, None)
                return claim
            continue
        _check_fingerprint(entry, key, fingerprint)
        if entry.status != PROCESSING:
            if policy.observer.live:
                _report_replayed(store, entry, policy)
            return Finished(entry, policy.serializer)
        if key in _running.get():
            raise Busy(entry).error(" (this call re-entered its own key from inside its body)")
        now = yield _TIME_OP
        reason = abandoned_reason(entry, now)
        if reason is None:
            return Busy(entry)
        if policy.on_abandoned == "retry":
            due = None if deadline is None else deadline()
            if due is not None and now > due:
                raise _past_deadline(key, due, f"was abandoned ({reason})")
            takeover = _new_claim(
                key, entry.fingerprint or fingerprint, entry.attempt + 1, now, policy
            )
            op = (_SWAP, key, entry.token, takeover)
            if (yield from _undone_if_interrupted(op, takeover, store, policy)):
                logger.warning(
                    "idemfn: key %r was abandoned (%s); running it again, attempt %d",
                    key,
                    reason,
                    takeover.attempt,
                    extra=log_fields(key, ABANDONED),
                )
                claim = Claim(store, takeover, policy)
                if policy.observer.live:
                    yield from _reported(claim, (entry, reason))
                return claim
        else:
            ttl = entry.ttl
            halted = Entry(
                key,
                HALTED,
                entry.fingerprint,
                entry.owner,
                entry.token,
                entry.attempt,
                entry.started_at,
                ttl=ttl,
                finished_at=now,
                expires_at=None if ttl is None else now + ttl,
                reason=f"abandoned: {reason}",
            )
            if (yield (_SWAP, key, entry.token, halted)):
                logger.warning(
                    "idemfn: key %r was abandoned and is now halted: %s",
                    key,
                    reason,
                    extra=log_fields(key, ABANDONED),
                )
                settled(key)
                if policy.observer.live:
                    _report_abandoned(store, entry, policy, reason, "halted")
                    policy.observer.emit(
                        HALTED_EVENT,
                        store,
                        key,
                        attempt=entry.attempt,
                        reason="abandoned",
                        detail=halted.reason,
                        owner=entry.owner,
                    )
                return Finished(halted, policy.serializer)
        entry = yield (_GET, key)  # another caller settled it first: look again


def _report_abandoned(store: Store, entry: Entry, policy: Policy, reason: str, became: str) -> None:
    policy.observer.emit(
        ABANDONED,
        store,
        entry.key,
        attempt=entry.attempt,
        reason=abandoned_kind(reason),
        detail=reason,
        owner=entry.owner,
        status=became,
    )


def _undone_if_interrupted(op: Op, claimed: Entry, store: Store, policy: Policy) -> Steps[Any]:
    """Run ``op``, which may write the claim ``claimed``. Interrupted (a cancelled task,
    Ctrl-C, an exception a signal handler raised: Huey's task timeout) before its answer came,
    or failed (a ``StoreError``: a timeout may come after the write landed), the claim may have
    been made with no one left to run it: undo it (a release of its own token, harmless if it
    never landed), so that the caller writes nothing."""
    try:
        return (yield op)
    except Exception:
        yield from _undoing(claimed, store, policy)
        raise
    except BaseException as interrupted:
        yield from _undoing(claimed, store, policy)
        raise interrupted from None


def _dropping(claim: Claim) -> Steps[None]:
    """Undo ``claim``, made for a caller interrupted before it got it (as its watch closed)."""
    claim._settled = True
    heartbeat.discard(claim)
    yield from _undoing(claim.entry, claim.store, claim.policy)


def _undoing(claimed: Entry, store: Store, policy: Policy) -> Steps[None]:
    """Release the claim ``claimed`` of an interrupted caller, whatever cancellations come
    meanwhile: nothing ran, so the next call must run the body."""
    key = claimed.key
    try:
        released = yield (_UNSTOPPABLE, (_RELEASE, key, claimed.token))
    except Exception as problem:  # its lease runs out: it is judged abandoned then
        logger.warning(
            "idemfn: could not undo the claim on %r of a call that could not go on (%s); it is"
            " judged abandoned once its lease runs out",
            key,
            problem,
            extra=log_fields(key, STORE_ERROR),
        )
    else:
        settled(key)
        if released and policy.observer.live:  # (not for a claim that never landed)
            policy.observer.emit(RELEASED, store, key, attempt=claimed.attempt, reason="undone")


def decide(
    store: Store, key: str, fingerprint: str, policy: Policy, deadline: Due | None = None
) -> Claim | Finished | Busy:
    """One decision on ``key`` (``_deciding``), on the store's sync primitives."""
    entry = store.get(key) if _reads_first(store, deadline) else None
    if entry is not None and entry.status != PROCESSING:  # a replay: no steps to drive
        _check_fingerprint(entry, key, fingerprint)
        if policy.observer.live:
            _report_replayed(store, entry, policy)
        return Finished(entry, policy.serializer)
    return drive(store, _deciding(store, key, fingerprint, policy, deadline, entry))


async def adecide(
    store: Store, key: str, fingerprint: str, policy: Policy, deadline: Due | None = None
) -> Claim | Finished | Busy:
    """One decision on ``key`` (``_deciding``), on the store's async primitives."""
    entry = await store.aget(key) if _reads_first(store, deadline) else None
    if entry is not None and entry.status != PROCESSING:
        _check_fingerprint(entry, key, fingerprint)
        if policy.observer.live:
            _report_replayed(store, entry, policy)
        return Finished(entry, policy.serializer)
    return await adrive(store, _deciding(store, key, fingerprint, policy, deadline, entry))


class _Waiter:
    """How long a caller still waits for a busy key (shared by the sync and async drivers)."""

    __slots__ = ("delay", "give_up_at", "started")

    def __init__(self, wait: float) -> None:
        self.started = time.monotonic()
        self.give_up_at = self.started + wait
        self.delay = _FIRST_POLL

    @staticmethod
    def looking(policy: Policy) -> Policy:
        """The policy to look at the key with while waiting: ``policy`` itself, unless some
        handler listens; then one whose events are held until ``waited`` (``_holding``)."""
        return _holding(policy)[0] if policy.observer.live else policy

    def report(
        self,
        store: Store,
        key: str,
        policy: Policy,
        decided: object,
        looking: Policy,
        ended_by: BaseException | None,
    ) -> None:
        """Emit ``waited`` (how long, and what the wait ended in: ``claimed``, ``replayed``,
        ``gave_up`` for ``AlreadyRunning``, ``failed`` for another error, ``cancelled`` for a
        cancellation or an interrupt), then the events of the decision it ended in; the claim
        it made reports to ``policy``'s observer from now."""
        if ended_by is not None:
            if isinstance(ended_by, AlreadyRunning):
                ended = "gave_up"
            elif isinstance(ended_by, Exception):
                ended = "failed"
            else:
                ended = "cancelled"
        elif isinstance(decided, Claim):
            ended = "claimed"
            decided.policy = policy
        else:  # (no exception: the wait ended in a decision)
            ended = "replayed"
        policy.observer.emit(
            WAITED, store, key, duration=time.monotonic() - self.started, status=ended
        )
        held = looking.observer
        if isinstance(held, Deferred):
            held.flush()

    def pause(self, busy: Busy, watch: Watch | AsyncWatch) -> float:
        """Seconds to wait on ``watch`` before looking again; raises ``AlreadyRunning`` when
        time is up. Looks back off up to 250 ms when the watch hears the owner settle; up to
        10 ms when it cannot (the owner is another process of this machine, on a store that
        only hears this process's settles)."""
        left = self.give_up_at - time.monotonic()
        if left <= 0:
            raise busy.error()
        pause = min(self.delay, left)
        self.delay = min(self.delay * 2, _MAX_POLL)
        if pause > _NEAR_POLL and not watch.hears_others:
            owner = busy.entry.owner
            if owner != _owner.current() and _owner.same_boot(owner):
                return _NEAR_POLL
        return pause


def begin(
    key: str,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    fingerprint: str = "",
    policy: Policy | None = None,
    deadline: datetime | float | None = None,
) -> Claim | Finished:
    """Claim ``key`` to run the call, or return its finished record to replay.

    The low-level API under ``@idempotent``, for framework authors: one decision on the key,
    waiting up to ``policy.wait`` while a live owner holds it. An abandoned claim (its owner
    died, or its lease ran out) is halted, or taken over, as ``policy.on_abandoned`` says.

    Args:
        key: The full stored key (a non-empty ``str``), used as given.
        store: The store: a ``Store``, a directory path or a store URL. Default None:
            ``IDEMFN_STORE`` if set, else the default ``DiskStore`` (see ``default_store``).
        fingerprint: Any string identifying the call's arguments, compared with the one
            recorded with the key. Default ``""``: no check.
        policy: The key's options (ttl, lease, wait, on_abandoned, retry_on, serializer).
            Default None: ``Policy()``.
        deadline: When the call must no longer start: an aware ``datetime`` or UNIX
            seconds. With no finished record and the deadline past, nothing is claimed.
            Default None: no deadline. A finished record is still returned after it.

    Returns:
        A ``Claim`` (this caller runs the call, then settles the claim), or a ``Finished``
        record (the call ran already: ``replay()`` it). A claim whose owner is gone comes
        back, under ``on_abandoned="halt"``, as a ``Finished`` whose ``replay()`` raises
        ``Halted``; under ``"retry"``, as a ``Claim`` of the next attempt.

    Raises:
        AlreadyRunning: A live owner holds the key and ``policy.wait`` ran out (at once when
            this context re-enters its own key).
        FingerprintMismatch: The key was first used with another fingerprint.
        DeadlineExceeded: The deadline passed before the call could start.
        StoreError: The store failed.
        TypeError: A ``key``, ``policy`` or ``deadline`` of the wrong type.
        ValueError: An empty or unstorable ``key``, a naive ``deadline``, or a ``store`` path
            or URL that names no store.
    """
    store, policy, due = _prepare(key, store, policy, deadline)
    return begin_with(store, key, fingerprint, policy, due)


async def abegin(
    key: str,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    fingerprint: str = "",
    policy: Policy | None = None,
    deadline: datetime | float | None = None,
) -> Claim | Finished:
    """``begin`` for coroutines, on the store's awaitable primitives: never blocks the loop.

    A live owner is waited for on the store's ``awatch``, woken when the owner settles.

    Args:
        key: The full stored key (a non-empty ``str``), used as given.
        store: The store: a ``Store``, a directory path or a store URL. Default None:
            ``IDEMFN_STORE`` if set, else the default ``DiskStore``.
        fingerprint: Any string identifying the call's arguments. Default ``""``: no check.
        policy: The key's options. Default None: ``Policy()``.
        deadline: When the call must no longer start: an aware ``datetime`` or UNIX seconds.
            Default None: no deadline.

    Returns:
        A ``Claim`` (run the call, then settle it) or a ``Finished`` record (``replay()`` it).

    Raises:
        AlreadyRunning: A live owner holds the key and ``policy.wait`` ran out.
        FingerprintMismatch: The key was first used with another fingerprint.
        DeadlineExceeded: The deadline passed before the call could start.
        StoreError: The store failed.
        TypeError: A ``key``, ``policy`` or ``deadline`` of the wrong type.
        ValueError: An empty or unstorable ``key``, a naive ``deadline``, or a ``store`` path
            or URL that names no store.
    """
    store, policy, due = _prepare(key, store, policy, deadline)
    return await abegin_with(store, key, fingerprint, policy, due)


def begin_with(
    store: Store,
    key: str,
    fingerprint: str,
    policy: Policy,
    deadline: Due | None,
    busy_is_final: bool = True,
) -> Claim | Finished:
    """``begin`` with its arguments already checked and resolved (the decorator's hot path).
    ``busy_is_final=False``: an ``AlreadyRunning`` raised is not reported (``busy``): the
    caller may still wait for the key (a task queue's retry), and reports it if it does not
    (``report_refused``)."""
    try:
        step = decide(store, key, fingerprint, policy, deadline)
        if not isinstance(step, Busy):
            return step
        if policy.wait <= 0:
            raise step.error()
        waiter = _Waiter(policy.wait)
        looking = waiter.looking(policy)
        decided: Claim | Finished | None = None
        ended_by: BaseException | None = None
        try:
            with store.watch(key) as watch:
                while True:  # watching, look again: a settle since the last look is not missed
                    step = decide(store, key, fingerprint, looking, deadline)
                    if not isinstance(step, Busy):
                        decided = step
                        break
                    watch.wait(waiter.pause(step, watch))
        except BaseException as problem:
            ended_by = problem
            if isinstance(decided, Claim):  # claimed, then interrupted as the watch closed
                drive(store, _dropping(decided))
            raise
        finally:
            if looking is not policy:
                try:
                    waiter.report(store, key, policy, decided, looking, ended_by)
                except BaseException:  # a handler's interrupt: no one will run the claim
                    if isinstance(decided, Claim) and not decided._settled:
                        drive(store, _dropping(decided))
                    raise
        return decided
    except IdempotencyError as refused:
        if policy.observer.live and (busy_is_final or not isinstance(refused, AlreadyRunning)):
            report_refused(store, key, policy, refused)
        raise


async def abegin_with(
    store: Store,
    key: str,
    fingerprint: str,
    policy: Policy,
    deadline: Due | None,
    busy_is_final: bool = True,
) -> Claim | Finished:
    """``abegin`` with its arguments already checked and resolved."""
    try:
        step = await adecide(store, key, fingerprint, policy, deadline)
        if not isinstance(step, Busy):
            return step
        if policy.wait <= 0:
            raise step.error()
        waiter = _Waiter(policy.wait)
        looking = waiter.looking(policy)
        decided: Claim | Finished | None = None
        ended_by: BaseException | None = None
        try:
            async with store.awatch(key) as watch:
                while True:
                    step = await adecide(store, key, fingerprint, looking, deadline)
                    if not isinstance(step, Busy):
                        decided = step
                        break
                    await watch.wait(waiter.pause(step, watch))
        except BaseException as problem:
            ended_by = problem
            if isinstance(decided, Claim):  # claimed, then cancelled as the watch closed
                await adrive(store, _dropping(decided))
            raise
        finally:
            if looking is not policy:
                try:
                    waiter.report(store, key, policy, decided, looking, ended_by)
                except BaseException:
                    if isinstance(decided, Claim) and not decided._settled:
                        await adrive(store, _dropping(decided))
                    raise
        return decided
    except IdempotencyError as refused:
        if policy.observer.live and (busy_is_final or not isinstance(refused, AlreadyRunning)):
            report_refused(store, key, policy, refused)
        raise


def report_refused(store: Store, key: str, policy: Policy, refused: IdempotencyError) -> None:
    """Emit the event of a call that did not start: busy, mismatch, deadline or store error."""
    emit = policy.observer.emit
    if isinstance(refused, AlreadyRunning):
        reason = "reentered" if reentered(refused) else "live_owner"
        emit(BUSY, store, key, reason=reason, owner=refused.owner, error=refused)
    elif isinstance(refused, FingerprintMismatch):
        emit(MISMATCH, store, key, detail=str(refused), error=refused)
    elif isinstance(refused, DeadlineExceeded):
        emit(DEADLINE_EXCEEDED, store, key, detail=str(refused), error=refused)
    elif isinstance(refused, StoreError):
        emit(STORE_ERROR, store, key, reason="decide", detail=str(refused), error=refused)


def _prepare(
    key: str,
    store: Store | str | os.PathLike[str] | None,
    policy: Policy | None,
    deadline: datetime | float | None,
) -> tuple[Store, Policy, Due | None]:
    if not isinstance(key, str):
        raise TypeError(f"begin(key=...) must be a str, not {type(key).__name__}")
    if not key:
        raise ValueError("begin(key=...) must not be empty")
    if "\x00" in key or not key.isascii():  # rare: look closer (NUL, lone surrogates)
        from ._keys import refuse_unstorable

        refuse_unstorable(key, "begin(key=...)")
    resolved = resolve_store(store, option="store")
    if policy is None:
        policy = Policy()
    elif not isinstance(policy, Policy):
        raise TypeError(f"policy must be an idemfn.Policy, not {type(policy).__name__}")
    if deadline is None:
        return resolved, policy, None
    if isinstance(deadline, (int, float)) and not isinstance(deadline, bool):
        due = float(deadline)
    else:
        due = deadline_timestamp(deadline)
    return resolved, policy, lambda: due
