"""``HttpOptions``: the options every HTTP middleware takes, validated once."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Container
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from .._engine import Due
from .._policy import Policy, deadline_timestamp, whole_option
from .._stores import Store, resolve_store
from ..events import Observer
from .exchange import RESPONSE_CODEC, default_fingerprint, fingerprint_of

__all__ = ["DEFAULT_METHODS", "HttpOptions", "MiB", "deadline_of"]

RequestT = TypeVar("RequestT")

DEFAULT_METHODS = ("POST", "PATCH")
MiB = 1024 * 1024
# RFC 9110's token: a header name, a method.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


# The middleware's events (idemfn.events) name their function "http".
HTTP_OBSERVER = Observer("http")


class HttpOptions(Generic[RequestT]):
    """The options of an ``IdempotencyMiddleware``, checked once; errors name the option.

    ``RequestT`` is what the ``scope``, ``fingerprint`` and ``deadline`` callables get:
    ``idemfn.asgi.Request`` in ASGI and WSGI apps, Django's ``HttpRequest`` in Django.
    The options' meanings are documented on ``idemfn.asgi.IdempotencyMiddleware``.
    """

    __slots__ = (
        "deadline",
        "fingerprint",
        "header",
        "header_bytes",
        "max_key_length",
        "max_request_body",
        "max_response_body",
        "methods",
        "policy",
        "recorded_statuses",
        "required",
        "scope",
        "store",
        "where",
    )

    def __init__(
        self,
        *,
        store: Store | str | os.PathLike[str] | None = None,
        header: str = "Idempotency-Key",
        methods: Collection[str] = DEFAULT_METHODS,
        required: bool = False,
        scope: Callable[[RequestT], str | None] | None = None,
        fingerprint: Callable[[RequestT], str | bytes] | None = None,
        ttl: float | timedelta | None = 86400.0,
        lease: float | timedelta = 30.0,
        wait: float | timedelta = 0.0,
        deadline: Callable[[RequestT], datetime | None] | None = None,
        max_key_length: int = 255,
        max_request_body: int = 10 * MiB,
        max_response_body: int = MiB,
        recorded_statuses: Container[int] | None = None,
        where: str = "IdempotencyMiddleware",
    ) -> None:
        self.where = where
        try:
            self.policy = Policy(ttl=ttl, lease=lease, wait=wait, serializer=RESPONSE_CODEC)
            self.policy.observer = HTTP_OBSERVER
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        given: object = header  # checked at run time too: options come from settings files
        if not isinstance(given, str) or not _TOKEN.match(given):
            raise ValueError(
                f"{where}: header must be a header name like 'Idempotency-Key', not {header!r}"
            )
        self.header = header
        self.header_bytes = header.lower().encode("ascii")
        if isinstance(methods, (str, bytes)) or not isinstance(methods, Collection):
            raise TypeError(
                f"{where}: methods must be a collection of method names like ('POST', 'PATCH'),"
                f" not {methods!r}"
            )
        names: Collection[object] = methods
        for name in names:
            if not isinstance(name, str) or not _TOKEN.match(name):
                raise ValueError(f"{where}: methods holds {name!r}, which is not a method name")
        self.methods = frozenset(method.upper() for method in methods)
        if not isinstance(required, bool):
            raise TypeError(f"{where}: required must be True or False, not {required!r}")
        self.required = required
        self.scope = _callable_option(where, "scope", scope)
        self.fingerprint = _callable_option(where, "fingerprint", fingerprint)
        self.deadline = _callable_option(where, "deadline", deadline)
        self.max_key_length = _limit(where, "max_key_length", max_key_length)
        self.max_request_body = _limit(where, "max_request_body", max_request_body)
        self.max_response_body = _limit(where, "max_response_body", max_response_body)
        if recorded_statuses is not None and (
            isinstance(recorded_statuses, (int, str, bytes))
            or not isinstance(recorded_statuses, Container)
        ):
            raise TypeError(
                f"{where}: recorded_statuses must be a collection of statuses such as"
                f" range(200, 500), or None for every status, not {recorded_statuses!r}"
            )
        if isinstance(recorded_statuses, Collection) and not isinstance(recorded_statuses, range):
            wrong = [s for s in recorded_statuses if isinstance(s, bool) or not isinstance(s, int)]
            if wrong:
                raise TypeError(
                    f"{where}: recorded_statuses must hold int statuses such as 503, not"
                    f" {wrong[0]!r}"
                )
        self.recorded_statuses = recorded_statuses
        self.store: Store = resolve_store(store, option=f"{where}: store")

    def stored_key(self, tenant: str | None, key: str) -> str:
        """The key the record is stored under: the tenant's (``scope``) space, then the key."""
        if tenant is None:
            return f"http::{key}"
        if not isinstance(tenant, str):
            raise TypeError(
                f"{self.where}: scope returned {type(tenant).__name__}, not a str or None"
            )
        return f"http:{quote(tenant, safe='')}:{key}"

    def identify(
        self,
        key: str,
        request: Callable[[], RequestT],
        method: str,
        path: str,
        query: str,
        body: bytes,
    ) -> tuple[str, str, Due | None]:
        """The stored key, the fingerprint and the deadline of a request with ``key``.

        ``request`` makes what the ``scope``, ``fingerprint`` and ``deadline`` callables get;
        it is called only when one of them is set (a replay does no work it does not need)."""
        if self.scope is None and self.fingerprint is None and self.deadline is None:
            return self.stored_key(None, key), default_fingerprint(method, path, query, body), None
        given = request()
        tenant = None if self.scope is None else self.scope(given)
        if self.fingerprint is None:
            fingerprint = default_fingerprint(method, path, query, body)
        else:
            fingerprint = fingerprint_of(self.fingerprint(given), self.where)
        return self.stored_key(tenant, key), fingerprint, deadline_of(self, given)

    def records(self, status: int) -> bool:
        """Whether a response of ``status`` is recorded (else the key is released)."""
        wanted = self.recorded_statuses
        return wanted is None or status in wanted

    def __repr__(self) -> str:
        return (
            f"<HttpOptions header={self.header!r} methods={sorted(self.methods)!r}"
            f" required={self.required!r} store={self.store!r} {self.policy!r}>"
        )


def _callable_option(where: str, option: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(
            f"{where}: {option} must be a callable of the request, or None, not {value!r}"
        )
    return value


def _limit(where: str, option: str, value: object) -> int:
    try:
        return whole_option(option, value, least=1)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (a number of bytes)") from None


def deadline_of(options: HttpOptions[RequestT], request: RequestT) -> Due | None:
    """The request's ``deadline`` (the option's callable asked once) for ``begin``."""
    if options.deadline is None:
        return None
    given = options.deadline(request)
    if given is None:
        return None
    due = deadline_timestamp(given, option=f"{options.where}: deadline's answer")
    return lambda: due
