"""A hostile review of the HTTP middlewares (issue 17): each finding a test that failed before
its fix, and the guarantees that held under attack and were not tested elsewhere.

In process (raw ASGI calls, WSGI calls, wsgiref's handler, Flask, Django's ASGIRequest), and
with a real process SIGKILLed where processes matter.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
import wsgiref.handlers
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from flask import Flask

import idemfn._lease
from idemfn import DiskStore, MemoryStore, StoreError, idempotent
from idemfn._record import Entry
from idemfn._wakeups import Watch
from idemfn.asgi import IdempotencyMiddleware as AsgiMiddleware
from idemfn.django import IdempotencyMiddleware as DjangoMiddleware
from idemfn.wsgi import IdempotencyMiddleware as WsgiMiddleware
from tests.support.django_settings import configured

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"
TIMEOUT = 60.0  # a condition waited on; nothing here should take a second


def run(main: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main, TIMEOUT)

    return asyncio.run(bounded())


# -- ASGI, by hand ------------------------------------------------------------------------------


def asgi_scope(
    key: bytes | None = b"k1", *, headers: Iterable[tuple[bytes, bytes]] = ()
) -> Message:
    listed = [(b"host", b"testserver")]
    if key is not None:
        listed.append((b"idempotency-key", key))
    listed.extend(headers)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "root_path": "",
        "headers": listed,
    }


async def asgi_call(app: Any, scope: Message | None = None) -> list[Message]:
    """One request (an empty body) through ``app``; the messages that reached the client, each
    a copy (headers listed as they were when sent)."""
    delivered: list[Message] = []
    given = False
    done = asyncio.Event()

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        copy = dict(message)
        if "headers" in copy:
            copy["headers"] = [(bytes(n), bytes(v)) for n, v in copy["headers"]]
        delivered.append(copy)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(asgi_scope() if scope is None else scope, receive, send)
    return delivered


def status_of(messages: list[Message]) -> int:
    return int(next(m for m in messages if m["type"] == "http.response.start")["status"])


def problem_of(messages: list[Message]) -> str:
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return str(json.loads(body)["type"]).removeprefix(PROBLEMS)


class Counted:
    """An ASGI app answering 201 ``ok``; counts its runs. ``gate``: held after reading the
    body until it is set (``entered`` says it got there)."""

    def __init__(self, gate: bool = False) -> None:
        self.runs = 0
        self.gate = asyncio.Event() if gate else None
        self.entered = asyncio.Event()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.runs += 1
        while (await receive()).get("more_body", False):
            pass
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


# -- WSGI, by hand ------------------------------------------------------------------------------


def wsgi_environ(
    *, method: str = "POST", key: str | None = "k1", body: bytes = b"", path: str = "/orders"
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "testserver",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if key is not None:
        environ["HTTP_IDEMPOTENCY_KEY"] = key
    return environ


class Sent:
    """A WSGI server's side of one request, as PEP 3333 says (headers go out with the first
    body bytes, write() included): what reached the client."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.headers_sent = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and self.headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status, self.headers = status, list(headers)
        return self.write

    def write(self, chunk: bytes) -> None:
        if chunk:
            self.headers_sent = True
        self.body += chunk

    def serve(self, app: Any, environ: dict[str, Any]) -> Sent:
        result = app(environ, self.start_response)
        try:
            for chunk in result:
                self.write(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return self

    def header(self, name: str) -> str | None:
        values = [value for found, value in self.headers if found.lower() == name]
        return values[0] if values else None


def wsgi_ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("201 Created", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


# -- Django, configured for this module only ----------------------------------------------------


urlpatterns: list[Any] = []


@pytest.fixture(scope="module")
def configured_django() -> Iterator[None]:
    with configured(__name__):
        yield


class CountingBody(io.BytesIO):
    """Django's ASGI body file (a seekable spooled file), counting the bytes read of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def django_asgi_request(
    headers: Iterable[tuple[bytes, bytes]], body: CountingBody | None = None
) -> HttpRequest:
    """A request as Django's ASGI handler makes it (it folds repeated headers itself)."""
    scope = asgi_scope(None, headers=headers)
    return ASGIRequest(scope, CountingBody(b"") if body is None else body)


# == Findings (each failed before its fix) ======================================================


class LostAnswer(MemoryStore):
    """A store whose first claim lands, and then fails as a store does when the answer is
    lost on its way back (a Redis or PostgreSQL timeout after the server ran the command)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = False

    async def aclaim(self, entry: Entry) -> Entry | None:
        found = self.claim(entry)
        if not self.lost:
            self.lost = True
            raise StoreError("timed out reading the server's answer", key=entry.key)
        return found


def test_a_claim_whose_answer_was_lost_leaves_the_key_to_the_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = Counted()
    mw = AsgiMiddleware(app, store=LostAnswer())

    async def main() -> tuple[list[Message], list[Message], list[Message]]:
        first = await asgi_call(mw)
        assert app.runs == 0
        retry = await asgi_call(mw)
        # Long after: the claim's lease has run out (nobody renews it).
        real = idemfn._lease.clock
        monkeypatch.setattr(idemfn._lease, "clock", lambda: real() + 3600.0)
        later = await asgi_call(mw)
        return first, retry, later

    first, retry, later = run(main())
    assert status_of(first) == 503 and problem_of(first) == "store-unavailable"
    # What the 503 promised: nothing ran, so a retry runs the request.
    assert (status_of(retry), status_of(later)) == (201, 201), (
        problem_of(retry),
        problem_of(later),
    )
    assert app.runs == 1


class RemoteClock(MemoryStore):
    """A MemoryStore whose clock is asked of its server, as RedisStore's and PostgresStore's
    are (``atime`` awaits): the ``hold``-th call of ``atime`` waits for ``gate``."""

    def __init__(self, hold: int) -> None:
        super().__init__()
        self.calls = 0
        self.hold = hold
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    def time(self) -> float:
        return time.time()

    async def atime(self) -> float:
        self.calls += 1
        if self.calls == self.hold:
            self.held.set()
            await self.gate.wait()
        return self.time()


def test_a_cancellation_while_the_response_is_being_recorded_still_records_it() -> None:
    # The 1st atime is the claim's, the 2nd the outcome's (complete): hold that one.
    store = RemoteClock(hold=2)
    app = Counted()
    mw = AsgiMiddleware(app, store=store)

    async def main() -> list[Message]:
        request = asyncio.ensure_future(asgi_call(mw))
        await store.held.wait()  # the app has answered; its response is being recorded
        request.cancel()  # the client left
        with pytest.raises(asyncio.CancelledError):
            await request
        store.hold = 0
        return await asgi_call(mw)

    retry = run(main())
    assert app.runs == 1
    entry = store.get("http::k1")
    assert entry is not None and entry.status == "ok", entry
    assert status_of(retry) == 201, problem_of(retry)


def test_headers_given_as_a_one_shot_iterable_reach_the_first_client() -> None:
    headers = [(b"content-type", b"text/plain"), (b"location", b"/orders/7")]

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        given = iter(headers)  # an Iterable, as ASGI's http.response.start allows
        await send({"type": "http.response.start", "status": 201, "headers": given})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = AsgiMiddleware(app, store=MemoryStore())
    first = run(asgi_call(mw))
    assert first[0]["headers"] == headers


def test_a_lowercase_method_that_flask_serves_as_post_is_guarded() -> None:
    runs: list[int] = []
    app = Flask(__name__)

    @app.post("/orders")
    def orders() -> tuple[str, int]:
        runs.append(1)
        return f"order {len(runs)}", 201

    app.wsgi_app = WsgiMiddleware(app.wsgi_app, store=MemoryStore())  # type: ignore[method-assign]
    first = Sent().serve(app, wsgi_environ(method="post"))
    retry = Sent().serve(app, wsgi_environ(method="post"))
    assert first.status.startswith("201")
    assert runs == [1]
    assert retry.header("idempotent-replayed") == "true" and retry.body == first.body


@pytest.mark.parametrize("data_upload_max", [None, 2_621_440], ids=["django-unlimited", "default"])
def test_a_django_asgi_body_without_length_is_read_no_further_than_the_limit(
    configured_django: None, data_upload_max: int | None
) -> None:
    runs: list[int] = []

    async def view(request: HttpRequest) -> HttpResponse:
        runs.append(1)
        return HttpResponse("ok", status=201)

    body = CountingBody(b"x" * 5_000_000)
    settings = {"store": MemoryStore(), "max_request_body": 1000}
    with override_settings(IDEMFN_HTTP=settings, DATA_UPLOAD_MAX_MEMORY_SIZE=data_upload_max):
        mw = DjangoMiddleware(view)
        request = django_asgi_request([(b"idempotency-key", b"k1")], body)
        response = asyncio.run(mw(request))
    assert response.status_code == 413
    assert json.loads(response.content)["type"] == PROBLEMS + "request-too-large"
    assert body.bytes_read <= 1001
    assert runs == []


def test_an_error_page_after_write_never_goes_out_behind_the_written_bytes() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Length", "7")])
        write(b"partial")
        try:
            raise LookupError("failed after writing")
        except LookupError:
            start_response("500 Internal Server Error", [("Content-Length", "5")], sys.exc_info())
        return [b"error"]

    mw = WsgiMiddleware(app, store=MemoryStore())
    try:
        sent = Sent().serve(mw, wsgi_environ())
    except LookupError:
        return  # PEP 3333's way: the headers went out with the written bytes
    assert sent.header("content-length") == str(len(sent.body)), (sent.status, sent.body)


def wsgiref_serve(app: Any, environ: dict[str, Any]) -> tuple[bytes, bytes]:
    """``app`` served by wsgiref's handler (the stdlib's WSGI server): its status line and
    body as they went out."""
    out = io.BytesIO()
    errors = io.StringIO()
    handler = wsgiref.handlers.SimpleHandler(environ["wsgi.input"], out, errors, environ)
    handler.run(app)
    head, _, body = out.getvalue().partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def wsgiref_environ(key: str = "k1") -> dict[str, Any]:
    environ = wsgi_environ(key=key)
    for name in ("wsgi.version", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once"):
        del environ[name]  # the handler sets its own
    return environ


def test_a_replayed_status_unknown_to_httpstatus_is_served_by_wsgiref() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("299 Custom", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    mw = WsgiMiddleware(app, store=MemoryStore())
    first = wsgiref_serve(mw, wsgiref_environ())
    assert first == (b"HTTP/1.0 299 Custom", b"ok")
    status_line, body = wsgiref_serve(mw, wsgiref_environ())
    assert status_line.startswith(b"HTTP/1.0 299 ") and body == b"ok", status_line


def test_a_replay_keeps_the_apps_reason_phrase() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Order Placed", [("Content-Length", "2")])
        return [b"ok"]

    mw = WsgiMiddleware(app, store=MemoryStore())
    assert Sent().serve(mw, wsgi_environ()).status == "201 Order Placed"
    assert Sent().serve(mw, wsgi_environ()).status == "201 Order Placed"


def test_a_content_length_of_non_ascii_digits_is_not_a_crash() -> None:
    environ = wsgi_environ()
    environ["CONTENT_LENGTH"] = "\u00b2"
    sent = Sent().serve(WsgiMiddleware(wsgi_ok, store=MemoryStore()), environ)
    assert sent.status.split()[0] in {"400", "201"}


def test_a_function_named_http_never_shares_the_middlewares_keys() -> None:
    store = MemoryStore()
    try:

        @idempotent(name="http", key="{key}", store=store)
        def charge(key: str) -> str:
            return "charged"

    except ValueError:
        return  # the name is refused: fine
    charge(":k1")
    app = Counted()
    answer = run(asgi_call(AsgiMiddleware(app, store=store)))
    assert status_of(answer) == 201 and app.runs == 1


def test_response_trailers_are_replayed() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"ok"})
        await send(
            {
                "type": "http.response.trailers",
                "headers": [(b"x-checksum", b"abc")],
                "more_trailers": False,
            }
        )

    mw = AsgiMiddleware(app, store=MemoryStore())
    scope = asgi_scope(headers=[(b"te", b"trailers")])
    scope["extensions"] = {"http.response.trailers": {}}
    first = run(asgi_call(mw, scope))
    replay = run(asgi_call(mw, dict(scope)))
    trailers = [m for m in first if m["type"] == "http.response.trailers"]
    assert trailers and trailers[0]["headers"] == [(b"x-checksum", b"abc")]
    assert [m for m in replay if m["type"] == "http.response.trailers"] == trailers


# == Guarantees that held under attack ==========================================================


class HeldClaim(MemoryStore):
    """A store whose first ``aclaim`` writes the claim, then waits for ``gate``: a request
    cancelled there has claimed the key and not yet heard so."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = asyncio.Event()
        self.holds = 1

    async def aclaim(self, entry: Entry) -> Entry | None:
        found = self.claim(entry)
        if self.holds:
            self.holds -= 1
            self.held.set()
            await self.gate.wait()
        return found


def test_a_request_cancelled_as_it_claims_leaves_the_key_to_the_retry() -> None:
    store = HeldClaim()
    app = Counted()
    mw = AsgiMiddleware(app, store=store)

    async def main() -> list[Message]:
        request = asyncio.ensure_future(asgi_call(mw))
        await store.held.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        return await asgi_call(mw)

    retry = run(main())
    assert status_of(retry) == 201 and app.runs == 1


def test_the_heartbeat_renews_an_asgi_request_longer_than_its_lease() -> None:
    store = MemoryStore()
    app = Counted(gate=True)
    mw = AsgiMiddleware(app, store=store, lease=3.0)  # renewed every second while it runs

    async def main() -> tuple[list[Message], list[Message], list[Message]]:
        assert app.gate is not None
        request = asyncio.ensure_future(asgi_call(mw))
        await app.entered.wait()
        claimed = store.get("http::k1")
        assert claimed is not None and claimed.lease_mono is not None
        deadline = time.monotonic() + TIMEOUT
        while True:  # a condition, with a generous bound: the first renewal
            now = store.get("http::k1")
            assert now is not None and now.status == "processing"
            if now.lease_mono is not None and now.lease_mono > claimed.lease_mono:
                break
            assert time.monotonic() < deadline, "the lease was never renewed"
            await asyncio.sleep(0.05)
        duplicate = await asgi_call(mw)
        app.gate.set()
        return duplicate, await request, await asgi_call(mw)

    duplicate, first, replay = run(main())
    assert status_of(duplicate) == 409 and problem_of(duplicate) == "in-progress"
    assert status_of(first) == 201 and status_of(replay) == 201 and app.runs == 1


# Header values as a client sent them, header line by header line: the ASGI driver gets the
# list, WSGI servers and Django fold them with "," (Django's ASGIRequest does it itself here).
FOLDINGS = [
    ([b"k1"], 201, None),
    ([b'"k1"'], 201, None),
    ([b'"a,b"'], 201, None),  # a comma inside the quotes: one key
    ([b'"k1"', b'"k1"'], 400, "key-repeated"),
    ([b"k1", b"k1"], 400, "key-repeated"),
    ([b"k1", b""], 400, "key-repeated"),
    ([b"", b"k1"], 400, "key-repeated"),
    ([b'"a,b"', b'"c"'], 400, "key-repeated"),
    ([b'"k1", "k2"'], 400, "key-repeated"),
    ([b""], 400, "key-invalid"),
    ([b'"k1'], 400, "key-invalid"),
]


@pytest.mark.parametrize(("values", "status", "slug"), FOLDINGS)
def test_asgi_wsgi_and_django_read_a_repeated_or_folded_key_alike(
    configured_django: None, values: list[bytes], status: int, slug: str | None
) -> None:
    async def asgi() -> list[Message]:
        app = AsgiMiddleware(Counted(), store=MemoryStore())
        return await asgi_call(
            app, asgi_scope(None, headers=[(b"idempotency-key", v) for v in values])
        )

    answered = run(asgi())
    environ = wsgi_environ(key=b",".join(values).decode("latin-1"))
    sent = Sent().serve(WsgiMiddleware(wsgi_ok, store=MemoryStore()), environ)

    async def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok", status=201)

    with override_settings(IDEMFN_HTTP={"store": MemoryStore()}):
        request = django_asgi_request([(b"idempotency-key", v) for v in values])
        django_answer = asyncio.run(DjangoMiddleware(view)(request))
    assert (status_of(answered), int(sent.status.split()[0]), django_answer.status_code) == (
        status,
        status,
        status,
    )
    if slug is not None:
        assert problem_of(answered) == slug
        assert json.loads(sent.body)["type"] == PROBLEMS + slug
        assert json.loads(django_answer.content)["type"] == PROBLEMS + slug


# A worker of its own: a process that takes the key, records that its app ran, and hangs.
WORKER = """
import sys, time
from idemfn import DiskStore
from idemfn.wsgi import IdempotencyMiddleware

def app(environ, start_response):
    with open(sys.argv[2], "a") as ran:
        ran.write("ran\\n")
    time.sleep(3600)  # killed here
    start_response("201 Created", [])
    return [b"late"]

environ = {
    "REQUEST_METHOD": "POST", "PATH_INFO": "/orders", "SCRIPT_NAME": "", "QUERY_STRING": "",
    "CONTENT_LENGTH": "2", "HTTP_IDEMPOTENCY_KEY": "k1",
    "wsgi.input": __import__("io").BytesIO(b"{}"),
}
list(IdempotencyMiddleware(app, store=DiskStore(sys.argv[1]))(environ, lambda *a: None))
"""


class Watching(DiskStore):
    """A DiskStore that says when a waiter starts watching the key."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.watching = threading.Event()

    def watch(self, key: str) -> Watch:
        self.watching.set()
        return super().watch(key)


def test_a_waiter_gets_500_when_the_first_requests_worker_is_killed(tmp_path: Path) -> None:
    directory, ran = tmp_path / "store", tmp_path / "ran"
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(directory), str(ran)], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (ran.exists() and ran.read_text()):
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker never ran its app"
            time.sleep(0.02)
        store = Watching(directory)
        runs: list[int] = []

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            runs.append(1)
            return wsgi_ok(environ, start_response)

        waiter = WsgiMiddleware(app, store=store, wait=TIMEOUT)
        answers: list[Sent] = []
        thread = threading.Thread(
            target=lambda: answers.append(Sent().serve(waiter, wsgi_environ(body=b"{}")))
        )
        started = time.monotonic()
        thread.start()
        assert store.watching.wait(TIMEOUT)  # it waits for the running request
        worker.kill()  # SIGKILL, mid-request
        worker.wait()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stderr is not None:
            worker.stderr.close()
    (answer,) = answers
    assert answer.status.startswith("500"), answer.body
    assert json.loads(answer.body)["type"] == PROBLEMS + "interrupted"
    assert time.monotonic() - started < TIMEOUT / 2  # seen dead, not waited out
    assert runs == [] and ran.read_text() == "ran\n"  # the app ran once, in the dead worker
    store.close()
