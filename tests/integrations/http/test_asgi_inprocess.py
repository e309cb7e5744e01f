"""``idemfn.asgi.IdempotencyMiddleware`` in-process: raw ASGI calls (receive and send of our
own, under ``asyncio.run``), then Starlette and FastAPI apps through httpx's ASGI transport.

Every table row of docs/http: replays, 409 and ``wait``, 422, each 400, 413, a client that
leaves while sending its body or while reading the response, an app that raises, is cancelled,
returns without answering or answers more than ``max_response_body``, the pass-through of
what is not guarded, ``scope``, ``deadline``, ``fingerprint``, a failing store, and that the
async path never calls a store's sync primitives. Real servers: test_servers.py.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from idemfn import DiskStore, MemoryStore, Store, StoreError
from idemfn._record import Entry
from idemfn.asgi import IdempotencyMiddleware, Request

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"
REPLAYED = (b"idempotent-replayed", b"true")
TIMEOUT = 60.0  # a test that hangs fails instead; nothing here should take a second


def run(main: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main, TIMEOUT)

    return asyncio.run(bounded())


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A MemoryStore (async primitives inline) and a DiskStore (sync ones, off the loop)."""
    made: Store = MemoryStore() if request.param == "memory" else DiskStore(tmp_path / "store")
    yield made
    made.close()


def middleware(app: Any, store: Store, **options: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(app, store=store, **options)


# -- one request, driven by hand ----------------------------------------------------------------


def http_scope(
    *,
    method: str = "POST",
    path: str = "/orders",
    query: bytes = b"",
    key: str | bytes | None = "k1",
    headers: Iterable[tuple[bytes, bytes]] = (),
    body_length: int | None = None,
    extensions: dict[str, Any] | None = None,
) -> Message:
    listed = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    if key is not None:
        listed.append((b"idempotency-key", key.encode() if isinstance(key, str) else key))
    if body_length is not None:
        listed.append((b"content-length", str(body_length).encode()))
    listed.extend(headers)
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": listed,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


@dataclass
class Client:
    """The server's side of one request: hands the body out as ``chunks`` (then, once the
    response has ended, ``http.disconnect``) and keeps what reaches the client.

    ``leaves_after``: the client disconnects after that many body chunks, mid-request.
    ``leaves``: the client disconnects once its request is sent, without waiting for the end.
    ``gone_from``: ``send`` raises OSError from that response body message on (0: the first),
    as a server does for a client that left."""

    chunks: list[bytes]
    leaves_after: int | None = None
    gone_from: int | None = None
    leaves: bool = False
    received: int = 0  # receive() calls
    delivered: list[Message] = field(default_factory=list)
    attempted: list[Message] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    bodies_sent: int = 0

    async def receive(self) -> Message:
        self.received += 1
        given = self.received - 1
        if self.leaves_after is not None and given >= self.leaves_after:
            return {"type": "http.disconnect"}
        if given < len(self.chunks):
            more = given < len(self.chunks) - 1 or self.leaves_after is not None
            return {"type": "http.request", "body": self.chunks[given], "more_body": more}
        if not self.leaves:
            await self.ended.wait()  # a server says http.disconnect once the response is over
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.attempted.append(message)
        if message["type"] == "http.response.body":
            self.bodies_sent += 1
            if self.gone_from is not None and self.bodies_sent > self.gone_from:
                raise OSError("the client left")
            if not message.get("more_body", False):
                self.ended.set()
        self.delivered.append(message)


@dataclass
class Answer:
    """What reached the client."""

    messages: list[Message]

    @property
    def status(self) -> int:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return int(starts[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return [(bytes(name), bytes(value)) for name, value in start.get("headers", [])]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def complete(self) -> bool:
        last = self.messages[-1] if self.messages else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)

    def header(self, name: bytes) -> bytes | None:
        values = [value for found, value in self.headers if found.lower() == name]
        assert len(values) <= 1, values
        return values[0] if values else None

    @property
    def replayed(self) -> bool:
        return self.header(b"idempotent-replayed") == b"true"

    def problem(self, status: int, slug: str, key: str | None = "k1") -> dict[str, Any]:
        """The RFC 9457 body, checked: its type, status, content type, and the key named."""
        assert self.status == status, (self.status, self.body)
        assert self.header(b"content-type") == b"application/problem+json"
        assert self.header(b"content-length") == str(len(self.body)).encode()
        assert not self.replayed
        body: dict[str, Any] = json.loads(self.body)
        assert set(body) == {"type", "title", "status", "detail"}
        assert body["type"] == PROBLEMS + slug
        assert body["status"] == status
        if key is not None:
            assert repr(key) in body["detail"], body["detail"]
        return body


async def call(
    app: Any,
    *,
    body: bytes = b'{"item": 1}',
    chunks: list[bytes] | None = None,
    length: bool = True,
    client: Client | None = None,
    **scope_options: Any,
) -> Answer:
    """One request through ``app``, as a server makes it."""
    if client is None:
        client = Client([body] if chunks is None else chunks)
    if length:
        scope_options.setdefault("body_length", sum(map(len, client.chunks)))
    await app(http_scope(**scope_options), client.receive, client.send)
    return Answer(client.delivered)


# -- apps ---------------------------------------------------------------------------------------


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


APP_HEADERS = [
    (b"content-type", b"application/json"),
    (b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"),  # never replayed
    (b"connection", b"keep-alive"),  # never replayed (hop-by-hop)
    (b"x-custom", b"caf\xe9"),  # latin-1, as HTTP allows
    (b"set-cookie", b"a=1"),
    (b"set-cookie", b"b=2"),
]


class Orders:
    """Counts its runs; answers ``status`` with the body it read and its run number.

    ``chunks``: the response body is sent as that many messages. ``gate``: wait for
    ``release`` after reading the body (``entered`` set), to hold the request mid-app."""

    def __init__(self, status: int = 201, chunks: int = 1, gate: bool = False) -> None:
        self.status = status
        self.chunks = chunks
        self.gate = gate
        self.runs = 0
        self.finished = 0
        self.bodies: list[bytes] = []
        self.calls: list[tuple[Message, Receive, Send]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.calls.append((scope, receive, send))
        if scope["type"] != "http":
            return
        self.runs += 1
        run = self.runs
        body = await read_body(receive)
        self.bodies.append(body)
        if self.gate:
            self.entered.set()
            await self.release.wait()
        payload = json.dumps({"run": run, "body": body.decode("latin-1")}).encode()
        headers = [*APP_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        size = -(-len(payload) // self.chunks)
        parts = [payload[i : i + size] for i in range(0, len(payload), size)]
        for i, part in enumerate(parts):
            await send(
                {"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1}
            )
        self.finished += 1


class Streams:
    """Answers 200 with ``parts`` as separate body messages (then an empty last one)."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.runs = 0
        self.finished = 0
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.runs += 1
        await read_body(receive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
            for part in self.parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException as exc:
            self.errors.append(exc)
            raise
        self.finished += 1


# -- replays ------------------------------------------------------------------------------------


def test_the_first_request_runs_and_a_retry_is_replayed_identically(store: Store) -> None:
    app = Orders()
    mw = middleware(app, store)

    async def main() -> None:
        first = await call(mw)
        assert first.status == 201 and not first.replayed
        assert json.loads(first.body) == {"run": 1, "body": '{"item": 1}'}
        # The first response is the app's, untouched (its Date and Connection too).
        assert first.headers[: len(APP_HEADERS)] == APP_HEADERS
        for _ in range(2):
            again = await call(mw)
            assert again.status == 201
            assert again.body == first.body
            assert again.headers == [
                header for header in first.headers if header[0] not in (b"date", b"connection")
            ] + [REPLAYED]
            assert again.complete and len(again.messages) == 2
        assert app.runs == 1

    run(main())


def test_the_key_is_compared_exactly(store: Store) -> None:
    app = Orders()
    mw = middleware(app, store)

    async def main() -> None:
        await call(mw, key="abc")
        assert (await call(mw, key='"abc"')).replayed  # the sf-string of the same key
        assert (await call(mw, key=" abc ")).replayed
        assert not (await call(mw, key="ABC")).replayed  # keys are case-sensitive
        assert not (await call(mw, key="abc;p=1")).replayed  # a token's ';' is the key's
        assert app.runs == 3

    run(main())


@dataclass
class Retries(Client):
    """A client that retries through ``mw`` as soon as it has all but the response's end."""

    mw: Any = None
    retry: Answer | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.retry = await asyncio.create_task(call(self.mw))
        await super().send(message)


def test_the_response_is_recorded_before_its_end_reaches_the_client(store: Store) -> None:
    app = Orders(chunks=2)
    mw = middleware(app, store)
    client = Retries([b'{"item": 1}'], mw=mw)

    async def main() -> None:
        first = await call(mw, client=client)
        retry = client.retry
        assert retry is not None and retry.replayed and retry.body == first.body  # not 409
        assert app.runs == 1

    run(main())


def test_a_status_outside_recorded_statuses_releases_the_key(store: Store) -> None:
    app = Orders(status=503)
    mw = middleware(app, store, recorded_statuses=range(200, 500))

    async def main() -> None:
        assert (await call(mw)).status == 503
        assert (await call(mw)).status == 503
        assert app.runs == 2  # released: each retry runs the app again
        app.status = 201
        assert (await call(mw)).status == 201
        assert (await call(mw)).replayed
        assert app.runs == 3

    run(main())
    assert [entry.status for entry in store.scan()] == ["ok"]


def test_every_status_is_recorded_by_default(store: Store) -> None:
    app = Orders(status=500)
    mw = middleware(app, store)

    async def main() -> None:
        await call(mw)
        again = await call(mw)
        assert again.status == 500 and again.replayed and json.loads(again.body)["run"] == 1

    run(main())


# -- a request running elsewhere ----------------------------------------------------------------


def test_a_duplicate_of_a_running_request_gets_409_then_the_replay(store: Store) -> None:
    async def main() -> None:
        app = Orders(gate=True)
        mw = middleware(app, store)
        first = asyncio.create_task(call(mw))
        await app.entered.wait()
        busy = await call(mw)
        busy.problem(409, "in-progress")
        assert busy.header(b"retry-after") == b"1"
        # Another request with the running key is refused as reused, not told to wait.
        (await call(mw, body=b'{"item": 2}')).problem(422, "key-reused")
        app.release.set()
        done = await first
        assert done.status == 201 and not done.replayed
        again = await call(mw)
        assert again.replayed and again.body == done.body
        assert app.runs == 1

    run(main())


class Watched(MemoryStore):
    """Sets ``busy_seen`` when a read finds the key being processed (a duplicate is waiting)."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_seen = asyncio.Event()

    async def aget(self, key: str) -> Entry | None:
        entry = self.get(key)
        if entry is not None and entry.status == "processing":
            self.busy_seen.set()
        return entry


def test_wait_gives_the_duplicate_the_replay_once_the_first_finishes() -> None:
    async def main() -> None:
        store = Watched()
        app = Orders(gate=True)
        mw = middleware(app, store, wait=30)
        first = asyncio.create_task(call(mw))
        await app.entered.wait()
        second = asyncio.create_task(call(mw))
        await store.busy_seen.wait()
        assert not second.done()
        app.release.set()
        done, waited = await first, await second
        assert done.status == 201 and not done.replayed
        assert waited.status == 201 and waited.replayed and waited.body == done.body
        assert app.runs == 1

    run(main())


def test_wait_gives_the_duplicate_500_when_the_first_is_interrupted() -> None:
    async def main() -> None:
        store = Watched()
        app = Orders(gate=True)
        mw = middleware(app, store, wait=30)
        first = asyncio.create_task(call(mw))
        await app.entered.wait()
        second = asyncio.create_task(call(mw))
        await store.busy_seen.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        (await second).problem(500, "interrupted")
        assert app.runs == 1

    run(main())


# -- 422 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        {"body": b'{"item": 2}'},
        {"path": "/orders/2"},
        {"query": b"dry_run=1"},
        {"method": "PATCH"},
    ],
)
def test_the_same_key_with_another_request_is_422(store: Store, other: dict[str, Any]) -> None:
    app = Orders()
    mw = middleware(app, store)

    async def main() -> None:
        await call(mw)
        body = (await call(mw, **other)).problem(422, "key-reused")
        assert "another request" in body["detail"]
        assert (await call(mw)).replayed  # the first request is still replayed
        assert app.runs == 1

    run(main())


# -- 400 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "slug"),
    [
        ([(b"idempotency-key", b"a"), (b"idempotency-key", b"b")], "key-repeated"),
        ([(b"idempotency-key", b"a"), (b"idempotency-key", b"a")], "key-repeated"),
        ([(b"idempotency-key", b"a, b")], "key-repeated"),
        ([(b"idempotency-key", b'"a", "b"')], "key-repeated"),
        ([(b"idempotency-key", b"")], "key-invalid"),
        ([(b"idempotency-key", b'""')], "key-invalid"),
        ([(b"idempotency-key", b"k" * 256)], "key-invalid"),
        ([(b"idempotency-key", b"a b")], "key-invalid"),
        ([(b"idempotency-key", b"caf\xc3\xa9")], "key-invalid"),
        ([(b"idempotency-key", b'"abc')], "key-invalid"),
    ],
)
def test_a_bad_key_header_is_400_and_the_app_does_not_run(
    headers: list[tuple[bytes, bytes]], slug: str
) -> None:
    app = Orders()
    mw = middleware(app, MemoryStore())
    client = Client([b"{}"])

    async def main() -> None:
        await call(mw, key=None, headers=headers, client=client)

    run(main())
    Answer(client.delivered).problem(400, slug, key=None)
    assert app.runs == 0
    assert client.received == 0  # refused before its body was read


def test_a_missing_key_is_400_only_when_required() -> None:
    app = Orders()

    async def main() -> None:
        required = middleware(app, MemoryStore(), required=True)
        body = (await call(required, key=None)).problem(400, "key-missing", key=None)
        assert "Idempotency-Key" in body["detail"]
        assert app.runs == 0
        # Not required: the request passes through, and runs each time.
        free = middleware(app, MemoryStore())
        assert (await call(free, key=None)).status == 201
        assert (await call(free, key=None)).status == 201
        assert app.runs == 2

    run(main())


def test_a_custom_header_holds_the_key() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), header="X-Request-Id", required=True)

    async def main() -> None:
        # Idempotency-Key means nothing to it.
        (await call(mw, key="k1")).problem(400, "key-missing", key=None)
        headers = [(b"x-request-id", b"r1")]
        assert not (await call(mw, key=None, headers=headers)).replayed
        assert (await call(mw, key=None, headers=headers)).replayed
        assert app.runs == 1

    run(main())


# -- 413 ----------------------------------------------------------------------------------------


def test_a_content_length_over_the_limit_is_413_unread() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), max_request_body=10)
    client = Client([b"x" * 11])

    async def main() -> None:
        answer = await call(mw, body=b"x" * 11, client=client)
        body = answer.problem(413, "request-too-large")
        assert "11 bytes" in body["detail"]
        assert client.received == 0  # the body was not read
        assert app.runs == 0
        # At the limit exactly it runs; nothing was recorded for the 413.
        assert (await call(mw, body=b"x" * 10)).status == 201
        assert app.runs == 1

    run(main())


def test_a_streamed_body_past_the_limit_is_413_read_no_further() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), max_request_body=10)
    client = Client([b"12345", b"678901", b"never read"])

    async def main() -> None:
        (await call(mw, client=client, length=False)).problem(413, "request-too-large")
        assert client.received == 2
        assert app.runs == 0
        # Chunks up to the limit exactly are read whole and handed to the app.
        answer = await call(mw, chunks=[b"12345", b"", b"67890"], length=False)
        assert answer.status == 201 and app.bodies == [b"1234567890"]

    run(main())


# -- a client that leaves -----------------------------------------------------------------------


def test_a_client_that_leaves_while_sending_its_body_leaves_the_key_free() -> None:
    app = Orders()
    store = MemoryStore()
    mw = middleware(app, store)
    client = Client([b'{"item":'], leaves_after=1)

    async def main() -> None:
        await call(mw, client=client, length=False)
        assert client.attempted == []  # nothing is sent to a client that left
        assert app.runs == 0
        assert list(store.scan()) == []  # nothing claimed
        answer = await call(mw)  # the retry runs
        assert answer.status == 201 and not answer.replayed and app.runs == 1

    run(main())


def test_a_client_gone_mid_response_lets_the_app_finish_and_is_replayed(store: Store) -> None:
    app = Orders(chunks=3)
    mw = middleware(app, store)
    client = Client([b'{"item": 1}'], gone_from=0)

    async def main() -> None:
        await call(mw, client=client)  # no exception: the app finished
        assert app.finished == 1
        assert [m["type"] for m in client.delivered] == ["http.response.start"]
        # Nothing more is sent to a client that left (the app sent two more parts).
        assert [m["type"] for m in client.attempted] == [
            "http.response.start",
            "http.response.body",
        ]
        again = await call(mw)
        assert again.replayed and json.loads(again.body) == {"run": 1, "body": '{"item": 1}'}
        assert app.runs == 1

    run(main())


def test_a_client_gone_past_max_response_body_stops_the_app(store: Store) -> None:
    app = Streams([b"12345", b"67890", b"abcde"])
    mw = middleware(app, store, max_response_body=8)
    # The first part reaches the client; sending the second (over 8 bytes) finds it gone.
    client = Client([b'{"item": 1}'], gone_from=1)

    async def main() -> None:
        with pytest.raises(OSError, match="the client left"):
            await call(mw, client=client)
        assert [type(e) for e in app.errors] == [OSError] and app.finished == 0
        # Nothing can be replayed and the app may have had effects: interrupted.
        (await call(mw)).problem(500, "interrupted")
        assert app.runs == 1

    run(main())


def test_a_client_gone_under_the_limit_stops_the_app_once_the_response_is_past_it(
    store: Store,
) -> None:
    app = Streams([b"12345", b"67890", b"abcde"])
    mw = middleware(app, store, max_response_body=8)
    # The client is gone from the first part on (under the limit: the app goes on, so that
    # its response can be recorded); once past the limit it can't be: the app is stopped.
    client = Client([b'{"item": 1}'], gone_from=0)

    async def main() -> None:
        with pytest.raises(OSError, match="too large to record"):
            await call(mw, client=client)
        assert [type(e) for e in app.errors] == [OSError] and app.finished == 0
        (await call(mw)).problem(500, "interrupted")
        assert app.runs == 1

    run(main())


# -- the app fails ------------------------------------------------------------------------------


class Raises:
    def __init__(self, after_start: bool = False) -> None:
        self.runs = 0
        self.after_start = after_start

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.runs += 1
        await read_body(receive)
        if self.after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise ValueError("the app failed")


@pytest.mark.parametrize("after_start", [False, True])
def test_an_app_that_raises_halts_the_key_and_the_error_reaches_the_server(
    store: Store, after_start: bool
) -> None:
    app = Raises(after_start)
    mw = middleware(app, store)

    async def main() -> None:
        with pytest.raises(ValueError, match="the app failed"):
            await call(mw)
        for _ in range(2):
            body = (await call(mw)).problem(500, "interrupted")
            assert "was interrupted and can't be recovered" in body["detail"]
        assert app.runs == 1

    run(main())
    assert [entry.status for entry in store.scan()] == ["halted"]


def test_an_app_that_raises_after_its_whole_response_keeps_it_recorded(store: Store) -> None:
    # E.g. a Starlette background task failing: the client had the whole response.
    async def then_fails(scope: Message, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        raise ValueError("the background task failed")

    mw = middleware(then_fails, store)

    async def main() -> None:
        with pytest.raises(ValueError, match="background task"):
            await call(mw)
        again = await call(mw)
        assert again.status == 201 and again.replayed and again.body == b"done"

    run(main())


def test_an_app_cancelled_mid_body_halts_the_key(store: Store) -> None:
    sent_part = asyncio.Event()

    async def stalls(scope: Message, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        sent_part.set()
        await asyncio.Event().wait()  # forever, until cancelled

    mw = middleware(stalls, store)

    async def main() -> None:
        task = asyncio.create_task(call(mw))
        await sent_part.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (await call(mw)).problem(500, "interrupted")

    run(main())
    assert [entry.status for entry in store.scan()] == ["halted"]


@pytest.mark.parametrize("sends", [0, 1, 2])
def test_an_app_that_returns_without_finishing_its_response_halts_the_key(
    store: Store, sends: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Starlette's StreamingResponse does so when its client leaves (ASGI < 2.4): no error is
    # raised to the server, but the app may have had effects: the key is halted.
    runs: list[int] = []

    async def quits(scope: Message, receive: Receive, send: Send) -> None:
        runs.append(1)
        await read_body(receive)
        if sends:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        if sends > 1:
            await send({"type": "http.response.body", "body": b"part", "more_body": True})

    mw = middleware(quits, store)

    async def main() -> None:
        await call(mw)
        (await call(mw)).problem(500, "interrupted")

    run(main())
    assert runs == [1]
    assert [entry.status for entry in store.scan()] == ["halted"]
    assert "returned before finishing its response to key 'k1'" in caplog.text


# -- responses: streamed, over the limit --------------------------------------------------------


def test_a_streamed_response_is_recorded_whole(store: Store) -> None:
    app = Streams([b"a", b"", b"bc", b"d" * 1000])
    mw = middleware(app, store)

    async def main() -> None:
        first = await call(mw)
        assert [m.get("more_body", False) for m in first.messages[1:]] == [True] * 4 + [False]
        again = await call(mw)
        assert again.replayed and again.body == first.body == b"abc" + b"d" * 1000
        assert again.headers == [(b"x-a", b"1"), REPLAYED]
        assert app.runs == 1

    run(main())


def test_a_response_of_max_response_body_exactly_is_replayed(store: Store) -> None:
    app = Streams([b"12345", b"67890"])
    mw = middleware(app, store, max_response_body=10)

    async def main() -> None:
        await call(mw)
        again = await call(mw)
        assert again.replayed and again.body == b"1234567890"

    run(main())


def test_a_response_over_max_response_body_reaches_its_client_once(store: Store) -> None:
    app = Streams([b"12345", b"67890", b"a"])
    mw = middleware(app, store, max_response_body=10)

    async def main() -> None:
        first = await call(mw)
        assert first.status == 200 and first.complete and first.body == b"1234567890a"
        for _ in range(2):
            body = (await call(mw)).problem(500, "response-not-recorded")
            assert "too large to record" in body["detail"]
        assert app.runs == 1

    run(main())


# -- what is not guarded passes through untouched -----------------------------------------------


def test_what_is_not_guarded_reaches_the_app_as_the_server_sent_it() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), methods=("POST",))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    scopes = [
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        {"type": "websocket", "path": "/ws", "headers": [(b"idempotency-key", b"k1")]},
        http_scope(method="GET"),  # a method not guarded, with a key
        http_scope(method="PATCH"),
        http_scope(key=None),  # no key, not required
    ]

    async def main() -> None:
        for scope in scopes:
            await mw(scope, receive, send)

    run(main())
    assert len(app.calls) == len(scopes)
    for scope, (got_scope, got_receive, got_send) in zip(scopes, app.calls, strict=True):
        assert got_scope is scope and got_receive is receive and got_send is send


def test_path_send_extensions_are_hidden_from_the_app() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore())
    extensions = {
        "http.response.pathsend": {},
        "http.response.zerocopysend": {},
        "http.response.trailers": {},
    }

    async def main() -> None:
        await call(mw, extensions=extensions)

    run(main())
    seen = app.calls[0][0]
    # Its bytes would not pass through the middleware, so could not be recorded.
    assert seen["extensions"] == {"http.response.trailers": {}}
    assert set(extensions) == {  # the server's scope is left as it was
        "http.response.pathsend",
        "http.response.zerocopysend",
        "http.response.trailers",
    }


# -- scope, deadline, fingerprint ---------------------------------------------------------------


def tenant_of(request: Request) -> str | None:
    return request.headers.get("x-tenant")


def test_tenants_never_share_a_key() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), scope=tenant_of)

    def as_tenant(tenant: str) -> list[tuple[bytes, bytes]]:
        return [(b"x-tenant", tenant.encode())]

    async def main() -> None:
        a = await call(mw, headers=as_tenant("a"), body=b'"a"')
        b = await call(mw, headers=as_tenant("b"), body=b'"b"')  # the same key: no 422
        assert not a.replayed and not b.replayed and app.runs == 2
        assert (await call(mw, headers=as_tenant("a"), body=b'"a"')).body == a.body
        assert (await call(mw, headers=as_tenant("b"), body=b'"b"')).body == b.body
        # No tenant is a space of its own too.
        assert not (await call(mw, body=b'"none"')).replayed
        # A tenant holding ':' cannot reach into another's keys.
        await call(mw, headers=as_tenant("t"), key="x:y", body=b"1")
        assert not (await call(mw, headers=as_tenant("t:x"), key="y", body=b"2")).replayed
        assert app.runs == 5

    run(main())


def test_the_callables_get_the_request_read_before_the_app_runs() -> None:
    seen: list[Request] = []

    def scope(request: Request) -> str:
        seen.append(request)
        return "t"

    app = Orders()
    mw = middleware(app, MemoryStore(), scope=scope, fingerprint=lambda r: seen.append(r) or "")
    headers = [(b"x-api-key", b"secret"), (b"x-twice", b"1"), (b"x-twice", b"2")]
    server_scope = http_scope(path="/orders/7", query=b"a=1&b=%20", headers=headers)
    client = Client([b"par", b"t1"])

    async def main() -> None:
        await mw(server_scope, client.receive, client.send)

    run(main())
    assert len(seen) == 2 and seen[0] is seen[1]
    request = seen[0]
    assert (request.method, request.path, request.query) == ("POST", "/orders/7", "a=1&b=%20")
    assert request.headers["X-API-KEY"] == "secret"
    assert request.headers.getall("x-twice") == ["1", "2"]
    assert request.body == b"part1"
    assert request.raw is server_scope
    assert app.bodies == [b"part1"]  # and the app reads the same body


def deadline_header(request: Request) -> datetime | None:
    given = request.headers.get("x-deadline")
    return None if given is None else datetime.fromisoformat(given)


def test_a_request_past_its_deadline_with_no_record_is_refused(store: Store) -> None:
    app = Orders()
    mw = middleware(app, store, deadline=deadline_header)
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat().encode()
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat().encode()

    async def main() -> None:
        body = (await call(mw, headers=[(b"x-deadline", past)])).problem(400, "request-expired")
        assert "deadline" in body["detail"]
        assert app.runs == 0
        assert list(store.scan()) == []  # nothing claimed: in time, it runs
        assert not (await call(mw, headers=[(b"x-deadline", future)])).replayed
        # Once recorded, the response is replayed after the deadline too.
        again = await call(mw, headers=[(b"x-deadline", past)])
        assert again.status == 201 and again.replayed
        assert app.runs == 1

    run(main())


def test_a_fingerprint_callable_says_what_must_match() -> None:
    async def main() -> None:
        by_query = Orders()
        mw = middleware(by_query, MemoryStore(), fingerprint=lambda r: r.query)
        await call(mw, query=b"v=1", body=b"1")
        assert (await call(mw, query=b"v=1", body=b"2", path="/other")).replayed
        (await call(mw, query=b"v=2", body=b"1")).problem(422, "key-reused")
        assert by_query.runs == 1

        by_bytes = Orders()
        mw = middleware(by_bytes, MemoryStore(), fingerprint=lambda r: r.body[:1])
        await call(mw, body=b"a1")
        assert (await call(mw, body=b"a2")).replayed
        (await call(mw, body=b"b1")).problem(422, "key-reused")
        assert by_bytes.runs == 1

        anything = Orders()
        mw = middleware(anything, MemoryStore(), fingerprint=lambda r: "")
        await call(mw, body=b"1")
        assert (await call(mw, body=b"2", method="PATCH", query=b"x")).replayed
        assert anything.runs == 1

    run(main())


def test_a_failing_callable_reaches_the_server_and_claims_nothing() -> None:
    app = Orders()
    store = MemoryStore()

    def broken(request: Request) -> str:
        raise LookupError("no tenant")

    mw = middleware(app, store, scope=broken)

    async def main() -> None:
        with pytest.raises(LookupError):
            await call(mw)

    run(main())
    assert app.runs == 0 and list(store.scan()) == []


# -- the store ----------------------------------------------------------------------------------


class Unreachable(MemoryStore):
    """Every read and claim fails, as a store whose server is down."""

    def _down(self, *args: Any) -> Any:
        raise StoreError("the store is down", key=str(args[0]))

    get = claim = _down

    async def aget(self, key: str) -> Entry | None:
        return self._down(key)

    async def aclaim(self, entry: Entry) -> Entry | None:
        return self._down(entry.key)


def test_a_failing_store_is_503_and_the_app_does_not_run(caplog: pytest.LogCaptureFixture) -> None:
    app = Orders()
    mw = middleware(app, Unreachable())

    async def main() -> None:
        answer = await call(mw)
        answer.problem(503, "store-unavailable")
        assert answer.header(b"retry-after") == b"1"

    run(main())
    assert app.runs == 0
    assert "the store failed" in caplog.text


class WontRecord(MemoryStore):
    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        raise StoreError("the store is down", key=key)


def test_a_store_failing_to_record_still_sends_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Orders()
    mw = middleware(app, WontRecord())

    async def main() -> None:
        answer = await call(mw)
        assert answer.status == 201 and answer.complete
        # Still processing as far as the store knows, until its lease runs out.
        (await call(mw)).problem(409, "in-progress")

    run(main())
    assert app.runs == 1
    assert "was sent but could not be recorded" in caplog.text


class LoopGuard(MemoryStore):
    """A store whose sync primitives refuse to run on an event loop's thread: the ASGI
    middleware must use the awaitable ones there (a sync call would block every request)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking: list[str] = []
        self.busy_seen = asyncio.Event()

    def _guard(self, name: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # another thread (the heartbeat's renewals): fine
        self.blocking.append(name)
        raise AssertionError(f"{name}() called on the event loop")

    def claim(self, entry: Entry) -> Entry | None:
        self._guard("claim")
        return super().claim(entry)

    def get(self, key: str) -> Entry | None:
        self._guard("get")
        return super().get(key)

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        self._guard("swap")
        return super().swap(key, token, entry)

    def release(self, key: str, token: str) -> bool:
        self._guard("release")
        return super().release(key, token)

    def delete(self, key: str, token: str | None = None) -> bool:
        self._guard("delete")
        return super().delete(key, token)

    def watch(self, key: str) -> Any:
        self._guard("watch")
        return super().watch(key)

    async def aclaim(self, entry: Entry) -> Entry | None:
        return MemoryStore.claim(self, entry)

    async def aget(self, key: str) -> Entry | None:
        entry = MemoryStore.get(self, key)
        if entry is not None and entry.status == "processing":
            self.busy_seen.set()
        return entry

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        return MemoryStore.swap(self, key, token, entry)

    async def arelease(self, key: str, token: str) -> bool:
        return MemoryStore.release(self, key, token)

    async def adelete(self, key: str, token: str | None = None) -> bool:
        return MemoryStore.delete(self, key, token)


def test_the_async_path_never_calls_a_sync_store_primitive() -> None:
    store = LoopGuard()

    async def main() -> None:
        app = Orders(gate=True)
        mw = middleware(app, store, wait=30, recorded_statuses=range(200, 500))
        first = asyncio.create_task(call(mw, key="a"))
        await app.entered.wait()
        waiting = asyncio.create_task(call(mw, key="a"))  # waits: awatch, adecide
        await store.busy_seen.wait()
        app.release.set()
        assert not (await first).replayed  # claimed, recorded
        assert (await waiting).replayed
        assert (await call(mw, key="a")).replayed  # replayed
        (await call(mw, key="a", body=b"other")).problem(422, "key-reused", key="a")
        app.status = 503
        assert (await call(mw, key="b")).status == 503  # released
        failing = middleware(Raises(), store)
        with pytest.raises(ValueError):
            await call(failing, key="c")  # halted
        (await call(failing, key="c")).problem(500, "interrupted", key="c")
        big = middleware(Streams([b"x" * 20]), store, max_response_body=10)
        await call(big, key="d")  # recorded as not kept
        (await call(big, key="d")).problem(500, "response-not-recorded", key="d")
        gated = Orders(gate=True)
        no_wait = middleware(gated, store)
        held = asyncio.create_task(call(no_wait, key="e"))
        await gated.entered.wait()
        (await call(no_wait, key="e")).problem(409, "in-progress", key="e")
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held

    run(main())
    assert store.blocking == []
    assert {entry.key: entry.status for entry in store.scan()} == {
        "http::a": "ok",
        "http::c": "halted",
        "http::d": "ok",
        "http::e": "halted",
    }


_DETONATED: list[str] = []


class _Detonator:
    """Unpickling it has an effect."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_DETONATED.append, ("unpickled",))


def test_a_record_that_holds_a_pickle_is_never_unpickled() -> None:
    store = MemoryStore()
    app = Orders()
    mw = middleware(app, store)
    run(call(mw))
    (entry,) = store.scan()
    # A record written behind idemfn's back (a shared store): the replay must parse, not load.
    store._entries[entry.key] = entry._replace(payload=pickle.dumps(_Detonator()))
    _DETONATED.clear()
    answer = run(call(mw))
    assert answer.status == 500 and not answer.replayed
    assert _DETONATED == [] and app.runs == 1


def test_options_are_checked_when_the_middleware_is_made() -> None:
    with pytest.raises(TypeError, match=r"^idemfn\.asgi\.IdempotencyMiddleware: methods"):
        IdempotencyMiddleware(Orders(), store=MemoryStore(), methods="POST")
    with pytest.raises(TypeError, match="must be an ASGI app"):
        IdempotencyMiddleware(None, store=MemoryStore())  # type: ignore[arg-type]


# -- Starlette and FastAPI, in-process ----------------------------------------------------------


def starlette_app(store: Store, **options: Any) -> tuple[Any, list[int]]:
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    runs: list[int] = []

    async def create(request: StarletteRequest) -> JSONResponse:
        runs.append(1)
        data = await request.json()
        return JSONResponse({"run": len(runs), **data}, status_code=201)

    async def boom(request: StarletteRequest) -> JSONResponse:
        runs.append(1)
        raise ValueError("boom")

    async def stream(request: StarletteRequest) -> StreamingResponse:
        runs.append(1)

        async def parts() -> Any:
            for i in range(5):
                yield f"part {i};".encode()

        return StreamingResponse(parts(), media_type="text/plain")

    app = Starlette(
        routes=[
            Route("/orders", create, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
        ]
    )
    app.add_middleware(IdempotencyMiddleware, store=store, **options)
    return app, runs


def streaming_app(store: Store) -> tuple[Any, list[int]]:
    """A Starlette route streaming two parts; under ASGI < 2.4, it pauses between them until
    Starlette cancels the stream (its client left)."""
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    runs: list[int] = []

    async def stream(request: StarletteRequest) -> StreamingResponse:
        runs.append(1)
        go_on = asyncio.Event()

        async def parts() -> Any:
            yield b"part 1;"
            if request.scope["asgi"].get("spec_version") != "2.4":
                await go_on.wait()  # until the disconnect cancels the stream
            yield b"part 2;"

        return StreamingResponse(parts(), media_type="text/plain")

    app = Starlette(routes=[Route("/stream", stream, methods=["POST"])])
    app.add_middleware(IdempotencyMiddleware, store=store)
    return app, runs


def test_starlette_streaming_to_a_client_that_left_halts_the_key_under_asgi_2_0() -> None:
    # ASGI < 2.4: Starlette hears http.disconnect and stops the stream; the route returns.
    app, runs = streaming_app(MemoryStore())

    def spec_2_0(**options: Any) -> Message:
        scope = http_scope(path="/stream", **options)
        scope["asgi"] = {"version": "3.0", "spec_version": "2.0"}
        return scope

    async def main() -> None:
        client = Client([b""], leaves=True)
        await app(spec_2_0(body_length=0), client.receive, client.send)
        assert Answer(client.delivered).body == b"part 1;"
        client = Client([b""])
        await app(spec_2_0(body_length=0), client.receive, client.send)
        Answer(client.delivered).problem(500, "interrupted")
        assert runs == [1]

    run(main())


def test_starlette_streaming_to_a_client_that_left_is_recorded_under_asgi_2_4() -> None:
    # ASGI 2.4: the server's send raises OSError; the middleware lets the stream finish.
    app, runs = streaming_app(MemoryStore())

    async def main() -> None:
        await call(app, path="/stream", body=b"", client=Client([b""], gone_from=1))
        again = await call(app, path="/stream", body=b"")
        assert again.replayed and again.body == b"part 1;part 2;"
        assert runs == [1]

    run(main())


async def post(
    app: Any, path: str, key: str, raise_errors: bool = True, **kw: Any
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.post(path, headers={"Idempotency-Key": key}, **kw)


def test_starlette_replays_streams_and_halts() -> None:
    app, runs = starlette_app(MemoryStore())

    async def main() -> None:
        first = await post(app, "/orders", "o1", json={"item": 1})
        assert first.status_code == 201 and first.json() == {"run": 1, "item": 1}
        again = await post(app, "/orders", "o1", json={"item": 1})
        assert again.status_code == 201 and again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        assert (await post(app, "/orders", "o1", json={"item": 2})).status_code == 422

        streamed = await post(app, "/stream", "s1")
        assert streamed.text == "part 0;part 1;part 2;part 3;part 4;"
        replayed = await post(app, "/stream", "s1")
        assert replayed.content == streamed.content and "idempotent-replayed" in replayed.headers

        # The route's exception reaches the server (Starlette's error middleware answers 500
        # and raises it again); the key is halted.
        with pytest.raises(ValueError, match="boom"):
            await post(app, "/boom", "b1")
        halted = await post(app, "/boom", "b1", raise_errors=False)
        assert halted.status_code == 500
        assert halted.headers["content-type"] == "application/problem+json"
        assert halted.json()["type"] == PROBLEMS + "interrupted"
        assert len(runs) == 3

    run(main())


class Order(BaseModel):
    item: int


def test_fastapi_records_what_its_error_handlers_answer() -> None:
    runs: list[int] = []
    app = FastAPI()

    @app.post("/orders", status_code=201)
    async def create(order: Order) -> dict[str, int]:
        runs.append(order.item)
        if order.item == 404:
            raise HTTPException(status_code=404, detail="no such item")
        return {"run": len(runs), "item": order.item}

    app.add_middleware(IdempotencyMiddleware, store=MemoryStore())

    async def main() -> None:
        first = await post(app, "/orders", "f1", json={"item": 1})
        assert first.status_code == 201 and first.json() == {"run": 1, "item": 1}
        assert (await post(app, "/orders", "f1", json={"item": 1})).content == first.content
        missing = await post(app, "/orders", "f2", json={"item": 404})
        assert missing.status_code == 404
        again = await post(app, "/orders", "f2", json={"item": 404})
        assert again.status_code == 404 and again.headers["idempotent-replayed"] == "true"
        invalid = await post(app, "/orders", "f3", json={"item": "x"})
        assert invalid.status_code == 422 and "idempotent-replayed" not in invalid.headers
        assert (await post(app, "/orders", "f3", json={"item": "x"})).headers[
            "idempotent-replayed"
        ] == "true"
        assert runs == [1, 404]

    run(main())
