"""``@idempotent``: the decorator, a thin driver of the state machine in ``_engine``."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from functools import partial
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from ._engine import (
    Finished,
    Policy,
    abegin_with,
    begin_with,
    deadline_timestamp,
    finish,
    reentered,
)
from ._errors import AlreadyRunning
from ._keys import CallKey
from ._outcome import SerializerOption
from ._record import Record
from ._signing import SigningKey
from ._stores import Store, resolve_store

__all__ = ["IdempotentFunction", "idempotent"]

if TYPE_CHECKING:
    from typing_extensions import Self

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")


class IdempotentFunction(Protocol[P, R_co]):
    """What ``@idempotent`` returns: the function, plus what it knows about its keys."""

    store: Store

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The stored key these arguments map to."""
        ...

    def status(self, *args: P.args, **kwargs: P.kwargs) -> Record | None:
        """The record of these arguments' key, or None."""
        ...

    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the record of these arguments' key; True if there was one."""
        ...

    # Methods: looked up on an instance, the wrapper binds like any function.
    @overload
    def __get__(self, instance: None, owner: type[Any], /) -> Self: ...
    @overload
    def __get__(
        self: IdempotentFunction[Concatenate[S, P2], R2], instance: S, owner: type[Any], /
    ) -> Callable[P2, R2]: ...
    def __get__(self, instance: Any, owner: type[Any], /) -> Any: ...


class _Deadline(Generic[P]):
    """``deadline=``: a fixed aware datetime, or a callable of the call's arguments."""

    __slots__ = ("_fixed", "_hook")

    def __init__(self, deadline: datetime | Callable[P, datetime] | None) -> None:
        self._fixed: float | None = None
        self._hook: Callable[P, datetime] | None = None
        if deadline is None:
            return
        if isinstance(deadline, datetime):
            self._fixed = deadline_timestamp(deadline)
        elif callable(deadline):
            self._hook = deadline
        else:
            raise TypeError(
                "deadline must be an aware datetime, a callable returning one, or None, not"
                f" {type(deadline).__name__}"
            )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> float | None:
        if self._hook is None:
            return self._fixed
        value = self._hook(*args, **kwargs)
        return deadline_timestamp(value, option="the deadline= callable's result")


def _transaction_of(
    store: Store, transactional: object
) -> Callable[[str], AbstractContextManager[Any]] | None:
    if not isinstance(transactional, bool):
        raise TypeError(f"transactional must be True or False, not {transactional!r}")
    if not transactional:
        return None
    transaction = getattr(store, "transaction", None)
    if transaction is None:
        raise TypeError(
            f"transactional=True needs a store whose records live in the body's database (a"
            f" PostgresStore), not {store!r}"
        )
    return transaction  # type: ignore[no-any-return]


def _refuse_task_object(fn: object) -> None:
    # A Celery task's worker calls the task's own run(), never this wrapper: over @app.task the
    # decorator would only wrap local calls and guard nothing. (app.task returns a lazy proxy:
    # look at types only, which does not evaluate it.)
    kind = type(fn)
    if kind.__module__.partition(".")[0] == "celery" or hasattr(kind, "apply_async"):
        raise TypeError(
            "@idempotent must go under @app.task, not over it: it was given a Celery task"
            f" ({kind.__name__}), whose worker would run the body without idempotency. Write"
            " @app.task(...) first, then @idempotent(...) (or idemfn.celery.idempotent_task(...))"
            " on the next line"
        )


def idempotent(
    _misuse: None = None,
    /,
    *,
    key: str | Callable[..., str] | None = None,
    name: str | None = None,
    store: Store | str | os.PathLike[str] | None = None,
    ttl: float | timedelta | None = 86400.0,
    fingerprint: Sequence[str] | Callable[..., object] | bool | None = None,
    wait: float | timedelta = 0.0,
    lease: float | timedelta = 30.0,
    on_abandoned: Literal["halt", "retry"] = "halt",
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    deadline: datetime | Callable[..., datetime] | None = None,
    transactional: bool = False,
    signing_key: SigningKey | None = None,
    serializer: SerializerOption = "pickle",
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """Make calls of the decorated function happen once per key.

    The first call with a key runs the body and records its outcome; later calls with that key
    return a fresh copy of the recorded value or re-raise the recorded exception, without
    running the body. See the README for each option; errors in options are raised here.

    >>> from idemfn import idempotent, MemoryStore
    >>> @idempotent(key="greet:{who}", store=MemoryStore())
    ... def greet(who: str) -> str:
    ...     print("running")
    ...     return f"hello {who}"
    >>> greet("ada")
    running
    'hello ada'
    >>> greet("ada")
    'hello ada'
    >>> @idempotent
    ... def oops() -> None: ...
    Traceback (most recent call last):
    TypeError: idempotent takes keyword options only: write @idempotent() or @idempotent(key=...)
    """
    if _misuse is not None:
        raise TypeError(
            "idempotent takes keyword options only: write @idempotent() or @idempotent(key=...)"
        )
    return decorator(
        key=key, name=name, store=store, ttl=ttl, fingerprint=fingerprint, wait=wait,
        lease=lease, on_abandoned=on_abandoned, retry_on=retry_on, deadline=deadline,
        transactional=transactional, signing_key=signing_key,
        serializer=serializer, on_busy=None,
    )  # fmt: skip


OnBusy = Callable[[AlreadyRunning], Any]


def decorator(
    *,
    key: str | Callable[..., str] | None,
    name: str | None,
    store: Store | str | os.PathLike[str] | None,
    ttl: float | timedelta | None,
    fingerprint: Sequence[str] | Callable[..., object] | bool | None,
    wait: float | timedelta,
    lease: float | timedelta,
    on_abandoned: Literal["halt", "retry"],
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    deadline: datetime | Callable[..., datetime] | None,
    transactional: bool,
    signing_key: SigningKey | None,
    serializer: SerializerOption,
    on_busy: OnBusy | None,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """``idempotent``'s decorator, for the integrations: ``on_busy``, when given, is called
    with the ``AlreadyRunning`` of a call that found its own key running (not one raised or
    replayed by the body), and what it returns is the call's result."""
    policy = Policy(
        ttl=ttl, lease=lease, wait=wait, on_abandoned=on_abandoned, retry_on=retry_on,
        serializer=serializer,
    )  # fmt: skip
    resolved_store = resolve_store(store, option="store", signing_key=signing_key)
    transaction = _transaction_of(resolved_store, transactional)
    deadline_of: _Deadline[Any] | None = None if deadline is None else _Deadline(deadline)

    def decorate(fn: Callable[P, R]) -> IdempotentFunction[P, R]:
        rewrap: Callable[[Any], Any] | None = None
        if isinstance(fn, (classmethod, staticmethod)):
            rewrap = type(fn)
            fn = fn.__func__
        if not callable(fn):
            raise TypeError(f"@idempotent decorates functions, not {type(fn).__name__}")
        _refuse_task_object(fn)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@idempotent cannot decorate the generator function {fn.__qualname__}: its body"
                " runs lazily, after the call returns. Return a list (or other value) instead"
            )
        signature = inspect.signature(fn)
        call_key = CallKey(fn, signature, key=key, name=name, fingerprint=fingerprint).resolve
        wrapper: Any

        # A callable object whose __call__ is a coroutine function is async too.
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004  # not a callable() test
        ):
            if transaction is not None:
                raise TypeError(
                    f"transactional=True needs a sync function ({fn.__qualname__} is async): the"
                    " body runs on a psycopg (sync) connection"
                )
            run_async: Callable[P, Any] = fn

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                stored_key, fp = call_key(args, kwargs)
                due = None if deadline_of is None else partial(deadline_of, *args, **kwargs)
                try:
                    outcome = await abegin_with(resolved_store, stored_key, fp, policy, due)
                except AlreadyRunning as busy:
                    if on_busy is None or reentered(busy):
                        raise
                    return on_busy(busy)
                if outcome.__class__ is Finished:
                    return outcome.replay()
                outcome.function = wrapper  # type: ignore[union-attr]
                with outcome:  # type: ignore[union-attr]
                    value = await run_async(*args, **kwargs)
                    finish(outcome, value)  # type: ignore[arg-type]
                return value

        elif transaction is not None:
            in_transaction = transaction

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                stored_key, fp = call_key(args, kwargs)
                due = None if deadline_of is None else partial(deadline_of, *args, **kwargs)
                try:
                    outcome = begin_with(resolved_store, stored_key, fp, policy, due)
                except AlreadyRunning as busy:
                    if on_busy is None or reentered(busy):
                        raise
                    return on_busy(busy)
                if outcome.__class__ is Finished:
                    return outcome.replay()
                outcome.function = wrapper  # type: ignore[union-attr]
                # The body's writes and the ok record commit together; an exception rolls both
                # back, then the claim is halted (or released) outside the transaction.
                # Here a failure to record ok is raised, never only logged: it aborted the
                # transaction, so the body's writes are rolled back with it.
                with outcome, in_transaction(stored_key):  # type: ignore[union-attr]
                    value = fn(*args, **kwargs)
                    outcome.complete(value)  # type: ignore[union-attr]
                return value

        else:

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                stored_key, fp = call_key(args, kwargs)
                due = None if deadline_of is None else partial(deadline_of, *args, **kwargs)
                try:
                    outcome = begin_with(resolved_store, stored_key, fp, policy, due)
                except AlreadyRunning as busy:
                    if on_busy is None or reentered(busy):
                        raise
                    return on_busy(busy)
                if outcome.__class__ is Finished:
                    return outcome.replay()
                outcome.function = wrapper  # type: ignore[union-attr]
                with outcome:  # type: ignore[union-attr]
                    value = fn(*args, **kwargs)
                    finish(outcome, value)  # type: ignore[arg-type]
                return value

        def key_for(*args: Any, **kwargs: Any) -> str:
            return call_key(args, kwargs)[0]

        def status(*args: Any, **kwargs: Any) -> Record | None:
            entry = resolved_store.get(call_key(args, kwargs)[0])
            return None if entry is None else entry.record()

        def forget(*args: Any, **kwargs: Any) -> bool:
            return resolved_store.delete(call_key(args, kwargs)[0])

        wrapper.key_for = key_for
        wrapper.status = status
        wrapper.forget = forget
        wrapper.store = resolved_store
        wrapper.policy = policy
        if rewrap is not None:
            return rewrap(wrapper)  # type: ignore[no-any-return]
        return wrapper  # type: ignore[no-any-return]

    return decorate
