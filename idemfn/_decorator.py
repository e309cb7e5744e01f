"""``@idempotent``: the decorator, a thin driver of the state machine in ``_engine``.

(Over 600 lines: about a third is ``idempotent``'s docstring, which documents every option for
``help()`` and IDE hovers; the code that binds, keys and drives a call is one piece.)
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from functools import partial
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from . import _engine
from ._engine import (
    Finished,
    abegin_with,
    acomplete_or_log,
    arun_in_transaction,
    begin_with,
    complete_or_log,
    reentered,
    report_refused,
    run_in_transaction,
)
from ._errors import AlreadyRunning
from ._keys import CallKey, check_callable_option, describe, refuse_call
from ._outcome import SerializerOption
from ._policy import Policy, deadline_timestamp
from ._queue_retry import is_queue_retry_of
from ._record import Record
from ._signing import SigningKey
from ._stores import MemoryStore, Store, resolve_store
from .events import CALL_ENDED, CALL_STARTED, Handler, Observer, Subscription

__all__ = ["BoundIdempotentFunction", "IdempotentFunction", "idempotent"]

if TYPE_CHECKING:
    from typing_extensions import Self

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")


class IdempotentFunction(Protocol[P, R_co]):
    """What ``@idempotent`` returns: the function, called once per key, and its keys' tools.

    It has the decorated function's signature, return type and ``functools.wraps`` metadata,
    and is a coroutine function when that is. ``key_for``, ``status`` and ``forget`` take the
    same arguments as a call and name the same key, without running the body. On a method,
    they bind the instance as the call does: ``mailer.welcome.key_for(7)`` is
    ``Mailer.welcome.key_for(mailer, 7)``.

    Attributes:
        store: The store the function's records live in: ``store=``, resolved.

    Examples:
        >>> from idemfn import MemoryStore, idempotent
        >>> @idempotent(key="sync:{account}", name="demo", store=MemoryStore())
        ... def sync(account: str) -> int:
        ...     return 42
        >>> sync("acme")
        42
        >>> sync.key_for("acme")
        'demo:sync:acme'
        >>> sync.status("acme").attempt
        1
        >>> sync.forget("acme"), sync.status("acme")
        (True, None)
    """

    store: Store
    __qualname__: str  # (what names a function: arq registers a job function by it)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Run the body once for these arguments' key, or replay the key's recorded outcome.

        See ``idempotent`` for what a call does and raises.
        """
        ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The stored key a call with these arguments uses (``name:key``); runs nothing.

        Args:
            *args: The function's positional arguments, as for a call.
            **kwargs: The function's keyword arguments, as for a call.

        Returns:
            The stored key.

        Raises:
            TypeError: The arguments do not fit the signature, or a ``key=`` callable returned
                something other than a ``str``.
            ValueError: The key resolves to an empty string, or to one no store can hold.
        """
        ...

    def status(self, *args: P.args, **kwargs: P.kwargs) -> Record | None:
        """The record of these arguments' key, as stored now; runs nothing, writes nothing.

        Args:
            *args: The function's positional arguments, as for a call.
            **kwargs: The function's keyword arguments, as for a call.

        Returns:
            The key's ``Record`` (its ``status``, owner, attempt and times), or None when the
            key has no record or its record has expired.

        Raises:
            TypeError: The arguments give no key (as for ``key_for``).
            ValueError: The arguments give no key (as for ``key_for``).
            StoreError: The store failed, or the record is corrupt or fails its signature.
        """
        ...

    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the record of these arguments' key, whatever its status: the next call runs
        the body again.

        Forgetting a ``processing`` record lets a second call run while the first still
        does (the first then gets ``OwnershipLost`` and records nothing).

        Args:
            *args: The function's positional arguments, as for a call.
            **kwargs: The function's keyword arguments, as for a call.

        Returns:
            True if a live record was deleted; False if there was none (or it had expired).

        Raises:
            TypeError: The arguments give no key (as for ``key_for``).
            ValueError: The arguments give no key (as for ``key_for``).
            StoreError: The store failed.
        """
        ...

    def subscribe(self, handler: Handler, *, events: Iterable[str] | None = None) -> Subscription:
        """Send this function's events (see ``idemfn.events``) to ``handler``.

        ``idemfn.subscribe`` takes every function's. On a method, the handler gets the calls
        of every instance.

        Args:
            handler: Called with each ``idemfn.Event`` of this function's calls, in the
                calling thread or event loop; what it raises is logged, never raised.
            events: The names of the events to get. Default None: all of them.

        Returns:
            A ``Subscription``: ``close()`` it, or leave its ``with`` block, to unsubscribe.

        Raises:
            TypeError: ``handler`` is not callable, or ``events`` is a single string.
            ValueError: ``events`` names an unknown event.
        """
        ...

    # Methods: looked up on an instance, the wrapper binds like any function, and so do
    # key_for, status and forget.
    @overload
    def __get__(self, instance: None, owner: type[Any], /) -> Self: ...
    @overload
    def __get__(
        self: IdempotentFunction[Concatenate[S, P2], R2], instance: S, owner: type[Any], /
    ) -> BoundIdempotentFunction[P2, R2]: ...
    def __get__(self, instance: Any, owner: type[Any], /) -> Any: ...


class BoundIdempotentFunction(Protocol[P, R_co]):
    """An idempotent method looked up on an instance (``mailer.welcome``).

    The call, and ``key_for``, ``status`` and ``forget``, take the instance as ``self``, as
    a bound method does; each is ``IdempotentFunction``'s, without the instance.

    Attributes:
        store: The store the method's records live in.
    """

    store: Store

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Run the body once for these arguments' key, or replay the key's recorded outcome."""
        ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The stored key a call with these arguments uses; see ``IdempotentFunction.key_for``."""
        ...

    def status(self, *args: P.args, **kwargs: P.kwargs) -> Record | None:
        """The record of these arguments' key, or None; see ``IdempotentFunction.status``."""
        ...

    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the record of these arguments' key; True if there was a live one."""
        ...

    def subscribe(self, handler: Handler, *, events: Iterable[str] | None = None) -> Subscription:
        """Send the function's events to ``handler``; see ``IdempotentFunction.subscribe``."""
        ...


class _BoundMethod(functools.partial):  # type: ignore[type-arg]
    # ``instance.method`` for a method decorated in a class body, or the class for a
    # classmethod: a partial of the decorated function and the instance (its call runs in C,
    # and inspect sees the signature without self, and a coroutine function through it), whose
    # key_for, status and forget pass the instance too. A plain bound method cannot: its
    # attributes are the function's own, which know nothing of the instance (issue 13).
    __slots__ = ()

    @property
    def __self__(self) -> Any:
        return self.args[0]

    @property
    def __func__(self) -> Any:
        return self.func

    @property  # the function's, as a bound method's is
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.func.__doc__

    @property
    def store(self) -> Store:
        function: Any = self.func
        return function.store  # type: ignore[no-any-return]

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        """The stored key a call with these arguments uses; see ``IdempotentFunction``."""
        function: Any = self.func
        return function.key_for(*self.args, *args, **kwargs)  # type: ignore[no-any-return]

    def status(self, *args: Any, **kwargs: Any) -> Record | None:
        """The record of these arguments' key, or None; see ``IdempotentFunction``."""
        function: Any = self.func
        return function.status(*self.args, *args, **kwargs)  # type: ignore[no-any-return]

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the record of these arguments' key; see ``IdempotentFunction``."""
        function: Any = self.func
        return function.forget(*self.args, *args, **kwargs)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:  # policy, __name__, what wraps copied, ...
        # No other dunder: inspect would follow __wrapped__ to the unbound function, or take
        # __code__ for the partial's own, and show self in the signature.
        if name.startswith("__") and name not in ("__name__", "__qualname__"):
            raise AttributeError(name)
        return getattr(self.func, name)

    def __eq__(self, other: object) -> bool:  # as bound methods compare
        return (
            isinstance(other, _BoundMethod)
            and self.func is other.func
            and self.args[0] is other.args[0]
        )

    def __hash__(self) -> int:
        return hash((self.func, id(self.args[0])))

    def __repr__(self) -> str:
        return f"<bound idempotent method {self.func.__qualname__} of {self.args[0]!r}>"


class _Method(classmethod):  # type: ignore[type-arg]
    # A function decorated in a class body, as the class holds it: on an instance it gives a
    # _BoundMethod; on the class, the decorated function itself (so Mailer.welcome(m, 7) and
    # Mailer.welcome.key_for(m, 7) work as before). Held as it is (under @staticmethod, or
    # taken from the class dict) it calls and looks like the function, down to __code__, so
    # inspect.iscoroutinefunction still sees an async one.
    # A classmethod only in type, so that what inspects a class's namespace takes it for a
    # method: pydantic's models refuse any value that is not a function, property,
    # classmethod or staticmethod, and unittest.mock's autospec leaves out the first
    # parameter of a classmethod, as the call on an instance does. __get__ decides how it binds.
    __slots__ = ()

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self.__func__
        return _BoundMethod(self.__func__, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    # Decorators above this one mark the function (@abstractmethod sets __isabstractmethod__,
    # @deprecated __deprecated__, pytest marks pytestmark): they go on the function, where
    # __getattr__ reads them back, as they did before methods got this holder. (classmethod's
    # own __init__ copies __name__ & co. this way too: onto the function they came from.)
    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__func__, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.__func__, name)

    @property  # the function's, as the function's own would be
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__func__.__doc__

    def __reduce__(self) -> tuple[Any, ...]:
        # cloudpickle copies a script's classes by value, this holder with them; a classmethod's
        # own pickling (by its type alone) would lose the function.
        return (_Method, (self.__func__,))

    def __repr__(self) -> str:
        return f"<idempotent method {self.__func__.__qualname__}>"


class _ClassMethod(classmethod):  # type: ignore[type-arg]
    # @idempotent over @classmethod: binds the class, to the call and to key_for & co.
    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        if owner is None:
            owner = type(instance)
        return _BoundMethod(self.__func__, owner)


def _defined_in_class(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a function written in a class body (``Mailer.welcome``), as its
    qualified name tells (a function nested in a function is ``outer.<locals>.inner``)."""
    if not inspect.isfunction(fn):
        return False
    owner, dot, _ = fn.__qualname__.rpartition(".")
    return bool(dot) and not owner.endswith("<locals>")


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
        try:
            value = self._hook(*args, **kwargs)
        except TypeError:
            refuse_call("deadline=", self._hook, args, kwargs)
            raise  # from inside the callable: its own error
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


# The task queues whose decorator returns an object their worker runs without calling the
# function it was given, by the top module of that object's type: over it, @idempotent would
# only wrap local calls and guard nothing. Each: (what it was given, what goes first, how to
# write it instead).
_TASK_OBJECTS = {
    "celery": (
        "a Celery task",
        "@app.task",
        "@app.task(...) first, then @idempotent(...) (or idemfn.celery.idempotent_task(...))"
        " on the next line",
    ),
    "dramatiq": (
        "a Dramatiq actor",
        "@dramatiq.actor",
        "@dramatiq.actor(...) first, then @idempotent(...) (or"
        " idemfn.dramatiq.idempotent_actor(...)) on the next line",
    ),
    "huey": (
        "a Huey task",
        "@huey.task",
        "@huey.task(...) first, then @idempotent(...) (or idemfn.huey.idempotent_task(...))"
        " on the next line",
    ),
    "arq": (
        "an arq job Function",
        "arq.worker.func",
        "func(decorated, ...) around the decorated function: decorate it with"
        " @idempotent(...) (or idemfn.arq.idempotent_job(...)) where it is defined",
    ),
}


def _refuse_task_object(fn: object) -> None:
    # (Celery's app.task returns a lazy proxy: look at types only, which does not evaluate it.)
    kind = type(fn)
    queue = _TASK_OBJECTS.get(kind.__module__.partition(".")[0])
    if queue is None and hasattr(kind, "apply_async"):  # a Celery task instance of any module
        queue = _TASK_OBJECTS["celery"]
    if queue is not None:
        given, first, instead = queue
        raise TypeError(
            f"@idempotent must go under {first}, not over it: it was given {given}"
            f" ({kind.__name__}), whose worker would run the body without idempotency. Write"
            f" {instead}"
        )


F = TypeVar("F", bound=Callable[..., Any])


def _keyword_options_only(factory: F) -> F:
    """``factory``, refusing positional arguments with the way out.

    ``@idempotent`` without parentheses passes the function itself. A guard around the real
    function, rather than a private positional parameter, keeps the signature that
    ``inspect.signature``, ``help()`` and type checkers show to the public options alone.
    """

    @functools.wraps(factory)
    def guarded(*args: Any, **options: Any) -> Any:
        if args:
            _refuse_positional(args)
        return factory(**options)

    return guarded  # type: ignore[return-value]


def _refuse_positional(args: tuple[Any, ...]) -> NoReturn:
    hint = "write @idempotent() or @idempotent(key=...)"
    if len(args) == 1 and isinstance(args[0], str):
        hint = f"write @idempotent(key={args[0]!r})"
    raise TypeError(f"idempotent takes keyword options only: {hint}")


@_keyword_options_only
def idempotent(
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

    The first call with a key claims it, runs the body and records the outcome: ``ok`` with
    the return value, or ``halted`` with the exception. Later calls with that key do not run
    the body: they return a fresh copy of the recorded value, or re-raise the recorded
    exception, until the record expires (``ttl``). The arguments are fingerprinted, so reusing
    a key with other arguments raises ``FingerprintMismatch`` instead of replaying another
    call's result. Every option is keyword-only, and checked when ``idempotent(...)`` is
    called or when it decorates, whenever it can be known then.

    Calls of the decorated function raise, besides what its body raises:
    ``FingerprintMismatch`` (the key's record has other arguments), ``AlreadyRunning`` (a live
    call holds the key past ``wait``), ``Halted`` (the key's call ended with nothing to
    re-raise as itself: a crash, an interrupt, an outcome that could not be stored),
    ``DeadlineExceeded``, ``OwnershipLost`` (this call's claim was taken over or halted while
    its body ran: its outcome is not recorded), ``StoreError``, and ``TypeError`` /
    ``ValueError`` for arguments that give no key or no fingerprint (the body does not run).

    Args:
        key: What identifies a call. Default None: the fingerprint of every argument
            (memoiser mode; refused on a method, whose instance it would leave out). A
            ``str`` is a ``str.format`` template over the bound arguments, defaults applied
            (``"charge:{order_id}"``, ``"{order.id}"``, ``"{when:%Y-%m-%d}"``); a field that
            names no parameter is a ``ValueError`` when decorating. A callable gets the
            function's arguments and returns a non-empty ``str``. A key holding a NUL or a
            lone surrogate is a ``ValueError`` on every store.
        name: The namespace of the keys: the stored key is ``name:key``, so ``name`` must not
            contain ``":"``. Default None: ``module.qualname``; a script's functions take the
            script's real path (``/srv/app/deploy.py/step``), or its module under
            ``python -m``. Required for a function defined with no script file (an interactive
            session, ``python -c``) unless the store is a ``MemoryStore``. Give one that
            survives renames and moves to keys that must outlive a refactoring.
        store: Where records live: a ``Store``; a directory path (a ``DiskStore``); a URL
            (``redis://``, ``rediss://``, ``unix://``, ``postgresql://``, ``postgres://``,
            ``memory://``, ``file://``), opened once per process with ``open_store``. Default
            None: the store ``IDEMFN_STORE`` names, else a ``DiskStore`` in
            ``default_directory()``.
        ttl: How long a finished record is kept, counted from when the call finished: seconds
            (> 0) or a ``timedelta``. Default 86400.0 (a day); None keeps records until
            forgotten. An expired record counts as absent: the next call runs the body.
        fingerprint: What a key's record is checked against. Default None: every bound
            argument but ``self`` and ``cls``. A list of argument names fingerprints those
            only; a callable gets the function's arguments and returns the value to
            fingerprint; ``False`` turns the check off. An argument of a type with no
            canonical encoding is a ``TypeError`` naming it (see ``fingerprint_value``).
        wait: How long a call that finds the key held by a live call waits for its outcome
            (woken when it settles, polling as the fallback) and replays it, before
            raising ``AlreadyRunning``: seconds (>= 0) or a ``timedelta``. Default 0.0: raise
            at once. A call re-entering its own key from its body raises at once whatever
            ``wait`` says.
        lease: How long a claim stays valid without renewal: seconds (> 0) or a
            ``timedelta``. Default 30.0. A heartbeat thread renews it while the body runs; an
            owner on another machine is judged gone once its lease runs out (one on this
            machine as soon as its process is gone). Give a body that holds the GIL in one C
            call for longer a longer lease.
        on_abandoned: What becomes of a claim whose owner is gone (crashed, killed, lost its
            lease). Default ``"halt"``: the record becomes ``halted`` and the caller gets
            ``Halted`` (at-most-once: the side effect may have happened). ``"retry"``: exactly
            one caller takes the claim over (``attempt + 1``) and runs the body again
            (at-least-once).
        retry_on: Exception types (one, or a tuple) that are not recorded: the key is
            released and the exception re-raised, so the next call runs the body again.
            Default ``()``: every exception is recorded.
        deadline: When a call must no longer start: an aware ``datetime``, or a callable of
            the function's arguments returning one. With no finished record and the deadline
            past, the call raises ``DeadlineExceeded`` without claiming the key; a finished
            record is still replayed. Default None: no deadline. A naive datetime is a
            ``ValueError``.
        transactional: Run the body in the ``PostgresStore`` transaction that records its
            ``ok`` outcome, so that its writes (on ``idemfn.current_connection()``) and the
            record commit or roll back together; an ``async def`` body writes on
            ``idemfn.current_async_connection()``. Default False. Needs a ``PostgresStore``
            (``TypeError`` otherwise).
        signing_key: Sign records with HMAC-SHA256 and refuse, unloaded, any that fails its
            check: a ``str`` or ``bytes`` key of 16 bytes or more, or a list of them (the
            first signs, every one verifies, for rotation). Applies to a store opened from a
            path or URL; a ``Store`` object must have been made with the same keys, and a
            ``MemoryStore`` takes none (``ValueError``). Default None: ``IDEMFN_SIGNING_KEY``
            (comma-separated keys) when set, else unsigned.
        serializer: How outcomes are stored. Default ``"pickle"`` (cloudpickle; any value or
            exception that pickles and loads back, but a replay unpickles: trust the store, or
            sign its records). ``"json"``: what ``json.dumps`` takes, builtin exceptions
            replayed as themselves, others as ``Halted``; a replay never unpickles. Or an
            object with ``dumps(value) -> bytes | str`` and ``loads(data) -> value``.

    Returns:
        A decorator. The function it returns (an ``IdempotentFunction``) keeps the decorated
        function's signature, type and ``functools.wraps`` metadata (a coroutine function
        stays one) and adds ``key_for()``, ``status()`` and ``forget()``, which take the
        function's arguments, ``store``, and ``subscribe()`` for its events. It works on
        functions, methods, classmethods and staticmethods (above or below them), and on
        ``async def`` functions.

    Raises:
        TypeError: An option of the wrong type, or options given positionally
            (``@idempotent`` without parentheses); when decorating, a function it cannot
            guard (a generator function, a Celery task object, an ``async def`` with
            ``transactional=True``), or a ``key=``, ``fingerprint=`` or ``deadline=``
            callable that cannot take the function's arguments.
        ValueError: An option with a bad value (``ttl=0``, a negative ``wait``, a ``name``
            holding ``":"``, an unknown ``on_abandoned``, a store URL of an unknown scheme);
            when decorating, a ``key`` template field or ``fingerprint`` name that names no
            parameter, or ``key=None`` on a method.

    Examples:
        >>> from idemfn import MemoryStore, idempotent
        >>> @idempotent(key="greet:{who}", name="demo", store=MemoryStore())
        ... def greet(who: str) -> str:
        ...     print("running")
        ...     return f"hello {who}"
        >>> greet("ada")
        running
        'hello ada'
        >>> greet("ada")  # replayed: the body does not run
        'hello ada'
        >>> greet.key_for("ada")
        'demo:greet:ada'
        >>> greet.status("ada").status
        Status.OK
        >>> @idempotent  # doctest: +ELLIPSIS
        ... def oops() -> None: ...
        Traceback (most recent call last):
        TypeError: idempotent takes keyword options only: write @idempotent() or ...
    """
    return decorator(
        key=key,
        name=name,
        store=store,
        ttl=ttl,
        fingerprint=fingerprint,
        wait=wait,
        lease=lease,
        on_abandoned=on_abandoned,
        retry_on=retry_on,
        deadline=deadline,
        transactional=transactional,
        signing_key=signing_key,
        serializer=serializer,
        on_busy=None,
    )


OnBusy = Callable[[AlreadyRunning, Callable[..., Any]], Any]


def _observed(
    observer: Observer,
    store: Store,
    key: str,
    call: Callable[[str, str, Any, Any], Any],
    fp: str,
    args: Any,
    kwargs: Any,
) -> Any:
    """A call with some handler subscribed: framed by ``call_started`` and ``call_ended``
    (which an OpenTelemetry span wraps the body with)."""
    started = time.monotonic()
    generation = _engine.fork_generation()
    try:
        observer.emit(CALL_STARTED, store, key)  # (in the try: its handler may interrupt)
        value = call(key, fp, args, kwargs)
    except BaseException as exc:
        if generation == _engine.fork_generation():  # (a child forked in the body: not its call)
            duration = time.monotonic() - started
            observer.emit(CALL_ENDED, store, key, duration=duration, status="raised", error=exc)
        raise
    if generation == _engine.fork_generation():
        observer.emit(CALL_ENDED, store, key, duration=time.monotonic() - started, status="ok")
    return value


async def _aobserved(
    observer: Observer,
    store: Store,
    key: str,
    call: Callable[[str, str, Any, Any], Awaitable[Any]],
    fp: str,
    args: Any,
    kwargs: Any,
) -> Any:
    """``_observed`` for an ``async def`` function's call."""
    started = time.monotonic()
    try:
        observer.emit(CALL_STARTED, store, key)
        value = await call(key, fp, args, kwargs)
    except BaseException as exc:
        duration = time.monotonic() - started
        observer.emit(CALL_ENDED, store, key, duration=duration, status="raised", error=exc)
        raise
    observer.emit(CALL_ENDED, store, key, duration=time.monotonic() - started, status="ok")
    return value


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
    replayed by the body) and the decorated function (the wrapper), and what it returns is the
    call's result. It asks the queue to retry only a call of the running task's own function:
    a nested call's retry request would release the task's own claim too, and run the task's
    body again."""
    policy = Policy(
        ttl=ttl,
        lease=lease,
        wait=wait,
        on_abandoned=on_abandoned,
        retry_on=retry_on,
        serializer=serializer,
    )
    resolved_store = resolve_store(store, option="store", signing_key=signing_key)
    transaction = _transaction_of(resolved_store, transactional)
    deadline_of: _Deadline[Any] | None = None if deadline is None else _Deadline(deadline)
    # The queue's retry of a call may find the key still held by the attempt that asked for
    # it (Celery publishes the retry before raising Retry): it waits for that attempt to let
    # go, up to one lease in all (or wait=, if longer), before it counts as busy. Not with an
    # on_busy hook: it retries later, which also outlasts that attempt, and waiting would hold
    # a worker for every later retry of a duplicate (request.retries counts those too).
    retry_policy: Policy | None = None
    if on_busy is None and policy.wait < policy.lease:
        retry_policy = copy.copy(policy)
        retry_policy.wait = policy.lease - policy.wait

    def wait_again(
        busy: AlreadyRunning, function: object, again: Policy | None, store: Store
    ) -> Policy:
        """The policy to look at a busy key again with (``again``), when this call is the
        queue's retry of ``function``; else raises ``busy`` (reported: its first look did not,
        see ``begin_with``'s ``busy_is_final``)."""
        if again is None or reentered(busy) or not is_queue_retry_of(function):
            if again is not None and again.observer.live:
                report_refused(store, busy.key, again, busy)
            raise busy
        return again

    def decorate(fn: Callable[P, R]) -> IdempotentFunction[P, R]:
        rewrap: Callable[[Any], Any] | None = None
        if isinstance(fn, (classmethod, staticmethod)):
            rewrap = type(fn)
            fn = fn.__func__
        _refuse_task_object(fn)  # first: arq's Function is not callable
        if not callable(fn):
            raise TypeError(f"@idempotent decorates functions, not {type(fn).__name__}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@idempotent cannot decorate the generator function {fn.__qualname__}: its body"
                " runs lazily, after the call returns. Return a list (or other value) instead"
            )
        signature = inspect.signature(fn)
        call_key = CallKey(
            fn,
            signature,
            key=key,
            name=name,
            fingerprint=fingerprint,
            process_local=isinstance(resolved_store, MemoryStore),
        ).resolve
        if deadline is not None and not isinstance(deadline, datetime):
            check_callable_option("deadline=", deadline, signature, describe(fn, signature))
        # This function's decisions go to its observer (idemfn.events): its own handlers and
        # the process-wide ones. With none subscribed, a call tests one attribute.
        observer = Observer(name or f"{fn.__module__}.{fn.__qualname__}")
        call_policy = copy.copy(policy)
        call_policy.observer = observer
        retry_call_policy: Policy | None = None
        if retry_policy is not None:
            retry_call_policy = copy.copy(retry_policy)
            retry_call_policy.observer = observer
        final = retry_call_policy is None  # (a busy key is final unless a retry may wait)
        wrapper: Any

        # A callable object whose __call__ is a coroutine function is async too.
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004  # not a callable() test
        )
        if is_async:
            in_atransaction: Callable[[str], Any] | None = None
            if transaction is not None:
                in_atransaction = getattr(resolved_store, "atransaction", None)
                if in_atransaction is None:
                    raise TypeError(
                        f"transactional=True on an async function ({fn.__qualname__}) needs a"
                        f" store with async transactions (PostgresStore); {resolved_store!r} has"
                        " only sync ones"
                    )
            run_async: Callable[P, Any] = fn

            async def acall(stored_key: str, fp: str, args: Any, kwargs: Any) -> Any:
                due = None if deadline_of is None else partial(deadline_of, *args, **kwargs)
                try:
                    try:
                        outcome = await abegin_with(
                            resolved_store, stored_key, fp, call_policy, due, final
                        )
                    except AlreadyRunning as busy:
                        again = wait_again(busy, wrapper, retry_call_policy, resolved_store)
                        outcome = await abegin_with(resolved_store, stored_key, fp, again, due)
                except AlreadyRunning as busy:
                    if on_busy is None or reentered(busy):
                        raise
                    return on_busy(busy, wrapper)
                if outcome.__class__ is Finished:
                    return outcome.replay()
                outcome.function = wrapper  # type: ignore[union-attr]
                if in_atransaction is not None:
                    # As the sync transactional wrapper's: the body's writes and the ok record
                    # commit together (idemfn.current_async_connection()).
                    return await arun_in_transaction(
                        outcome,  # type: ignore[arg-type]
                        in_atransaction(stored_key),
                        partial(run_async, *args, **kwargs),
                    )
                async with outcome:  # type: ignore[union-attr]
                    value = await run_async(*args, **kwargs)
                    await acomplete_or_log(outcome, value)  # type: ignore[arg-type]
                return value

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                stored_key, fp = call_key(args, kwargs)
                if observer.framed:  # (a handler wants call_started, call_ended)
                    return await _aobserved(
                        observer, resolved_store, stored_key, acall, fp, args, kwargs
                    )
                return await acall(stored_key, fp, args, kwargs)

        elif transaction is not None:
            in_transaction = transaction

            def call(stored_key: str, fp: str, args: Any, kwargs: Any) -> Any:
                due = None if deadline_of is None else partial(deadline_of, *args, **kwargs)
                try:
                    try:
                        outcome = begin_with(
                            resolved_store, stored_key, fp, call_policy, due, final
                        )
                    except AlreadyRunning as busy:
                        again = wait_again(busy, wrapper, retry_call_policy, resolved_store)
                        outcome = begin_with(resolved_store, stored_key, fp, again, due)
                except AlreadyRunning as busy:
                    if on_busy is None or reentered(busy):
                        raise
                    return on_busy(busy, wrapper)
                if outcome.__class__ is Finished:
                    return outcome.replay()
                outcome.function = wrapper  # type: ignore[union-attr]
                # The body's writes and the ok record commit together, or neither does; then
                # the claim is halted (or released) outside the transaction (see the engine).
                return run_in_transaction(
                    outcome,  # type: ignore[arg-type]
                    in_transaction(stored_key),
                    partial(fn, *args, **kwargs),
                )

        else:

            def call(stored_key: str, fp: str, args: Any, kwargs: Any) -> Any:
                due = None if deadline_of is None else partial(deadline_of, *args, **kwargs)
                try:
                    try:
                        outcome = begin_with(
                            resolved_store, stored_key, fp, call_policy, due, final
                        )
                    except AlreadyRunning as busy:
                        again = wait_again(busy, wrapper, retry_call_policy, resolved_store)
                        outcome = begin_with(resolved_store, stored_key, fp, again, due)
                except AlreadyRunning as busy:
                    if on_busy is None or reentered(busy):
                        raise
                    return on_busy(busy, wrapper)
                if outcome.__class__ is Finished:
                    return outcome.replay()
                outcome.function = wrapper  # type: ignore[union-attr]
                with outcome:  # type: ignore[union-attr]
                    value = fn(*args, **kwargs)
                    complete_or_log(outcome, value)  # type: ignore[arg-type]
                return value

        if not is_async:

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                stored_key, fp = call_key(args, kwargs)
                if observer.framed:  # (a handler wants call_started, call_ended)
                    return _observed(observer, resolved_store, stored_key, call, fp, args, kwargs)
                return call(stored_key, fp, args, kwargs)

        def key_for(*args: Any, **kwargs: Any) -> str:
            return call_key(args, kwargs)[0]

        def status(*args: Any, **kwargs: Any) -> Record | None:
            entry = resolved_store.get(call_key(args, kwargs)[0])
            return None if entry is None else entry.record()

        def forget(*args: Any, **kwargs: Any) -> bool:
            return resolved_store.delete(call_key(args, kwargs)[0])

        def subscribe(handler: Handler, *, events: Iterable[str] | None = None) -> Subscription:
            return observer.subscribe(handler, events)

        # help(fn.key_for) says what the protocol's hover says.
        key_for.__doc__ = IdempotentFunction.key_for.__doc__
        status.__doc__ = IdempotentFunction.status.__doc__
        forget.__doc__ = IdempotentFunction.forget.__doc__
        subscribe.__doc__ = IdempotentFunction.subscribe.__doc__
        wrapper.key_for = key_for
        wrapper.subscribe = subscribe
        wrapper.status = status
        wrapper.forget = forget
        wrapper.store = resolved_store
        wrapper.policy = call_policy
        # Methods: key_for, status and forget must bind the instance (or class) as the call
        # does, which a plain function's bound method cannot do (see _BoundMethod).
        if rewrap is classmethod:
            return _ClassMethod(wrapper)  # type: ignore[return-value]
        if rewrap is not None:
            return rewrap(wrapper)  # type: ignore[no-any-return]
        if _defined_in_class(fn):
            return _Method(wrapper)
        return wrapper  # type: ignore[no-any-return]

    return decorate
