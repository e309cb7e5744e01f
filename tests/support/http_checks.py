"""What the HTTP middleware tests check of a response: a problem, a replay, a first run.

Used with the real servers of ``tests/support/http_servers.py``; the expectations are the
documentation's (docs/http/index.md): RFC 9457 problems whose ``type`` is the docs' anchor and
whose ``detail`` names the key, and replays that are the recorded response again, byte for
byte, with ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx

__all__ = [
    "PROBLEMS",
    "SERVER_HEADERS",
    "assert_first",
    "assert_problem",
    "assert_replay",
    "new_key",
]

PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"
# Set by the server on each response, never by the app: not compared between a first response
# and its replay, but each must come once at most (a replayed Date would come twice).
SERVER_HEADERS = frozenset(
    {"date", "server", "connection", "keep-alive", "transfer-encoding", "content-length"}
)


def new_key() -> str:
    """A key of its own for a test: a UUID, as clients send (it may start with a digit)."""
    return str(uuid.uuid4())


def assert_problem(
    response: httpx.Response, status: int, slug: str, key: str | None = None
) -> dict[str, Any]:
    """``response`` is the ``slug`` problem with ``status``; its ``detail`` names ``key``."""
    context = f"{response.request.method} {response.request.url}: {response.text[:500]!r}"
    assert response.status_code == status, context
    assert response.headers["content-type"] == "application/problem+json", context
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"}, context
    assert body["type"] == PROBLEMS + slug, context
    assert body["status"] == status, context
    assert isinstance(body["title"], str) and body["title"], context
    if key is not None:
        assert key in body["detail"], context
    assert "idempotent-replayed" not in response.headers, context
    if status == 409:
        assert response.headers.get("retry-after") == "1", context
    return dict(body)


def assert_first(response: httpx.Response, status: int) -> None:
    """``response`` is a first run's: ``status``, not marked as a replay."""
    context = f"{response.request.method} {response.request.url}: {response.text[:500]!r}"
    assert response.status_code == status, context
    assert "idempotent-replayed" not in response.headers, context
    _once_each(response)


def assert_replay(first: httpx.Response, replay: httpx.Response) -> None:
    """``replay`` is ``first`` again: the same status, the same body bytes, the same headers
    the app set (Set-Cookie, X-Order...), plus ``Idempotent-Replayed: true``; the server's own
    headers (Date, Server, Connection...) once each, never a recorded one added to them."""
    context = f"{replay.request.method} {replay.request.url}: {replay.text[:500]!r}"
    assert replay.status_code == first.status_code, context
    assert replay.content == first.content, context
    assert replay.headers.get_list("idempotent-replayed") == ["true"], context
    assert "idempotent-replayed" not in first.headers
    app_headers = {name.lower() for name in first.headers} - SERVER_HEADERS
    for name in app_headers:
        assert replay.headers.get_list(name) == first.headers.get_list(name), (name, context)
    assert {name.lower() for name in replay.headers} - SERVER_HEADERS == app_headers | {
        "idempotent-replayed"
    }, context
    _once_each(replay)


def _once_each(response: httpx.Response) -> None:
    for name in SERVER_HEADERS:
        assert len(response.headers.get_list(name)) <= 1, (name, response.headers)
    length = response.headers.get("content-length")
    if length is not None:
        assert "transfer-encoding" not in response.headers, response.headers
        assert int(length) == len(response.content), response.headers
