"""An Idempotency-Key middleware for ASGI apps: Starlette, FastAPI, Litestar, any ASGI 3 app.

A client that retries a request with the same ``Idempotency-Key`` header gets the first
response again, replayed, instead of having the request run twice::

    from starlette.applications import Starlette
    from idemfn.asgi import IdempotencyMiddleware

    app = Starlette(routes=[...])
    app.add_middleware(
        IdempotencyMiddleware,
        store="redis://localhost:6379/0",
        scope=lambda request: request.headers.get("x-api-key"),  # one key space per client
    )

or, for any ASGI 3 app, ``app = IdempotencyMiddleware(app, ...)``. Nothing beyond idemfn itself
is needed (``pip install 'idemfn[asgi]'`` says so in a requirements file). The answers follow
the IETF Idempotency-Key draft: see ``IdempotencyMiddleware`` and the documentation's HTTP page.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Collection, Container, MutableMapping
from datetime import datetime, timedelta
from typing import Any

from ._errors import IdempotencyError
from ._http.exchange import (
    GUARDED,
    Recorder,
    Response,
    asettle,
    astart,
    not_settled,
    outcome,
    read_key,
    too_large,
)
from ._http.options import DEFAULT_METHODS, HttpOptions, MiB
from ._http.request import Headers, Request
from ._stores import Store
from .events import HALTED, log_fields

__all__ = ["Headers", "IdempotencyMiddleware", "Request"]

logger = logging.getLogger("idemfn")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Extensions that let an app send a file by path: its bytes would never pass through here to
# be recorded, so the app is not told the server has them.
_PATH_SENDS = ("http.response.pathsend", "http.response.zerocopysend")


class IdempotencyMiddleware:
    """Run each request that carries an ``Idempotency-Key`` once; replay its response after.

    For a request whose method is in ``methods`` and that carries the key header: the first
    request with a key runs the app, and its response (status, headers, body) is recorded;
    a later request with that key gets the recorded response again, with
    ``Idempotent-Replayed: true``, and the app does not run. Every error is an RFC 9457
    ``application/problem+json`` response whose ``type`` names the case:

    - no key and ``required``; the header twice; an empty, too long or malformed key: 400;
    - a request body over ``max_request_body``: 413 (the app does not run);
    - the key is running elsewhere: 409 with ``Retry-After`` (or, with ``wait``, the recorded
      response once it is ready);
    - the key was used with another request (``fingerprint``): 422;
    - the first request's app raised, was cancelled, or its worker died: 500 "interrupted",
      for as long as the key is kept: it never runs twice;
    - past the request's ``deadline`` with nothing recorded: 400 "request-expired";
    - the store failed: 503 (the app does not run).

    Requests of other methods, and without the header (unless ``required``), pass through
    untouched, as do WebSocket and lifespan messages.

    Args:
        app: The ASGI 3 app to guard.
        store: Where responses are recorded: a ``Store``, a directory or a store URL
            (``redis://...``, ``postgresql://...``). Default None: ``IDEMFN_STORE`` if set,
            else the default ``DiskStore``, shared by every worker process of the machine. Use
            Redis or PostgreSQL when workers run on several machines.
        header: The request header holding the key. Default ``"Idempotency-Key"``.
        methods: The methods guarded. Default ``("POST", "PATCH")``.
        required: Whether a guarded request without the header is refused with 400 (True) or
            passed through (False, the default).
        scope: A callable of the ``Request`` giving the tenant (an API key, an account id),
            or None: requests of two tenants never share a key. Default None: one key space
            for every client (set it in any API with more than one client).
        fingerprint: A callable of the ``Request`` giving what must match for a key's
            requests (``str`` or ``bytes``; ``""`` checks nothing). Default None: the method,
            path, query and body.
        ttl: How long a response is replayed: seconds or a ``timedelta``; None keeps it until
            forgotten. Default 86400 (a day).
        lease: How long a request's claim stays valid without renewal (a heartbeat renews it
            while the app runs): seconds or a ``timedelta``. Default 30.
        wait: How long a request waits for a duplicate running elsewhere to finish, then
            replays its response, before answering 409: seconds or a ``timedelta``. Default
            0: 409 at once.
        deadline: A callable of the ``Request`` giving when the request must no longer run
            (an aware ``datetime``, e.g. a client's reference time plus an expiration), or
            None. Default None: no deadline.
        max_key_length: The longest key accepted, in characters. Default 255.
        max_request_body: The largest request body read (and fingerprinted), in bytes.
            Default 10 MiB; a larger one gets 413 and nothing runs.
        max_response_body: The largest response body recorded, in bytes. Default 1 MiB; a
            larger one still reaches its client whole, and later requests with its key get
            500 "response-not-recorded" (never a second run).
        recorded_statuses: The response statuses recorded, such as ``range(200, 500)``;
            after any other the key is released, so a retry runs the app again. Default None:
            every status.

    Raises:
        TypeError: An option of the wrong type; the message names it.
        ValueError: An option out of range, or a store that does not exist; the message
            names it.
    """

    def __init__(
        self,
        app: ASGIApp,
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
            raise TypeError(f"IdempotencyMiddleware(app=...) must be an ASGI app, not {app!r}")
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
            where="idemfn.asgi.IdempotencyMiddleware",
        )

    def __repr__(self) -> str:
        return f"<idemfn.asgi.IdempotencyMiddleware of {self.app!r} {self.options!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard one request (an ASGI 3 call); other scopes go to the app untouched."""
        options = self.options
        if scope["type"] != "http" or scope["method"] not in options.methods or GUARDED in scope:
            await self.app(scope, receive, send)
            return
        name = options.header_bytes
        key = read_key(options, [value for found, value in scope["headers"] if found == name])
        if key is None:
            await self.app(scope, receive, send)
            return
        if isinstance(key, Response):
            await _respond(send, key, scope)
            return
        body = await _read_body(options, key, scope, receive)
        if body is None:  # the client left before sending its whole request: nothing ran
            return
        if isinstance(body, Response):
            await _respond(send, body, scope)
            return
        stored, fingerprint, due = options.identify(
            key,
            lambda: _request(scope, body),
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            body,
        )
        step = await astart(options, key, stored, fingerprint, due)
        if isinstance(step, Response):
            await _respond(send, step, scope)
            return
        extensions = scope.get("extensions")
        if extensions and any(name in extensions for name in _PATH_SENDS):
            scope = dict(scope)
            scope["extensions"] = {
                name: value for name, value in extensions.items() if name not in _PATH_SENDS
            }
        scope[GUARDED] = stored  # (an app wrapped twice: the inner middleware lets it through)
        recorder = Recorder(options.max_response_body)
        body_given = False
        client_gone = False

        async def app_receive() -> Message:
            nonlocal body_given
            if not body_given:  # the body read for the fingerprint, then the server's messages
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        trailing = False  # the response ends with http.response.trailers, not its last body

        async def app_send(message: Message) -> None:
            nonlocal client_gone, trailing
            kind = message["type"]
            ends = False
            if kind == "http.response.start":
                # Headers may be any iterable: read once, the list goes on to the server.
                message = {**message, "headers": list(message.get("headers", ()))}
                recorder.start(message["status"], message["headers"])
                trailing = bool(message.get("trailers", False))
            elif kind == "http.response.body":
                recorder.add(message.get("body", b""))
                ends = not message.get("more_body", False) and not trailing
            elif kind == "http.response.trailers":
                message = {**message, "headers": list(message.get("headers", ()))}
                recorder.trailers.extend(message["headers"])
                ends = not message.get("more_trailers", False)
            if ends and recorder.status:
                # Recorded before the client sees the end: a client that got the whole
                # response and retries is replayed it, not told to wait.
                recorder.finished = True
                await asettle(step, outcome(options, recorder))
            if client_gone:
                if recorder.overflowed:  # it can no longer be recorded: stop the app
                    raise OSError("the client left, and the response is too large to record")
                return
            try:
                await send(message)
            except OSError:
                # The client left. While its response can still be recorded, let the app
                # finish so that the retry is replayed it; past the limit, stop the app.
                if recorder.overflowed:
                    raise
                client_gone = True

        async with step:  # an exception or a cancellation escaping the app halts the key
            await self.app(scope, app_receive, app_send)
            if not recorder.finished:
                # E.g. Starlette's StreamingResponse stops when its client leaves: the key is
                # halted (its effects may have happened), quietly: nothing failed on the server.
                logger.warning(
                    "idemfn: the app returned before finishing its response to key %r (the"
                    " client left?); the key is halted",
                    key,
                    extra=log_fields(step.key, HALTED),
                )
                try:
                    await step.ahalt(RuntimeError("the app returned before finishing its response"))
                except IdempotencyError as problem:
                    not_settled(step, problem)


def _request(scope: Scope, body: bytes) -> Request:
    headers = Headers(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
    )
    query = scope.get("query_string", b"").decode("latin-1")
    return Request(scope["method"], scope["path"], query, headers, body, scope)


async def _read_body(
    options: HttpOptions[Request], key: str, scope: Scope, receive: Receive
) -> bytes | Response | None:
    """The whole request body (None: the client disconnected first), or 413 past the limit."""
    limit = options.max_request_body
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return too_large(options, key, int(value))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large(options, key, None)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, response: Response, scope: Scope) -> None:
    # Recorded trailers go to a server that can send them (ASGI's trailers extension).
    trailers = bool(response.trailers) and "http.response.trailers" in (
        scope.get("extensions") or {}
    )
    start: Message = {
        "type": "http.response.start",
        "status": response.status,
        "headers": response.headers,
    }
    if trailers:
        start["trailers"] = True
    await send(start)
    await send({"type": "http.response.body", "body": response.body})
    if trailers:
        await send(
            {
                "type": "http.response.trailers",
                "headers": list(response.trailers),
                "more_trailers": False,
            }
        )
