"""An Idempotency-Key middleware for Django, sync and async.

A client that retries a request with the same ``Idempotency-Key`` header gets the first
response again, replayed, instead of having the view run twice. Add the middleware to
``MIDDLEWARE`` and give its options in the ``IDEMFN_HTTP`` setting::

    # settings.py
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "idemfn.django.IdempotencyMiddleware",  # below what scope uses (request.user)
    ]
    IDEMFN_HTTP = {
        "store": "redis://localhost:6379/0",  # default: IDEMFN_STORE, or the default DiskStore
        "scope": "shop.idempotency.tenant",  # a callable of the HttpRequest, or its dotted path
        "required": True,
    }

    # shop/idempotency.py
    def tenant(request):
        # Each user their own keys: one user's key never replays another user's response.
        return f"user:{request.user.pk}" if request.user.is_authenticated else None

It runs under WSGI (gunicorn, ``runserver``) and, awaited on the store's async primitives,
under ASGI (uvicorn, Daphne). ``pip install 'idemfn[django]'`` says so in a requirements file.
The answers follow the IETF Idempotency-Key draft: see ``IdempotencyMiddleware`` and the
documentation's HTTP page.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterator, Mapping
from http.cookies import CookieError, Morsel, SimpleCookie
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django import (
    conf,  # (not `settings` as a global: doctest collection would read it unconfigured)
)
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.http.request import RawPostDataException
from django.utils.module_loading import import_string

from ._engine import Claim, Due
from ._errors import IdempotencyError, StoreError
from ._http.exchange import (
    GUARDED,
    REPLAYED,
    Header,
    HeldBack,
    Recorded,
    Recorder,
    Response,
    asettle,
    astart,
    incomplete,
    outcome,
    read_key,
    settle,
    start,
    too_large,
)
from ._http.options import HttpOptions
from ._logs import failed
from .events import log_fields

__all__ = ["IdempotencyMiddleware"]

logger = logging.getLogger("idemfn")

_SETTING = "IDEMFN_HTTP"
_WHERE = f"settings.{_SETTING}"
# The setting's option names: HttpOptions's, so the three middlewares never drift apart.
_OPTIONS = tuple(
    name
    for name in inspect.signature(HttpOptions.__init__).parameters
    if name not in {"self", "where"}
)
_CALLABLES = ("scope", "fingerprint", "deadline")
# The headers of the middleware's own answers, cased as Django writes headers.
_OWN_HEADERS = {
    b"content-type": "Content-Type",
    b"content-length": "Content-Length",
    b"retry-after": "Retry-After",
    REPLAYED[0]: "Idempotent-Replayed",
}
# Halts scheduled by an async stream closed on the event loop (Django's close() is sync).
_halting: set[asyncio.Task[None]] = set()

Prepared = tuple[str, str, str, "Due | None"]  # key, stored key, fingerprint, deadline


class IdempotencyMiddleware:
    """Run each request that carries an ``Idempotency-Key`` once; replay its response after.

    ``MIDDLEWARE = [..., "idemfn.django.IdempotencyMiddleware"]``, with its options in the
    ``IDEMFN_HTTP`` setting, a dict (every option may be left out)::

        IDEMFN_HTTP = {"store": "redis://localhost:6379/0", "required": True, "wait": 5}

    The options have the names, defaults and meanings of ``idemfn.asgi.IdempotencyMiddleware``'s
    (see there for each): ``store``, ``header``, ``methods``, ``required``, ``scope``,
    ``fingerprint``, ``ttl``, ``lease``, ``wait``, ``deadline``, ``max_key_length``,
    ``max_request_body``, ``max_response_body``, ``recorded_statuses``. ``scope``,
    ``fingerprint`` and ``deadline`` are callables of Django's ``HttpRequest``, or their dotted
    paths (``"shop.idempotency.tenant"``). The setting is read, and its options checked, when
    Django loads its middleware (as its WSGI or ASGI application is made; the test client's, at
    its first request): a bad one raises ``ImproperlyConfigured`` naming
    ``settings.IDEMFN_HTTP`` and the option.

    For a request whose method is in ``methods`` and that carries the key header, the first
    request with a key runs the view, and its response is recorded: status, headers, the
    cookies it sets and its body; later requests with the key get it again, with
    ``Idempotent-Replayed: true``, and the view does not run. Refusals are RFC 9457
    ``application/problem+json`` responses, as ``idemfn.asgi.IdempotencyMiddleware`` lists.

    In Django:

    - Place it below the middleware that ``scope`` relies on (``AuthenticationMiddleware`` for
      ``request.user``): the middleware above it runs for every request, replays included; the
      middleware below it, and the view, once per key, and what they do to the response is
      recorded with it. Hooks that Django runs at the view (``process_view``, such as
      ``CsrfViewMiddleware``'s check) are below it wherever they are listed: a 403 they answer
      a first request is recorded like any response.
    - Django turns an ``Exception`` raised by the view, or by a middleware below this one,
      into a response (500, or 400/403/404 for its own exceptions) before it reaches this
      middleware (around each middleware's layer): that response is recorded like any other
      (leave 500 out of ``recorded_statuses`` to let a retry run again). What does reach it,
      a ``BaseException`` such as ``SystemExit`` (a worker's timeout) or a cancellation (the
      client left, under ASGI), halts the key, then goes on: later requests get 500
      "interrupted".
    - ``scope``, ``fingerprint`` and ``deadline`` are the project's sync code: under ASGI
      they run in a worker thread, as Django runs sync code there, so they may use the ORM
      (``request.user``); an ``async def`` one is refused.
    - The default fingerprint reads ``request.body`` (the view reads it again), so Django's
      ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (2.5 MiB by default) bounds the bodies fingerprinted as
      well as ``max_request_body``: a larger one gets 413 before anything runs. Raise it, or
      give a ``fingerprint`` that does not read the body (large uploads). A body over
      ``max_request_body`` (its ``Content-Length``) gets 413 whatever the fingerprint.
    - A streamed response (``StreamingHttpResponse``, ``FileResponse``) goes to the client as
      it comes, and is recorded (up to ``max_response_body``) when its last chunk is out; one
      that raises, or that is closed before its end (the client left), halts the key.
    - Replays and refusals are ``HttpResponse`` objects with the recorded status, headers,
      cookies and body.

    Sync and async both: under ASGI Django awaits it, and it awaits the store's async
    primitives, never blocking the event loop.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.options: HttpOptions[HttpRequest] = _options_from_settings()
        self._meta = _meta_name(self.options.header)
        self._async = iscoroutinefunction(get_response)
        self._aask: Callable[..., Awaitable[Prepared]] | None = None
        if self._async:
            markcoroutinefunction(self)
            options = self.options
            if options.scope or options.fingerprint or options.deadline:
                # The callables are the project's sync code, which may use the ORM (through
                # request.user, say): under ASGI they run in a worker thread, as Django runs
                # sync code there (SynchronousOnlyOperation on the event loop).
                self._aask = sync_to_async(self._ask)

    def __repr__(self) -> str:
        return f"<idemfn.django.IdempotencyMiddleware {self.options!r}>"

    def __call__(self, request: HttpRequest) -> Any:
        """Guard one request: the response, or (under ASGI) an awaitable of it."""
        if self._async:
            return self._acall(request)
        checked = self._check(request)
        if checked is None:
            return self.get_response(request)
        if isinstance(checked, Response):
            return _answer(checked)
        options = self.options
        step = start(options, *self._ask(request, *checked))
        if isinstance(step, Response):
            return _answer(step)
        request.META[GUARDED] = step.key  # (listed twice: the second lets it through)
        try:
            response = self.get_response(request)
            if response.streaming:  # settled when its chunks end, or halted
                _stream(options, step, response)
                return response
            recorded = _recorded(options, response)
        except BaseException as exc:
            _halt(step, exc)
            raise
        settle(step, recorded)
        return response

    async def _acall(self, request: HttpRequest) -> Any:
        checked = self._check(request)
        if checked is None:
            return await self.get_response(request)
        if isinstance(checked, Response):
            return _answer(checked)
        options = self.options
        if self._aask is None:
            prepared = self._ask(request, *checked)
        else:
            prepared = await self._aask(request, *checked)
        step = await astart(options, *prepared)
        if isinstance(step, Response):
            return _answer(step)
        request.META[GUARDED] = step.key
        try:
            response = await self.get_response(request)
            if response.streaming:
                _stream(options, step, response)
                return response
            recorded = _recorded(options, response)
        except BaseException as exc:  # a cancellation too: the view may have had effects
            await _ahalt(step, exc)
            raise
        await asettle(step, recorded)
        return response

    def _check(self, request: HttpRequest) -> tuple[str, bytes] | Response | None:
        """A guarded request's key and body (``b""`` when the ``fingerprint`` option leaves
        it unread); or the answer to send at once (400, 413); or None: pass it through."""
        options = self.options
        if request.method not in options.methods or _guarded(request):
            return None
        meta = request.META
        value = meta.get(self._meta)
        # Django folds a repeated header into one value joined by ",": read_key refuses it.
        key = read_key(options, [] if value is None else [value.encode()])
        if key is None or isinstance(key, Response):
            return key
        try:
            length = int(meta.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > options.max_request_body:
            return too_large(options, key, length)
        if options.fingerprint is not None:
            return key, b""
        if meta.get("CONTENT_LENGTH"):
            body = _body(options, key, request, length)
        else:  # chunked, or HTTP/2: read no further than the limit
            body = _unannounced_body(options, key, request)
        if isinstance(body, Response):
            return body
        return key, body

    def _ask(self, request: HttpRequest, key: str, body: bytes) -> Prepared:
        """What ``start`` needs: the stored key, fingerprint and deadline (the options'
        callables asked about the request, when set)."""
        stored, fingerprint, due = self.options.identify(
            key,
            lambda: request,
            request.method,
            request.path,
            request.META.get("QUERY_STRING", ""),
            body,
        )
        return key, stored, fingerprint, due


def _options_from_settings() -> HttpOptions[HttpRequest]:
    """The middleware's options, from ``settings.IDEMFN_HTTP`` (absent: every default).

    Raises:
        ImproperlyConfigured: The setting is not a dict, names an unknown option, a dotted
            path that does not import, or an option ``HttpOptions`` refuses; the message
            names the setting and the option.
    """
    given = getattr(conf.settings, _SETTING, None)
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured(
            f"{_WHERE} must be a dict of idemfn.django.IdempotencyMiddleware's options, such"
            f" as {{'store': 'redis://localhost:6379/0'}}, not {given!r}"
        )
    unknown = [name for name in given if name not in _OPTIONS]
    if unknown:
        names = ", ".join(f"{_WHERE}[{name!r}]" for name in unknown)
        raise ImproperlyConfigured(
            f"{names}: no such option of idemfn.django.IdempotencyMiddleware; its options"
            f" are {', '.join(_OPTIONS)}"
        )
    options = dict(given)
    for name in _CALLABLES:
        value = options.get(name)
        if isinstance(value, str):
            try:
                value = options[name] = import_string(value)
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"{_WHERE}[{name!r}]: {value!r} does not import ({exc}); give a callable"
                    " of the request, or the dotted path to one"
                ) from exc
        if iscoroutinefunction(value):
            raise ImproperlyConfigured(
                f"{_WHERE}[{name!r}]: {value!r} is a coroutine function; give a plain function"
                " of the request (under ASGI it runs in a worker thread, as Django runs sync"
                " code, so it may use the ORM and request.user)"
            )
    try:
        return HttpOptions(**options, where=_WHERE)
    except (TypeError, ValueError, StoreError) as exc:
        raise ImproperlyConfigured(str(exc)) from exc


def _meta_name(header: str) -> str:
    """Where Django's ``request.META`` holds request header ``header``."""
    name = header.upper().replace("-", "_")
    return name if name in {"CONTENT_TYPE", "CONTENT_LENGTH"} else f"HTTP_{name}"


_READ_BEFORE = (
    "idemfn.django.IdempotencyMiddleware: the request body was read as a stream before the"
    " middleware could fingerprint it: place the middleware above the one that reads it, or"
    f" give {_WHERE}['fingerprint'] a callable that needs no body"
)


def _guarded(request: HttpRequest) -> bool:
    """Whether an idempotency middleware above holds this request's key already: this one
    listed twice, or ``idemfn.wsgi``/``idemfn.asgi`` around the Django app."""
    return GUARDED in request.META or GUARDED in (getattr(request, "scope", None) or {})


def _unannounced_body(
    options: HttpOptions[HttpRequest], key: str, request: HttpRequest
) -> bytes | Response:
    """A body sent without ``Content-Length``, read up to ``max_request_body`` and kept as
    Django keeps ``request.body`` (so the view reads it again), or 413 past it."""
    try:
        body: bytes = request.read(options.max_request_body + 1)
    except RawPostDataException:
        raise RuntimeError(_READ_BEFORE) from None
    if len(body) > options.max_request_body:
        return too_large(options, key, None)
    request._body = body  # what HttpRequest.body does once it has read the stream
    request._stream = io.BytesIO(body)
    return body


def _body(
    options: HttpOptions[HttpRequest], key: str, request: HttpRequest, length: int
) -> bytes | Response:
    """The request's body, for the default fingerprint, or 413 past the limits."""
    # request.body refuses a body over DATA_UPLOAD_MAX_MEMORY_SIZE (a 400 from Django): the
    # same limit is said as a 413 problem, before anything is read.
    memory = conf.settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if memory is not None and length > memory:
        return too_large(options, key, length, memory)
    try:
        body: bytes = request.body
    except RawPostDataException:
        raise RuntimeError(_READ_BEFORE) from None
    if len(body) > options.max_request_body:  # (Django reads no more than Content-Length)
        return too_large(options, key, len(body))
    if len(body) < length:  # the server's stream ended early: the client left mid-upload
        return incomplete(key, len(body), length)
    return body


# The app's response, on its way out.


def _recorder(options: HttpOptions[HttpRequest], response: Any) -> Recorder:
    """A ``Recorder`` started with the response's status and headers as Django's handlers
    send them: its headers, then a ``Set-Cookie`` for each of its cookies."""
    headers: list[Header] = [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in response.items()
    ]
    headers.extend(
        (b"Set-Cookie", morsel.OutputString().encode("latin-1"))
        for morsel in response.cookies.values()
    )
    recorder = Recorder(options.max_response_body)
    recorder.start(response.status_code, headers, response.reason_phrase)
    return recorder


def _recorded(options: HttpOptions[HttpRequest], response: Any) -> Recorded | None:
    """What to record for a whole (not streamed) response (None: release the key)."""
    recorder = _recorder(options, response)
    recorder.add(response.content)
    return outcome(options, recorder)


def _stream(options: HttpOptions[HttpRequest], claim: Claim, response: Any) -> None:
    """Pass a streamed response's chunks through a recorder that settles ``claim``."""
    recorder = _recorder(options, response)
    chunks = response.streaming_content  # (Django's own wrapper: bytes, sync or async)
    stream: _Stream | _AsyncStream
    hold = response.has_header("Content-Length")
    if response.is_async:
        stream = _AsyncStream(options, claim, recorder, chunks, hold)
    else:
        stream = _Stream(options, claim, recorder, chunks, hold)
    # Django keeps the stream's close() and calls it when it is done with the response; a
    # FileResponse given an iterator no longer hands its file to the server's file wrapper
    # (sendfile), whose bytes would pass by the recorder.
    response.streaming_content = stream


def _closed_early() -> BaseException:
    return ConnectionAbortedError(
        "the streamed response was closed before its end: the client left, or the server"
        " stopped sending it"
    )


class _Stream(HeldBack):
    """A streamed response's chunks on their way to the client: each one recorded (up to the
    limit), the claim settled after the last (before it goes out with a ``Content-Length``:
    ``HeldBack``), halted if they raise or are closed first."""

    __slots__ = ("_chunks", "_claim", "_open", "_options", "_recorder")

    def __init__(
        self,
        options: HttpOptions[HttpRequest],
        claim: Claim,
        recorder: Recorder,
        chunks: Iterator[bytes],
        hold: bool,
    ) -> None:
        super().__init__(hold)
        self._options = options
        self._claim = claim
        self._recorder = recorder
        self._chunks = chunks
        self._open = True  # the claim is not settled yet

    def pull(self) -> bytes | None:
        """The next chunk, or None at the end (the claim settled then)."""
        if not self._open:
            return None
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._open = False
            settle(self._claim, outcome(self._options, self._recorder))
            return None
        except BaseException as exc:
            self._open = False
            _halt(self._claim, exc)
            raise
        self._recorder.add(chunk)
        return chunk

    def close(self) -> None:
        """Django closes the response once it is sent, or abandoned: before the stream's end,
        the key is halted."""
        if self._open:
            self._open = False
            _halt(self._claim, _closed_early())


class _AsyncStream:
    """``_Stream`` for an async iterator: settled on the store's async primitives."""

    __slots__ = ("_chunks", "_claim", "_held", "_hold", "_open", "_options", "_recorder")

    def __init__(
        self,
        options: HttpOptions[HttpRequest],
        claim: Claim,
        recorder: Recorder,
        chunks: AsyncIterator[bytes],
        hold: bool,
    ) -> None:
        self._options = options
        self._claim = claim
        self._recorder = recorder
        self._chunks = chunks
        self._open = True
        self._hold = hold
        self._held: bytes | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self._hold:
            chunk = await self._pull()
            if chunk is None:
                raise StopAsyncIteration
            return chunk
        if self._held is None:
            if not self._open:
                raise StopAsyncIteration
            self._held = await self._pull()
            if self._held is None:
                raise StopAsyncIteration
        following = await self._pull()
        chunk, self._held = self._held, following
        return chunk

    async def _pull(self) -> bytes | None:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            if self._open:
                self._open = False
                await asettle(self._claim, outcome(self._options, self._recorder))
            return None
        except BaseException as exc:  # a cancellation too (the client left, under ASGI)
            if self._open:
                self._open = False
                await _ahalt(self._claim, exc)
            raise
        self._recorder.add(chunk)
        return chunk

    def close(self) -> None:
        """As ``_Stream.close``; Django calls it synchronously: on an event loop, the key is
        halted by a task of that loop, never blocking it; elsewhere (a worker thread), at once."""
        if not self._open:
            return
        self._open = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _halt(self._claim, _closed_early())
            return
        task = loop.create_task(_ahalt(self._claim, _closed_early()))
        _halting.add(task)  # (the loop keeps only a weak reference to its tasks)
        task.add_done_callback(_halting.discard)


def _halt(claim: Claim, exc: BaseException) -> None:
    """Halt ``claim`` for ``exc``, which goes on: later requests get 500 "interrupted"."""
    try:
        claim.halt(exc)
    except IdempotencyError as problem:  # StoreError, OwnershipLost
        _not_halted(claim, problem)


async def _ahalt(claim: Claim, exc: BaseException) -> None:
    """``_halt`` on the store's async primitives."""
    try:
        await claim.ahalt(exc)
    except IdempotencyError as problem:
        _not_halted(claim, problem)


def _not_halted(claim: Claim, problem: IdempotencyError) -> None:
    logger.error(
        "idemfn: the request with key %r failed, and its key could not be halted (%s: %s);"
        " it is judged abandoned once its lease runs out",
        claim.key,
        type(problem).__name__,
        problem,
        extra=log_fields(claim.key, failed(problem)),
    )


# The middleware's own answers.


def _answer(response: Response) -> HttpResponse:
    """A replay or a problem as Django's response: the exact status, headers and body."""
    answer = HttpResponse(response.body, status=response.status, reason=response.reason or None)
    del answer.headers["Content-Type"]  # Django's default: the recorded headers say
    headers = response.headers
    if headers and headers[-1] == REPLAYED:  # the recorded headers, then the marker
        given, own = headers[:-1], headers[-1:]
    else:  # a problem: every header is the middleware's
        given, own = [], headers
    for name, value in given:
        text = value.decode("latin-1")
        if name.lower() == b"set-cookie":
            morsel = _cookie(text)
            answer.cookies[morsel.key or text] = morsel
            continue
        field = name.decode("latin-1")
        if field in answer.headers:  # (one value per name in Django: joined, as RFC 9110 allows)
            text = f"{answer.headers[field]}, {text}"
        answer.headers[field] = text
    for name, value in own:
        answer.headers[_OWN_HEADERS.get(name) or name.decode("latin-1")] = value.decode("latin-1")
    return answer


def _cookie(text: str) -> Morsel[str]:
    """A recorded ``Set-Cookie`` value as a cookie of the response, sent again as it was."""
    parsed: SimpleCookie = SimpleCookie()
    try:
        parsed.load(text)
    except CookieError:
        pass
    if len(parsed) == 1:
        morsel: Morsel[str] = next(iter(parsed.values()))
        if morsel.OutputString() == text:  # (Django writes each cookie as a Morsel does)
            return morsel
    return _RecordedCookie(text)


class _RecordedCookie(Morsel[str]):
    """A recorded ``Set-Cookie`` value that does not parse back into itself: sent verbatim."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def OutputString(self, attrs: Container[str] | None = None) -> str:  # (Morsel's name)
        """The recorded value, as it was."""
        return self._text
