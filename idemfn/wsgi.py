"""An Idempotency-Key middleware for WSGI apps: Flask, Bottle, Pyramid, any WSGI app.

A client that retries a request with the same ``Idempotency-Key`` header gets the first
response again, replayed, instead of having the request run twice::

    from flask import Flask
    from idemfn.wsgi import IdempotencyMiddleware

    app = Flask(__name__)
    app.wsgi_app = IdempotencyMiddleware(
        app.wsgi_app,
        store="redis://localhost:6379/0",
        scope=lambda request: request.headers.get("x-api-key"),  # one key space per client
    )

The options and answers are ``idemfn.asgi.IdempotencyMiddleware``'s, the same names and
defaults; see it, and the documentation's HTTP page.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Collection, Container, Iterable, Iterator
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import IdempotencyError
from ._http.exchange import (
    GUARDED,
    HeldBack,
    Recorder,
    Response,
    incomplete,
    not_settled,
    outcome,
    read_key,
    settle,
    start,
    too_large,
)
from ._http.options import DEFAULT_METHODS, HttpOptions, MiB
from ._http.request import Headers, Request
from ._stores import Store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ._engine import Claim

__all__ = ["Headers", "IdempotencyMiddleware", "Request"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class IdempotencyMiddleware:
    """Run each request that carries an ``Idempotency-Key`` once; replay its response after.

    The WSGI twin of ``idemfn.asgi.IdempotencyMiddleware``: the same options, defaults and
    answers (replays with ``Idempotent-Replayed: true``; problem+json 400, 409, 413, 422, 500
    "interrupted", 503). The ``scope``, ``fingerprint`` and ``deadline`` callables get a
    ``Request`` (method, path, query, headers, body, and the ``environ`` as ``raw``).

    The app's response is kept whole, up to ``max_response_body``, before it goes out, so that
    it is recorded before the client sees it; a longer one is streamed from there on and
    recorded as not kept (later requests get 500 "response-not-recorded"; the app never runs
    twice). An app that raises, or whose response iterator raises or is closed before its end
    (the client left), halts the key: later requests get 500 "interrupted".

    Args:
        app: The WSGI app to guard (for Flask, ``app.wsgi_app``).
        store: As ``idemfn.asgi.IdempotencyMiddleware``'s. Default None: the default store.
        header: The key's header. Default ``"Idempotency-Key"``.
        methods: The methods guarded. Default ``("POST", "PATCH")``.
        required: Whether a request without the header gets 400. Default False.
        scope: A callable of the ``Request`` giving the tenant, or None. Default None.
        fingerprint: A callable of the ``Request`` giving what must match. Default None:
            method, path, query and body.
        ttl: How long a response is replayed. Default 86400 (a day).
        lease: How long a claim stays valid without renewal. Default 30.
        wait: How long to wait for a duplicate running elsewhere. Default 0: 409 at once.
        deadline: A callable of the ``Request`` giving when it must no longer run, or None.
        max_key_length: The longest key accepted. Default 255.
        max_request_body: The largest request body read, in bytes. Default 10 MiB.
        max_response_body: The largest response body recorded, in bytes. Default 1 MiB.
        recorded_statuses: The statuses recorded (others release the key). Default None: all.

    Raises:
        TypeError: An option of the wrong type; the message names it.
        ValueError: An option out of range, or a store that does not exist.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        store: Store | str | os.PathLike[str] | None = None,
        header: str = "Idempotency-Key",
        methods: Collection[str] = DEFAULT_METHODS,
        required: bool = False,
        scope: Callable[[Request], str | None] | None = None,
        fingerprint: Callable[[Request], str | bytes] | None = None,
        ttl: float | timedelta | None = 86400.0,
        lease: float | timedelta = 30.0,
        wait: float | timedelta = 0.0,
        deadline: Callable[[Request], datetime | None] | None = None,
        max_key_length: int = 255,
        max_request_body: int = 10 * MiB,
        max_response_body: int = MiB,
        recorded_statuses: Container[int] | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"IdempotencyMiddleware(app=...) must be a WSGI app, not {app!r}")
        self.app = app
        self.options: HttpOptions[Request] = HttpOptions(
            store=store,
            header=header,
            methods=methods,
            required=required,
            scope=scope,
            fingerprint=fingerprint,
            ttl=ttl,
            lease=lease,
            wait=wait,
            deadline=deadline,
            max_key_length=max_key_length,
            max_request_body=max_request_body,
            max_response_body=max_response_body,
            recorded_statuses=recorded_statuses,
            where="idemfn.wsgi.IdempotencyMiddleware",
        )
        self._environ_key = "HTTP_" + header.upper().replace("-", "_")

    def __repr__(self) -> str:
        return f"<idemfn.wsgi.IdempotencyMiddleware of {self.app!r} {self.options!r}>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Guard one request (a WSGI call)."""
        options = self.options
        method = environ["REQUEST_METHOD"].upper()  # as frameworks route it (Werkzeug)
        if method not in options.methods or GUARDED in environ:
            return self.app(environ, start_response)
        # A header sent twice arrives folded into one value, "a, b": read_key refuses it.
        value = environ.get(self._environ_key)
        key = read_key(options, [] if value is None else [value.encode("latin-1")])
        if key is None:
            return self.app(environ, start_response)
        if isinstance(key, Response):
            return _respond(start_response, key)
        body = _read_body(options, key, environ)
        if isinstance(body, Response):
            return _respond(start_response, body)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        stored, fingerprint, due = options.identify(
            key,
            lambda: _request(environ, body),
            method,
            _path(environ),
            environ.get("QUERY_STRING", ""),
            body,
        )
        step = start(options, key, stored, fingerprint, due)
        if isinstance(step, Response):
            return _respond(start_response, step)
        environ[GUARDED] = stored  # (an app wrapped twice: the inner middleware lets it through)
        return _Run(self.app, options, step, start_response).respond(environ)


class _Run:
    """The first request with a key: run the app, keep its response, record it, send it.

    The response is kept whole up to ``max_response_body`` and recorded before it goes out;
    past that, the headers go out and the rest is streamed (``_Stream``), never buffered."""

    __slots__ = (
        "app",
        "claim",
        "closed",
        "headers",
        "options",
        "pending",
        "real_start",
        "real_write",
        "recorder",
        "result",
        "settled",
        "status_line",
        "written",
    )

    def __init__(
        self,
        app: WSGIApplication,
        options: HttpOptions[Request],
        claim: Claim,
        start_response: StartResponse,
    ) -> None:
        self.app = app
        self.options = options
        self.claim = claim
        self.real_start = start_response
        self.real_write: Callable[[bytes], object] | None = None  # set once headers went out
        self.recorder = Recorder(options.max_response_body)
        self.pending: deque[bytes] = deque()  # produced, not yet sent
        self.status_line = ""
        self.headers: list[tuple[str, str]] = []
        self.result: Iterable[bytes] | None = None
        self.closed = False
        self.settled = False
        self.written = False  # write() was called

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and (
            self.real_write is not None or self.written or self.recorder.size
        ):
            # PEP 3333: the headers went out, as far as the app knows (it wrote or yielded)
            raise exc_info[1].with_traceback(exc_info[2])
        self.status_line = status  # (before anything went out, an error page replaces it)
        self.headers = headers
        code, _, reason = status.partition(" ")
        self.recorder.start(
            int(code),
            [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers],
            reason,
        )
        return self.write

    def write(self, chunk: bytes) -> None:
        """PEP 3333's legacy ``write()``: kept like the iterable's chunks, sent past the limit."""
        self.written = True
        self.recorder.add(chunk)
        self.pending.append(chunk)
        if self.real_write is None:
            if not self.recorder.overflowed:
                return
            self.send_headers()
        write = self.real_write
        assert write is not None
        while self.pending:
            write(self.pending.popleft())

    def send_headers(self) -> None:
        self.real_write = self.real_start(self.status_line, self.headers)

    def respond(self, environ: WSGIEnvironment) -> Iterable[bytes]:
        try:
            self.result = self.app(environ, self.start_response)  # type: ignore[arg-type]
            chunks = iter(self.result)
            if self.real_write is None:  # (write() may have gone past the limit already)
                for chunk in chunks:
                    self.pending.append(chunk)
                    self.recorder.add(chunk)
                    if self.recorder.overflowed:
                        break
                else:
                    self.close()
                    if not self.status_line:
                        raise RuntimeError("the app returned without calling start_response")
        except BaseException as exc:  # the app raised: the key is halted
            self.end(exc)
            raise
        if not self.closed:  # over max_response_body: streamed from here on
            if self.real_write is None:
                self.send_headers()
            return _Stream(self, chunks)
        self.recorder.finished = True
        self.settle()
        if self.real_write is None:
            self.send_headers()
        return self.pending

    def close(self) -> None:
        """Close the app's iterable, once, whatever its ``close()`` does."""
        if not self.closed:
            self.closed = True
            _close(self.result)

    def settle(self) -> None:
        if not self.settled:
            self.settled = True
            settle(self.claim, outcome(self.options, self.recorder))

    def end(self, exc: BaseException) -> None:
        """The response ended with ``exc``: close the app's iterable, halt the key."""
        try:
            self.close()
        finally:
            if not self.settled:
                self.settled = True
                try:
                    self.claim.fail(exc)
                except IdempotencyError as problem:
                    not_settled(self.claim, problem)


class _Stream(HeldBack):
    """The rest of a response over ``max_response_body``, as the server iterates it: recorded
    as not kept at its end; the key halted if it raises, or if the server closes it before its
    end (the client left), even before iterating it. The last chunk waits for the record when
    the response has a ``Content-Length`` (``HeldBack``)."""

    __slots__ = ("chunks", "run")

    def __init__(self, run: _Run, chunks: Iterator[bytes]) -> None:
        super().__init__(any(name.lower() == "content-length" for name, _ in run.headers))
        self.run = run
        self.chunks = chunks

    def pull(self) -> bytes | None:
        """The next chunk (those kept before the limit first), or None at the app's end."""
        run = self.run
        if run.pending:
            return run.pending.popleft()
        if run.settled:
            return None
        try:
            chunk = next(self.chunks)
        except StopIteration:
            self._finish()
            return None
        except BaseException as exc:
            run.end(exc)
            raise
        run.recorder.add(chunk)
        return chunk

    def _finish(self) -> None:
        run = self.run
        try:
            run.close()
        except BaseException as exc:
            run.end(exc)
            raise
        run.settle()

    def close(self) -> None:
        """Called by the server when it is done: before the end, the client left."""
        run = self.run
        if not run.settled:
            run.end(RuntimeError("the server closed the response before its end (client left?)"))


def _close(result: Iterable[bytes] | None) -> None:
    close: Any = getattr(result, "close", None)
    if close is not None:
        close()


def _request(environ: WSGIEnvironment, body: bytes) -> Request:
    items = [
        (name[5:].replace("_", "-").lower(), value)
        for name, value in environ.items()
        if name.startswith("HTTP_")
    ]
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(name):
            items.append((name.replace("_", "-").lower(), environ[name]))
    return Request(
        environ["REQUEST_METHOD"],
        _path(environ),
        environ.get("QUERY_STRING", ""),
        Headers(items),
        body,
        environ,
    )


def _path(environ: WSGIEnvironment) -> str:
    path: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    # PEP 3333 hands the path over as latin-1 text of the raw bytes: give it back as UTF-8.
    return path.encode("latin-1").decode("utf-8", "surrogateescape")


def _read_body(
    options: HttpOptions[Request], key: str, environ: WSGIEnvironment
) -> bytes | Response:
    """The whole request body, or 413 past ``max_request_body``."""
    limit = options.max_request_body
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.strip().isascii() and length.strip().isdigit():
        size = int(length)
        if size > limit:
            return too_large(options, key, size)
        body = _read(stream, size)
        if len(body) < size:  # the server's stream ends early when the client leaves
            return incomplete(key, len(body), size)
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""  # PEP 3333: without a length, the body cannot be read safely
    chunks: list[bytes] = []
    size = 0
    while True:  # a chunked body the server ends for us: read it, stopping past the limit
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return too_large(options, key, None)
        chunks.append(chunk)


def _read(stream: Any, size: int) -> bytes:
    """``size`` bytes of ``stream``, or fewer if it ends first (``read`` may return less)."""
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    # PEP 3333 wants a reason phrase: the recorded one, else the standard one.
    reason = response.reason or _REASONS.get(response.status, "Unknown")
    status = f"{response.status} {reason}"
    start_response(
        status,
        [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers],
    )
    return [response.body]


def _reasons() -> dict[int, str]:
    from http import HTTPStatus

    return {status.value: status.phrase for status in HTTPStatus}


_REASONS = _reasons()
