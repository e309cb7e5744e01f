"""A second hostile review of the HTTP middlewares (issue 17): each finding a strict xfail that
passes once it is fixed, and guarantees that held under attack, not tested elsewhere.

Angles: stacking the middleware, content codings negotiated below it (GZip) and replayed to a
client that refuses them, WSGI error pages after yielded bytes, the ``wait=`` path when the
first response is released, callables that raise, odd key bytes in each framework, an app
that runs an ``@idempotent`` function keyed on the same text, Starlette's error handlers and
``BaseHTTPMiddleware``, and a middleware made before a ``fork()`` (gunicorn ``--preload``).
In process, but for the fork.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client as DjangoClient
from django.test import override_settings
from django.urls import path
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from idemfn import DiskStore, MemoryStore, idempotent
from idemfn.asgi import IdempotencyMiddleware as AsgiMiddleware
from idemfn.wsgi import IdempotencyMiddleware as WsgiMiddleware
from tests.integrations.http.test_review import (
    Counted,
    Sent,
    asgi_call,
    asgi_scope,
    problem_of,
    run,
    status_of,
    wsgi_environ,
    wsgi_ok,
)
from tests.support.django_settings import configured

MIDDLEWARE = "idemfn.django.IdempotencyMiddleware"
PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"

# -- Django, configured for this module only ----------------------------------------------------

django_runs: list[str] = []


def django_order(request: HttpRequest) -> HttpResponse:
    django_runs.append(request.path)
    return HttpResponse(b"order " * 200, status=201, content_type="text/plain")


urlpatterns = [path("orders", django_order)]


@pytest.fixture(scope="module")
def configured_django() -> Iterator[None]:
    with configured(__name__):
        yield


def django_post(client: DjangoClient, key: str, **headers: str) -> Any:
    return client.post(
        "/orders",
        data=b"{}",
        content_type="application/json",
        headers={"Idempotency-Key": key, **headers},
    )


# == Findings ===================================================================================


def test_asgi_middleware_stacked_on_one_store_runs_the_app() -> None:
    store = MemoryStore()
    app = Counted()
    twice = AsgiMiddleware(AsgiMiddleware(app, store=store), store=store)
    first = run(asgi_call(twice))
    again = run(asgi_call(twice))
    assert (status_of(first), status_of(again), app.runs) == (201, 201, 1)


def test_wsgi_middleware_stacked_on_one_store_runs_the_app() -> None:
    store = MemoryStore()
    ran: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ran.append(1)
        return wsgi_ok(environ, start_response)

    twice = WsgiMiddleware(WsgiMiddleware(app, store=store), store=store)
    first = Sent().serve(twice, wsgi_environ())
    again = Sent().serve(twice, wsgi_environ())
    assert (first.status, again.status, len(ran)) == ("201 Created", "201 Created", 1)


@pytest.mark.usefixtures("configured_django")
def test_django_middleware_listed_twice_runs_the_view() -> None:
    django_runs.clear()
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[MIDDLEWARE, MIDDLEWARE],
        IDEMFN_HTTP={"store": MemoryStore()},
    ):
        client = DjangoClient()
        first = django_post(client, "twice")
        again = django_post(client, "twice")
    assert (first.status_code, again.status_code, len(django_runs)) == (201, 201, 1)


@pytest.mark.usefixtures("configured_django")
def test_django_gzip_above_the_middleware_compresses_each_replay_for_its_request() -> None:
    # The documented order: content negotiation (GZip) above idemfn's middleware, so the
    # recorded response is the identity one and each replay is negotiated afresh.
    django_runs.clear()
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.middleware.gzip.GZipMiddleware", MIDDLEWARE],
        IDEMFN_HTTP={"store": MemoryStore()},
    ):
        client = DjangoClient()
        first = django_post(client, "gz", **{"Accept-Encoding": "gzip"})
        assert first.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(first.content) == b"order " * 200
        retry = django_post(client, "gz", **{"Accept-Encoding": "identity"})
    assert len(django_runs) == 1
    assert "Content-Encoding" not in retry.headers
    assert retry.content == b"order " * 200


def test_starlette_gzip_outside_the_middleware_compresses_each_replay_for_its_request() -> None:
    # The documented order: GZipMiddleware added after idemfn's (so outside it).
    async def big(request: StarletteRequest) -> Response:
        await request.body()
        return PlainTextResponse("x" * 2000, status_code=201)

    app = Starlette(routes=[Route("/big", big, methods=["POST"])])
    app.add_middleware(AsgiMiddleware, store=MemoryStore())
    app.add_middleware(GZipMiddleware, minimum_size=100)
    client = TestClient(app)
    first = client.post(
        "/big", content=b"{}", headers={"Idempotency-Key": "g", "Accept-Encoding": "gzip"}
    )
    assert first.headers["content-encoding"] == "gzip"
    retry = client.post(
        "/big", content=b"{}", headers={"Idempotency-Key": "g", "Accept-Encoding": "identity"}
    )
    assert retry.headers.get("idempotent-replayed") == "true"
    assert "content-encoding" not in retry.headers


def _fails_after_a_chunk(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """What an error-catching WSGI layer does (Werkzeug's DebuggedApplication, Paste's
    ErrorMiddleware): the response started, then failed, and an error page is attempted with
    start_response(exc_info), which a server refuses once headers went out (PEP 3333)."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"partial "
    try:
        raise ValueError("the stream's source failed")
    except ValueError:
        start_response("500 Internal Server Error", [("Content-Type", "text/html")], sys.exc_info())
    yield b"<error page>"


def test_without_the_middleware_exc_info_after_a_yielded_chunk_is_raised() -> None:
    """The baseline: the server re-raises (PEP 3333), the client has the 200's bytes only."""
    sent = Sent()
    with pytest.raises(ValueError, match="source failed"):
        sent.serve(_fails_after_a_chunk, wsgi_environ())
    assert (sent.status, sent.body) == ("200 OK", b"partial ")


def test_exc_info_after_a_yielded_chunk_never_mixes_two_responses() -> None:
    store = MemoryStore()
    guarded = WsgiMiddleware(_fails_after_a_chunk, store=store)
    sent = Sent()
    with pytest.raises(ValueError, match="source failed"):
        sent.serve(guarded, wsgi_environ())
    assert b"<error page>" not in sent.body
    retry = Sent().serve(guarded, wsgi_environ())
    assert retry.status.startswith("500") and b"#interrupted" in retry.body


# == Guarantees that held (and what the docs do not say) ========================================


class _ReleasedThenOk:
    """An ASGI app whose first run answers 503 (released by recorded_statuses), held until
    ``go`` is set; later runs answer 201."""

    def __init__(self) -> None:
        self.runs = 0
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.runs += 1
        number = self.runs
        await receive()
        if number == 1:
            self.entered.set()
            await self.go.wait()
        status = 503 if number == 1 else 201
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": f"run {number}".encode()})


def test_a_waiter_whose_first_request_is_released_runs_the_app_itself() -> None:
    """index.md says a waiter gets the recorded response or 409; when the first response's
    status is released by recorded_statuses it gets neither: it claims the key and runs the
    app (a second run, fresh, not a replay). Pinned here as the behaviour the docs should say."""

    async def main() -> tuple[list[Any], list[Any], int]:
        app = _ReleasedThenOk()
        guarded = AsgiMiddleware(
            app, store=MemoryStore(), wait=60, recorded_statuses=range(200, 500)
        )
        first = asyncio.ensure_future(asgi_call(guarded))
        await app.entered.wait()
        waiter = asyncio.ensure_future(asgi_call(guarded))
        for _ in range(50):  # let the waiter reach its watch: it finds the key busy
            await asyncio.sleep(0)
        app.go.set()
        return await first, await waiter, app.runs

    first, waiter, runs = run(main())
    assert status_of(first) == 503
    assert status_of(waiter) == 201 and waiter[-1]["body"] == b"run 2"
    assert all(name != b"idempotent-replayed" for name, _ in waiter[0]["headers"])
    assert runs == 2


def _raises(request: Any) -> str:
    raise LookupError("the tenant service is down")


def _raising(option: str) -> dict[str, Any]:
    return {option: _raises}


@pytest.mark.parametrize("option", ["scope", "fingerprint", "deadline"])
def test_asgi_callable_that_raises_claims_nothing(option: str) -> None:
    store = MemoryStore()
    app = Counted()
    with pytest.raises(LookupError):
        run(asgi_call(AsgiMiddleware(app, store=store, **_raising(option))))
    assert app.runs == 0 and list(store.scan()) == []
    assert status_of(run(asgi_call(AsgiMiddleware(app, store=store)))) == 201  # runs now


@pytest.mark.parametrize("option", ["scope", "fingerprint", "deadline"])
def test_wsgi_callable_that_raises_claims_nothing(option: str) -> None:
    store = MemoryStore()
    with pytest.raises(LookupError):
        Sent().serve(WsgiMiddleware(wsgi_ok, store=store, **_raising(option)), wsgi_environ())
    assert list(store.scan()) == []
    assert Sent().serve(WsgiMiddleware(wsgi_ok, store=store), wsgi_environ()).status[:3] == "201"


@pytest.mark.usefixtures("configured_django")
@pytest.mark.parametrize("option", ["scope", "fingerprint", "deadline"])
def test_django_callable_that_raises_is_a_500_and_claims_nothing(option: str) -> None:
    django_runs.clear()
    store = MemoryStore()
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[MIDDLEWARE],
        IDEMFN_HTTP={"store": store, option: _raises},
    ):
        client = DjangoClient(raise_request_exception=False)
        assert django_post(client, "raises").status_code == 500
    assert django_runs == [] and list(store.scan()) == []


def test_a_naive_deadline_is_refused_naming_the_option_and_claims_nothing() -> None:
    from datetime import datetime

    store = MemoryStore()
    guarded = AsgiMiddleware(Counted(), store=store, deadline=lambda request: datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="deadline"):
        run(asgi_call(guarded))
    assert list(store.scan()) == []


ODD_KEYS = [b"k\x00", b"k\xff", b'"k\x00"', b'"caf\xe9"', b"k\x7f", b"\xc3\xa9"]


@pytest.mark.parametrize("raw", ODD_KEYS)
def test_odd_key_bytes_are_400_key_invalid_in_asgi(raw: bytes) -> None:
    store = MemoryStore()
    app = Counted()
    answer = run(asgi_call(AsgiMiddleware(app, store=store), asgi_scope(raw)))
    assert (status_of(answer), problem_of(answer), app.runs) == (400, "key-invalid", 0)


@pytest.mark.parametrize("raw", ODD_KEYS)
def test_odd_key_bytes_are_400_key_invalid_in_wsgi(raw: bytes) -> None:
    sent = Sent().serve(
        WsgiMiddleware(wsgi_ok, store=MemoryStore()), wsgi_environ(key=raw.decode("latin-1"))
    )
    assert sent.status.startswith("400") and b"#key-invalid" in sent.body


@pytest.mark.usefixtures("configured_django")
@pytest.mark.parametrize("raw", ODD_KEYS)
def test_odd_key_bytes_are_400_key_invalid_in_django(raw: bytes) -> None:
    django_runs.clear()
    with override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=[MIDDLEWARE], IDEMFN_HTTP={"store": MemoryStore()}
    ):
        # As a WSGI server hands it over: the raw bytes as latin-1 text (PEP 3333).
        answer = DjangoClient().post(
            "/orders",
            data=b"{}",
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY=raw.decode("latin-1"),
        )
    assert answer.status_code == 400 and answer.json()["type"] == PROBLEMS + "key-invalid"
    assert django_runs == []


def test_lowercase_methods_and_positional_options() -> None:
    guarded = AsgiMiddleware(Counted(), store=MemoryStore(), methods=["post", "patch"])
    assert guarded.options.methods == {"POST", "PATCH"}
    with pytest.raises(TypeError):
        AsgiMiddleware(Counted(), MemoryStore())  # type: ignore[call-arg]  # options are keyword-only
    with pytest.raises(TypeError):
        WsgiMiddleware(wsgi_ok, MemoryStore())  # type: ignore[call-arg]


def test_an_idempotent_function_keyed_on_the_same_text_inside_the_app_runs() -> None:
    """The app calls an @idempotent function with the request's key text: its stored key is
    the function's name and that text, never the middleware's; no re-entry, no 409."""
    store = MemoryStore()
    charged: list[str] = []

    @idempotent(store=store, name="tests.review2.charge", key=lambda key: key)
    async def charge(key: str) -> str:
        charged.append(key)
        return f"charged {key}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        key = dict(scope["headers"])[b"idempotency-key"].decode()
        body = (await charge(key)).encode()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body})

    guarded = AsgiMiddleware(app, store=store)
    first = run(asgi_call(guarded))
    again = run(asgi_call(guarded))
    assert (status_of(first), status_of(again), first[-1]["body"]) == (201, 201, b"charged k1")
    assert charged == ["k1"]
    assert sorted(entry.key for entry in store.scan()) == ["http::k1", "tests.review2.charge:k1"]


def test_starlette_exception_handler_for_exception_is_outside_the_middleware() -> None:
    """asgi.md says add_middleware puts the middleware outside Starlette's error handling, so
    the replay is what the exception handlers made; a handler of Exception (or 500) runs in
    ServerErrorMiddleware, outside it: the first client gets the handler's 500, the key is
    halted, and the retry gets 500 interrupted, not the handler's response."""

    async def boom(request: StarletteRequest) -> Response:
        raise RuntimeError("the view failed")

    async def handler(request: StarletteRequest, exc: Exception) -> Response:
        return JSONResponse({"error": "handled"}, status_code=500)

    app = Starlette(
        routes=[Route("/boom", boom, methods=["POST"])], exception_handlers={Exception: handler}
    )
    app.add_middleware(AsgiMiddleware, store=MemoryStore())
    client = TestClient(app, raise_server_exceptions=False)
    first = client.post("/boom", headers={"Idempotency-Key": "b"})
    retry = client.post("/boom", headers={"Idempotency-Key": "b"})
    assert first.json() == {"error": "handled"}
    assert retry.status_code == 500 and retry.json()["type"] == PROBLEMS + "interrupted"


def test_base_http_middleware_inside_and_outside_with_a_background_task() -> None:
    """BaseHTTPMiddleware on both sides (each reading the body), a streamed response and a
    background task that fails after it: recorded once, replayed with the inner one's header."""
    ran: list[bytes] = []
    background: list[int] = []

    class Tag(BaseHTTPMiddleware):
        async def dispatch(self, request: StarletteRequest, call_next: Any) -> Response:
            body = await request.body()
            response: Response = await call_next(request)
            response.headers.append("x-seen", str(len(body)))
            return response

    async def later() -> None:
        background.append(1)
        raise RuntimeError("the background task failed")

    async def pay(request: StarletteRequest) -> Response:
        from starlette.background import BackgroundTask

        ran.append(await request.body())
        return PlainTextResponse("paid", status_code=201, background=BackgroundTask(later))

    app = Starlette(routes=[Route("/pay", pay, methods=["POST"])])
    app.add_middleware(Tag)
    app.add_middleware(AsgiMiddleware, store=MemoryStore())
    app.add_middleware(Tag)
    client = TestClient(app, raise_server_exceptions=False)
    first = client.post("/pay", content=b"xyz", headers={"Idempotency-Key": "p"})
    retry = client.post("/pay", content=b"xyz", headers={"Idempotency-Key": "p"})
    assert first.status_code == retry.status_code == 201 and retry.text == "paid"
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers.get_list("x-seen") == ["3", "3"]  # the inner one's, recorded, and ours
    assert ran == [b"xyz"] and background == [1]


def test_a_middleware_made_before_fork_serves_each_child(tmp_path: Path) -> None:
    """gunicorn --preload: the middleware (and its DiskStore, used once) made in the master,
    then forked. A child replays the master's key, runs a new one once; the master then
    replays the child's."""
    ran: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ran.append(environ["PATH_INFO"])
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [f"{os.getpid()}".encode()]

    guarded = WsgiMiddleware(app, store=DiskStore(tmp_path / "store"))
    master = Sent().serve(guarded, wsgi_environ(key="m"))
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        code = 1
        try:
            replay = Sent().serve(guarded, wsgi_environ(key="m"))
            new = Sent().serve(guarded, wsgi_environ(key="c"))
            again = Sent().serve(guarded, wsgi_environ(key="c"))
            report = {
                "replay": [
                    replay.status,
                    replay.body.decode(),
                    replay.header("idempotent-replayed"),
                ],
                "new": [new.status, new.body.decode()],
                "again": [again.status, again.header("idempotent-replayed")],
                "ran": len(ran),
            }
            os.write(writer, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report["replay"] == ["201 Created", master.body.decode(), "true"]
    assert report["new"] == ["201 Created", str(pid)]
    assert report["again"] == ["201 Created", "true"]
    assert report["ran"] == 2  # the master's run (inherited) and the child's one
    from_master = Sent().serve(guarded, wsgi_environ(key="c"))
    assert from_master.body == str(pid).encode() and ran == ["/orders"]
