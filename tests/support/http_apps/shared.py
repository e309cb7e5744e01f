"""What the test applications share: their side effects, the hold, and the middleware options.

Every app reads its environment, which the test that starts the server sets:

- ``IDEMFN_TEST_EFFECTS``: a file each handler run appends one JSON line to (``effect``), which
  is how the tests count runs across worker processes: ``{"key", "scope", "pid", "path"}``;
- ``IDEMFN_TEST_RELEASE``: a file a ``?hold=1`` request waits for (``hold``/``ahold``), so a
  test can find a handler running, race duplicates against it or SIGKILL its worker;
- ``IDEMFN_HTTP_OPTIONS``: the middleware's options as JSON (``middleware_options``);
- ``IDEMFN_HTTP_BARE=1``: the same app without the middleware (the benchmark's floor);
- ``IDEMFN_STORE``: the store, when the options name none.

The routes, the same in every app: ``GET /health``; ``POST /orders`` (``?hold=1`` waits for the
release), ``/fail`` (raises), ``/status/{code}``, ``/big?size=N``, ``/stream?chunks=N&size=M``
(streamed), ``/hop`` (a Date and a hop-by-hop header of the app's own). Each POST appends its
effect line first.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Protocol

# How long a held handler waits for its release at most: a test that never releases (it failed)
# must not leave a worker busy forever.
HOLD_LIMIT = 120.0
# The chunks of /stream and the bytes of /big: not one repeated byte, so that a replay that
# loses or reorders a part is seen.
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyz\n"


class _Headers(Protocol):
    def get(self, name: str, default: Any = None) -> Any: ...


class _Request(Protocol):
    """What the options' callables use of a request: idemfn's ``Request`` view (ASGI, WSGI)
    and Django's ``HttpRequest`` both have a case-insensitive ``headers.get``."""

    @property
    def headers(self) -> _Headers: ...


def options_from_env() -> dict[str, Any]:
    """``IDEMFN_HTTP_OPTIONS`` as JSON (``{}`` when unset), before the test-only names are
    turned into the middleware's options."""
    return dict(json.loads(os.environ.get("IDEMFN_HTTP_OPTIONS") or "{}"))


def key_header() -> str:
    """The header that carries the key (the ``header`` option, else the default)."""
    return str(options_from_env().get("header", "Idempotency-Key"))


def bare() -> bool:
    """Whether the app is served without the middleware (``IDEMFN_HTTP_BARE=1``)."""
    return os.environ.get("IDEMFN_HTTP_BARE") == "1"


def middleware_options() -> dict[str, Any]:
    """The middleware's options: ``IDEMFN_HTTP_OPTIONS``'s plain options as they are, and:

    - ``"scope_header": name``: ``scope=`` the value of that request header (or None);
    - ``"deadline_header": name``: ``deadline=`` that header's ISO 8601 time (or None);
    - ``"recorded_statuses": [...]``: a list of statuses, as it is;
    - ``"methods": [...]``: a tuple.
    """
    options = options_from_env()
    scope_header = options.pop("scope_header", None)
    if scope_header is not None:

        def scope(request: _Request) -> str | None:
            value = request.headers.get(scope_header)
            return None if value is None else str(value)

        options["scope"] = scope
    deadline_header = options.pop("deadline_header", None)
    if deadline_header is not None:

        def deadline(request: _Request) -> datetime | None:
            value = request.headers.get(deadline_header)
            return None if value is None else datetime.fromisoformat(str(value))

        options["deadline"] = deadline
    if "methods" in options:
        options["methods"] = tuple(options["methods"])
    return options


def effect(key: str | None, scope: str | None, path: str) -> int:
    """Append this run's line to the effects file (one ``write`` with ``O_APPEND``: lines of
    concurrent workers never interleave); return how many lines the file has now."""
    name = os.environ["IDEMFN_TEST_EFFECTS"]
    line = json.dumps({"key": key, "scope": scope, "pid": os.getpid(), "path": path}) + "\n"
    fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    with open(name, "rb") as f:
        return sum(1 for _ in f)


def _released() -> bool:
    return os.path.exists(os.environ["IDEMFN_TEST_RELEASE"])


def hold() -> None:
    """Block until the release file exists (checked every 10 ms), or ``HOLD_LIMIT`` seconds."""
    give_up = time.monotonic() + HOLD_LIMIT
    while not _released() and time.monotonic() < give_up:
        time.sleep(0.01)


async def ahold() -> None:
    """``hold`` without blocking the event loop: other requests go on meanwhile."""
    give_up = time.monotonic() + HOLD_LIMIT
    while not _released() and time.monotonic() < give_up:
        await asyncio.sleep(0.01)


def big(size: int) -> bytes:
    """``size`` bytes of ``PATTERN``."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def chunks(count: int, size: int) -> Iterator[bytes]:
    """``count`` chunks of ``size`` bytes each, each starting with its number."""
    for i in range(count):
        head = f"chunk {i}:".encode()
        yield (head + big(size))[:size] if size > len(head) else head


def order(count: int, raw: bytes) -> dict[str, Any]:
    """/orders' JSON answer: the run's number, its process and the request's body (its JSON, or
    its length when it is not JSON)."""
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"length": len(raw)}
    return {"order": count, "pid": os.getpid(), "body": body}


# /hop's headers that a replay must not repeat: a Date of its own (the server adds its own too)
# and a hop-by-hop header (gunicorn drops it; uvicorn sends it).
HOP_HEADERS = {"Date": "Mon, 01 Jan 2001 00:00:00 GMT", "Keep-Alive": "timeout=99"}


def status_text(code: int) -> str:
    """/status/{code}'s body."""
    return f"status {code}\n"
