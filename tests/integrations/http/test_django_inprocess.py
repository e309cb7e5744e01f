"""idemfn.django.IdempotencyMiddleware in process: Django's test Client and AsyncClient, sync
and async views, each request's answer, what is recorded (cookies, streams, files) and the
settings' errors. The real servers (gunicorn, uvicorn) are tests/integrations/http/test_servers.py.

Django is configured for this module only (and left unconfigured after it, for whatever in the
same process configures it next); each test's settings come from ``override_settings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.test import AsyncClient, Client, RequestFactory, override_settings
from django.urls import path

import idemfn.django as django_middleware
from idemfn import MemoryStore, Status
from idemfn._record import Entry
from idemfn.django import IdempotencyMiddleware
from tests.support.django_settings import configured

PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"
MIDDLEWARE = "idemfn.django.IdempotencyMiddleware"
REPLAYED = ("Idempotent-Replayed", "true")

runs: dict[str, int] = {}  # each view's runs: the side effect that must happen once per key


def _ran(request: HttpRequest) -> int:
    runs[request.path] = runs.get(request.path, 0) + 1
    return runs[request.path]


# The views.


def order(request: HttpRequest) -> HttpResponse:
    count = _ran(request)
    response = JsonResponse({"order": count, "body": request.body.decode()}, status=201)
    response["X-Order"] = str(count)
    response["x-lower-case"] = "kept as written"
    response.set_cookie("session", f"s{count}", max_age=3600, httponly=True, samesite="Lax")
    response.set_cookie("theme", "dark mode")  # a value Django quotes
    return response


def flaky(request: HttpRequest) -> HttpResponse:
    count = _ran(request)
    return HttpResponse(f"run {count}", status=503 if count == 1 else 201)


def fails(request: HttpRequest) -> HttpResponse:
    _ran(request)
    raise RuntimeError("the view failed")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    _ran(request)
    chunks = int(request.GET.get("chunks", "3"))
    fail_at = int(request.GET.get("fail_at", "-1"))

    def produce() -> Iterator[bytes]:
        for index in range(chunks):
            if index == fail_at:
                raise OSError("the stream's source failed")
            produced.append(index)
            yield bytes([65 + index]) * 64

    headers = {"X-Kind": "s"}
    if request.GET.get("sized"):
        headers["Content-Length"] = str(chunks * 64)
    return StreamingHttpResponse(produce(), content_type="text/plain", headers=headers)


produced: list[int] = []  # the chunks stream() has made so far


def a_file(request: HttpRequest) -> FileResponse:
    _ran(request)
    return FileResponse(io.BytesIO(b"file contents " * 100), filename="report.txt")


def plain(request: HttpRequest) -> HttpResponse:
    _ran(request)
    return HttpResponse(b"plain", status=201)


def bare(request: HttpRequest) -> HttpResponse:
    _ran(request)
    response = HttpResponse(status=204)
    del response["Content-Type"]
    return response


hanging: asyncio.Event | None = None  # set by the test: the view runs, and hangs


async def async_hang(request: HttpRequest) -> HttpResponse:
    _ran(request)
    assert hanging is not None
    hanging.set()
    await asyncio.Event().wait()  # until cancelled: the client left
    raise AssertionError("never")


async def async_order(request: HttpRequest) -> HttpResponse:
    count = _ran(request)
    response = JsonResponse({"order": count}, status=201)
    response.set_cookie("session", f"s{count}")
    return response


async def async_stream(request: HttpRequest) -> StreamingHttpResponse:
    _ran(request)

    async def produce() -> AsyncIterator[bytes]:
        for index in range(3):
            yield bytes([97 + index]) * 32

    return StreamingHttpResponse(produce(), content_type="text/plain")


urlpatterns = [
    path("orders", order),
    path("flaky", flaky),
    path("fails", fails),
    path("stream", stream),
    path("file", a_file),
    path("plain", plain),
    path("abort", plain),
    path("bare", bare),
    path("async/orders", async_order),
    path("async/hang", async_hang),
    path("async/stream", async_stream),
    path("async/abort", async_order),
]


class Abort(BaseException):
    """Not an ``Exception``: Django does not turn it into a response on its way up."""


class AbortBelow:
    """A middleware below the idempotency one, raising ``Abort`` on the */abort routes."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if request.path.endswith("/abort"):
            _ran(request)
            raise Abort
        return self.get_response(request)


scoped_on_a_loop: list[bool] = []  # for each call of tenant_of: whether a loop ran there


def tenant_of(request: HttpRequest) -> str | None:
    """The ``scope`` option, given as a dotted path."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        scoped_on_a_loop.append(False)
    else:
        scoped_on_a_loop.append(True)
    return request.headers.get("X-Api-Key")


# Django, once for the module; each test's settings.


@pytest.fixture(scope="module", autouse=True)
def _django() -> Iterator[None]:
    with configured(__name__):
        yield


@pytest.fixture(autouse=True)
def _fresh_runs() -> None:
    runs.clear()
    scoped_on_a_loop.clear()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@contextlib.contextmanager
def guarded(store: MemoryStore, *, below: bool = False, **options: Any) -> Iterator[None]:
    """The project's settings: the middleware (with ``AbortBelow`` under it, if ``below``)
    and its options in ``IDEMFN_HTTP``."""
    middleware = [MIDDLEWARE, f"{__name__}.AbortBelow"] if below else [MIDDLEWARE]
    with override_settings(
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver"],
        MIDDLEWARE=middleware,
        IDEMFN_HTTP={"store": store, **options},
    ):
        yield


def post(
    client: Client,
    route: str,
    key: str | None,
    body: str = "{}",
    headers: dict[str, str] | None = None,
) -> Any:
    """POST ``body`` (JSON) to ``route``, with ``key`` as the Idempotency-Key (None: none)."""
    sent = dict(headers or {})
    if key is not None:
        sent["Idempotency-Key"] = key
    return client.post(route, data=body, content_type="application/json", headers=sent)


def on_the_wire(response: Any) -> list[tuple[str, str]]:
    """The headers as Django's handlers send them: the response's, then its cookies."""
    cookies = [("Set-Cookie", morsel.OutputString()) for morsel in response.cookies.values()]
    return [*response.items(), *cookies]


def problem_type(response: Any) -> str:
    assert response["Content-Type"] == "application/problem+json"
    assert [name for name, _ in response.items()].count("Content-Type") == 1
    document = json.loads(response.content)
    assert document["status"] == response.status_code
    return str(document["type"]).removeprefix(PROBLEMS)


# What a request gets.


def test_a_replay_has_the_first_responses_status_headers_cookies_and_body(
    store: MemoryStore,
) -> None:
    with guarded(store):
        client = Client()
        first = post(client, "/orders", "k-1", '{"sku": "mug"}')
        retry = post(client, "/orders", "k-1", '{"sku": "mug"}')
    assert runs == {"/orders": 1}
    assert first.status_code == retry.status_code == 201
    assert retry.content == first.content
    assert "Idempotent-Replayed" not in first
    replayed = on_the_wire(retry)
    assert REPLAYED in replayed
    replayed.remove(REPLAYED)
    # The same headers, in the same order and case, and the cookies rendered alike.
    assert replayed == on_the_wire(first)
    assert [name for name, _ in first.items()] == ["Content-Type", "X-Order", "x-lower-case"]
    assert retry.cookies["session"].value == "s1"
    assert retry.cookies["session"]["httponly"] is True
    assert retry.cookies["theme"].OutputString() == first.cookies["theme"].OutputString()


def test_a_replay_adds_no_header_the_first_response_did_not_have(store: MemoryStore) -> None:
    with guarded(store):
        client = Client()
        first = post(client, "/bare", "k-1")
        retry = post(client, "/bare", "k-1")
    assert first.status_code == retry.status_code == 204
    assert "Content-Type" not in first and "Content-Type" not in retry  # not Django's default
    assert list(retry.items()) == [REPLAYED]
    assert runs == {"/bare": 1}


def test_requests_not_guarded_pass_through(store: MemoryStore) -> None:
    with guarded(store):
        client = Client()
        assert post(client, "/plain", None).status_code == 201  # no key
        assert post(client, "/plain", None).status_code == 201
        assert client.put("/plain", headers={"Idempotency-Key": "k"}).status_code == 201
        assert client.put("/plain", headers={"Idempotency-Key": "k"}).status_code == 201
    assert runs == {"/plain": 4}
    assert list(store.scan()) == []


def test_the_key_with_another_body_is_refused_with_422(store: MemoryStore) -> None:
    with guarded(store):
        client = Client()
        assert post(client, "/orders", "k-1", '{"sku": "mug"}').status_code == 201
        reused = post(client, "/orders", "k-1", '{"sku": "cup"}')
        elsewhere = post(client, "/plain", "k-1", '{"sku": "mug"}')  # another path
    assert reused.status_code == elsewhere.status_code == 422
    assert problem_type(reused) == "key-reused"
    assert "'k-1'" in json.loads(reused.content)["detail"]
    assert [name for name, _ in reused.items()] == ["Content-Type", "Content-Length"]
    assert runs == {"/orders": 1}


@pytest.mark.parametrize(
    ("meta", "slug"),
    [
        ({}, "key-missing"),
        # Django folds a header sent twice into one value joined by "," (gunicorn and its
        # ASGI handler alike): it is still a repeated key.
        ({"HTTP_IDEMPOTENCY_KEY": "a,b"}, "key-repeated"),
        ({"HTTP_IDEMPOTENCY_KEY": '"a","b"'}, "key-repeated"),
        ({"HTTP_IDEMPOTENCY_KEY": ""}, "key-invalid"),
        ({"HTTP_IDEMPOTENCY_KEY": "k" * 65}, "key-invalid"),
        ({"HTTP_IDEMPOTENCY_KEY": "two words"}, "key-invalid"),
        ({"HTTP_IDEMPOTENCY_KEY": '"unclosed'}, "key-invalid"),
        ({"HTTP_IDEMPOTENCY_KEY": "caf\u00e9"}, "key-invalid"),
    ],
)
def test_each_bad_key_is_refused_with_400(
    store: MemoryStore, meta: dict[str, str], slug: str
) -> None:
    with guarded(store, required=True, max_key_length=64):
        response = Client().post("/plain", data="{}", content_type="application/json", **meta)
    assert response.status_code == 400
    assert problem_type(response) == slug
    assert runs == {}


def test_a_quoted_key_and_a_bare_token_are_the_same_key(store: MemoryStore) -> None:
    with guarded(store):
        client = Client()
        first = post(client, "/plain", "abc")
        retry = client.post(
            "/plain", data="{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY='"abc"'
        )
    assert retry["Idempotent-Replayed"] == "true" and retry.content == first.content
    assert runs == {"/plain": 1}


def test_a_body_over_max_request_body_gets_413_before_anything_runs(store: MemoryStore) -> None:
    with guarded(store, max_request_body=100):
        client = Client()
        assert post(client, "/plain", "k-1", "x" * 100).status_code == 201
        refused = post(client, "/plain", "k-2", "x" * 101)
        # Not even a fingerprint of its own reads it: Content-Length says it all.
    with guarded(store, max_request_body=100, fingerprint=lambda request: ""):
        unread = post(Client(), "/plain", "k-3", "x" * 101)
    assert refused.status_code == unread.status_code == 413
    assert problem_type(refused) == "request-too-large"
    assert "101 bytes" in json.loads(refused.content)["detail"]
    assert runs == {"/plain": 1}
    assert {entry.key for entry in store.scan()} == {"http::k-1"}


def test_djangos_data_upload_max_memory_size_bounds_the_body_fingerprinted(
    store: MemoryStore,
) -> None:
    # request.body refuses a body over DATA_UPLOAD_MAX_MEMORY_SIZE: the default fingerprint
    # says so with a 413, before anything runs; a fingerprint that reads no body lets it in.
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=50), guarded(store):
        refused = post(Client(), "/plain", "k-1", "x" * 51)
    with (
        override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=50),
        guarded(store, fingerprint=lambda request: request.headers["X-Digest"]),
    ):
        passed = post(Client(), "/plain", "k-2", "x" * 51, {"X-Digest": "sha256:abc"})
    assert refused.status_code == 413
    assert problem_type(refused) == "request-too-large"
    assert "50 bytes" in json.loads(refused.content)["detail"]
    assert passed.status_code == 201
    assert runs == {"/plain": 1}


def test_a_status_outside_recorded_statuses_releases_the_key(store: MemoryStore) -> None:
    with guarded(store, recorded_statuses=range(200, 500)):
        client = Client()
        first = post(client, "/flaky", "k-1")
        second = post(client, "/flaky", "k-1")  # the 503 was not recorded: it runs again
        third = post(client, "/flaky", "k-1")
    assert (first.status_code, second.status_code, third.status_code) == (503, 201, 201)
    assert "Idempotent-Replayed" not in second and third["Idempotent-Replayed"] == "true"
    assert runs == {"/flaky": 2}


def test_a_views_exception_is_djangos_500_response_and_is_recorded(store: MemoryStore) -> None:
    # Django turns the view's exception into its 500 response before the middleware sees it.
    with guarded(store):
        client = Client(raise_request_exception=False)
        first = post(client, "/fails", "k-1")
        retry = post(client, "/fails", "k-1")
    assert first.status_code == retry.status_code == 500
    assert retry["Idempotent-Replayed"] == "true" and retry.content == first.content
    assert runs == {"/fails": 1}


def test_an_exception_reaching_the_middleware_halts_the_key(store: MemoryStore) -> None:
    with guarded(store, below=True):
        client = Client()
        with pytest.raises(Abort):
            post(client, "/abort", "k-1")
        retry = post(client, "/abort", "k-1")
    assert retry.status_code == 500
    assert problem_type(retry) == "interrupted"
    assert runs == {"/abort": 1}
    assert store.get("http::k-1").status == Status.HALTED  # type: ignore[union-attr]


def test_scope_from_a_dotted_path_keeps_tenants_apart(store: MemoryStore) -> None:
    with guarded(store, scope=f"{__name__}.tenant_of"):
        client = Client()
        acme = post(client, "/plain", "k-1", headers={"X-Api-Key": "acme"})
        globex = post(
            client, "/plain", "k-1", headers={"X-Api-Key": "globex"}
        )  # the same key, its own
        again = post(client, "/plain", "k-1", headers={"X-Api-Key": "acme"})
    assert acme.status_code == globex.status_code == 201
    assert "Idempotent-Replayed" not in globex and again["Idempotent-Replayed"] == "true"
    assert runs == {"/plain": 2}
    assert {entry.key for entry in store.scan()} == {"http:acme:k-1", "http:globex:k-1"}


def test_a_request_past_its_deadline_is_refused_with_400(store: MemoryStore) -> None:
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    with guarded(store, deadline=lambda request: past):
        expired = post(Client(), "/plain", "k-1")
    assert expired.status_code == 400 and problem_type(expired) == "request-expired"
    assert runs == {}


# Streamed responses.


def test_a_streamed_response_goes_out_as_it_comes_and_is_recorded_at_its_end(
    store: MemoryStore,
) -> None:
    with guarded(store):
        client = Client()
        first = post(client, "/stream?chunks=3", "k-1")
        chunks = iter(first.streaming_content)
        head = next(chunks)
        # The first chunk is out, the response is not over: the key is still running.
        running = post(client, "/stream?chunks=3", "k-1")
        rest = b"".join(chunks)
        first.close()
        retry = post(client, "/stream?chunks=3", "k-1")
    assert running.status_code == 409 and problem_type(running) == "in-progress"
    assert running["Retry-After"] == "1"
    assert head + rest == b"A" * 64 + b"B" * 64 + b"C" * 64
    assert not retry.streaming
    assert retry.status_code == 200 and retry.content == head + rest
    assert retry["X-Kind"] == "s" and retry["Idempotent-Replayed"] == "true"
    assert runs == {"/stream": 1}


def test_a_sized_stream_is_recorded_before_its_last_chunk_goes_out(store: MemoryStore) -> None:
    # With a Content-Length the client knows it has everything from the last chunk on, and
    # may retry at once: it must be replayed then, never told 409.
    with guarded(store):
        client = Client()
        first = post(client, "/stream?chunks=3&sized=1", "k-1")
        chunks = iter(first.streaming_content)
        got = [next(chunks) for _ in range(3)]
        retry = post(client, "/stream?chunks=3&sized=1", "k-1")
        assert list(chunks) == []
        first.close()
    assert retry.status_code == 200 and retry["Idempotent-Replayed"] == "true"
    assert retry.content == b"".join(got)
    assert runs == {"/stream": 1}


def test_an_unsized_stream_sends_each_chunk_as_it_comes(store: MemoryStore) -> None:
    # Without a Content-Length (a stream of events) no chunk waits for the next one.
    produced.clear()
    with guarded(store):
        first = post(Client(), "/stream?chunks=3", "k-1")
        chunks = iter(first.streaming_content)
        assert next(chunks) == b"A" * 64 and produced == [0]
        assert next(chunks) == b"B" * 64 and produced == [0, 1]
        assert b"".join(chunks) == b"C" * 64
        first.close()


def test_a_streamed_response_over_the_limit_reaches_its_client_whole_and_is_not_replayed(
    store: MemoryStore,
) -> None:
    with guarded(store, max_response_body=100):
        client = Client()
        first = post(client, "/stream?chunks=5", "k-1")
        body = b"".join(first.streaming_content)
        first.close()
        retry = post(client, "/stream?chunks=5", "k-1")
    assert len(body) == 5 * 64
    assert retry.status_code == 500 and problem_type(retry) == "response-not-recorded"
    assert runs == {"/stream": 1}


def test_a_stream_that_raises_or_is_closed_before_its_end_halts_the_key(
    store: MemoryStore,
) -> None:
    with guarded(store):
        client = Client()
        failing = post(client, "/stream?chunks=3&fail_at=1", "k-1")
        with pytest.raises(OSError, match="source failed"):
            b"".join(failing.streaming_content)
        left = post(client, "/stream?chunks=3", "k-2")
        next(iter(left.streaming_content))
        left.close()  # the client left: the server closes the response
        unread = post(client, "/stream?chunks=3", "k-3")
        unread.close()  # not a chunk read
        retries = [
            post(client, "/stream?chunks=3&fail_at=1", "k-1"),
            post(client, "/stream?chunks=3", "k-2"),
            post(client, "/stream?chunks=3", "k-3"),
        ]
    for retry in retries:
        assert retry.status_code == 500 and problem_type(retry) == "interrupted"
    assert runs == {"/stream": 3}


def test_a_file_response_is_streamed_through_the_recorder_even_with_a_file_wrapper(
    store: MemoryStore,
) -> None:
    # gunicorn hands WSGI apps a wsgi.file_wrapper: Django would give it the FileResponse's
    # file to send by itself, past the recorder. The middleware's stream replaces the file.
    wrapped: list[object] = []

    def file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        wrapped.append(filelike)
        return iter(lambda: filelike.read(block_size), b"")

    with guarded(store):
        environ = (
            RequestFactory()
            .post("/file", data="{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1")
            .environ
        )
        environ["wsgi.file_wrapper"] = file_wrapper
        statuses: list[tuple[str, list[tuple[str, str]]]] = []
        result = WSGIHandler()(environ, lambda status, headers: statuses.append((status, headers)))
        body = b"".join(result)
        result.close()
        retry = post(Client(), "/file", "k-1")
    assert wrapped == []
    assert body == b"file contents " * 100
    assert retry.content == body and retry["Idempotent-Replayed"] == "true"
    assert retry["Content-Length"] == str(len(body))
    assert retry["Content-Disposition"] == 'inline; filename="report.txt"'
    assert runs == {"/file": 1}


def test_a_body_cut_short_by_a_client_that_left_runs_nothing(store: MemoryStore) -> None:
    # gunicorn's wsgi.input ends early when the client leaves mid-upload, and Django's
    # request.body returns what came: it must not run (nor be recorded) as if whole.
    with guarded(store):
        environ = (
            RequestFactory()
            .post("/orders", data="{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1")
            .environ
        )
        environ["CONTENT_LENGTH"] = "11"
        environ["wsgi.input"] = io.BytesIO(b'{"item":')
        statuses: list[str] = []
        result = WSGIHandler()(environ, lambda status, headers: statuses.append(status))
        body = json.loads(b"".join(result))
        result.close()
        assert statuses == ["400 Bad Request"]
        assert body["type"].endswith("#request-incomplete") and "'k-1'" in body["detail"]
        assert list(store.scan()) == []
        assert runs == {}
        assert post(Client(), "/orders", "k-1").status_code == 201  # the whole retry runs


# The async path: Django's AsyncClient (an ASGI server alike) awaits the middleware.


class OffTheLoop(MemoryStore):
    """A ``MemoryStore`` whose sync primitives refuse to run on an event loop's thread (they
    would block it): the async path must await the async ones, which it lists."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited: list[str] = []
        self.blocking: list[str] = []

    def _sync(self, name: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread of its own (the heartbeat's, a worker's): sync is right there
        self.blocking.append(name)
        raise AssertionError(f"the sync {name}() ran on the event loop")

    def claim(self, entry: Entry) -> Entry | None:
        self._sync("claim")
        return super().claim(entry)

    def get(self, key: str) -> Entry | None:
        self._sync("get")
        return super().get(key)

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        self._sync("swap")
        return super().swap(key, token, entry)

    def release(self, key: str, token: str) -> bool:
        self._sync("release")
        return super().release(key, token)

    async def aclaim(self, entry: Entry) -> Entry | None:
        self.awaited.append("aclaim")
        return MemoryStore.claim(self, entry)

    async def aget(self, key: str) -> Entry | None:
        self.awaited.append("aget")
        return MemoryStore.get(self, key)

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        self.awaited.append("aswap")
        return MemoryStore.swap(self, key, token, entry)

    async def arelease(self, key: str, token: str) -> bool:
        self.awaited.append("arelease")
        return MemoryStore.release(self, key, token)


async def apost(
    client: AsyncClient, route: str, key: str, headers: dict[str, str] | None = None
) -> Any:
    """``post`` for the AsyncClient."""
    sent = {**(headers or {}), "Idempotency-Key": key}
    return await client.post(route, data="{}", content_type="application/json", headers=sent)


def test_an_async_view_is_recorded_and_replayed_on_the_stores_async_primitives() -> None:
    store = OffTheLoop()

    async def main() -> tuple[Any, Any, Any]:
        client = AsyncClient()
        first = await apost(client, "/async/orders", "k-1", {"X-Api-Key": "acme"})
        retry = await apost(client, "/async/orders", "k-1", {"X-Api-Key": "acme"})
        other = await apost(client, "/async/orders", "k-1", {"X-Api-Key": "globex"})
        return first, retry, other

    # A sync scope (a dotted path) under ASGI: run in a worker thread, as Django runs sync code.
    with guarded(store, scope=f"{__name__}.tenant_of"):
        first, retry, other = asyncio.run(main())
    assert first.status_code == retry.status_code == other.status_code == 201
    assert retry["Idempotent-Replayed"] == "true" and retry.content == first.content
    replayed = on_the_wire(retry)
    replayed.remove(REPLAYED)
    assert replayed == on_the_wire(first)
    assert "Idempotent-Replayed" not in other  # another tenant: its own key
    assert runs == {"/async/orders": 2}
    assert scoped_on_a_loop == [False, False, False]  # a worker thread: it may use the ORM
    assert store.blocking == []
    assert {"aclaim", "aswap", "aget"} <= set(store.awaited)
    assert {entry.key for entry in store.scan()} == {"http:acme:k-1", "http:globex:k-1"}


def test_an_async_stream_is_recorded_at_its_end_on_the_async_primitives() -> None:
    store = OffTheLoop()

    async def main() -> tuple[bytes, Any]:
        client = AsyncClient()
        first = await apost(client, "/async/stream", "k-1")
        body = b"".join([chunk async for chunk in first.streaming_content])
        retry = await apost(client, "/async/stream", "k-1")
        return body, retry

    with guarded(store):
        body, retry = asyncio.run(main())
    assert body == b"a" * 32 + b"b" * 32 + b"c" * 32
    assert retry.content == body and retry["Idempotent-Replayed"] == "true"
    assert runs == {"/async/stream": 1}
    assert store.blocking == [] and "aswap" in store.awaited


def test_an_async_stream_closed_on_the_loop_before_its_end_halts_the_key() -> None:
    store = OffTheLoop()

    async def main() -> Any:
        client = AsyncClient()
        first = await apost(client, "/async/stream", "k-1")
        chunks = first.streaming_content
        await anext(chunks)
        first.close()  # Django's close() is sync: the halt is a task of this loop
        await asyncio.gather(*django_middleware._halting)
        await chunks.aclose()
        return await apost(client, "/async/stream", "k-1")

    with guarded(store):
        retry = asyncio.run(main())
    assert retry.status_code == 500 and problem_type(retry) == "interrupted"
    assert runs == {"/async/stream": 1}
    assert store.blocking == []


def test_a_client_leaving_an_asgi_request_mid_view_halts_the_key() -> None:
    # Django's ASGI handler cancels the view when the client disconnects: the cancellation
    # goes through the middleware, which halts the key (the view may have had effects).
    global hanging
    store = OffTheLoop()
    sent: list[dict[str, Any]] = []

    async def main() -> Any:
        global hanging
        hanging = asyncio.Event()
        body_given = False

        async def receive() -> dict[str, Any]:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": b"{}", "more_body": False}
            assert hanging is not None
            await hanging.wait()  # the view runs: the client leaves
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/async/hang",
            "raw_path": b"/async/hang",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"testserver"),
                (b"content-type", b"application/json"),
                (b"content-length", b"2"),
                (b"idempotency-key", b"k-1"),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        await ASGIHandler()(scope, receive, send)
        return await apost(AsyncClient(), "/async/hang", "k-1")

    with guarded(store):
        retry = asyncio.run(main())
    hanging = None
    assert sent == []  # the client had left: nothing was sent
    assert retry.status_code == 500 and problem_type(retry) == "interrupted"
    assert runs == {"/async/hang": 1}
    assert store.blocking == []


def test_an_exception_reaching_the_async_middleware_halts_the_key() -> None:
    store = OffTheLoop()

    async def main() -> Any:
        client = AsyncClient()
        with pytest.raises(Abort):
            await apost(client, "/async/abort", "k-1")
        return await apost(client, "/async/abort", "k-1")

    with guarded(store, below=True):
        retry = asyncio.run(main())
    assert retry.status_code == 500 and problem_type(retry) == "interrupted"
    assert runs == {"/async/abort": 1}
    assert store.blocking == []
    assert store.get("http::k-1").status == Status.HALTED  # type: ignore[union-attr]


# Settings.


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"stor": "memory://"}, ["settings.IDEMFN_HTTP['stor']", "store, header, methods"]),
        ({"header": "two words"}, ["settings.IDEMFN_HTTP", "header"]),
        ({"ttl": "a day"}, ["settings.IDEMFN_HTTP", "ttl"]),
        ({"max_request_body": 0}, ["settings.IDEMFN_HTTP", "max_request_body"]),
        ({"store": "nosuch://x"}, ["settings.IDEMFN_HTTP", "store"]),
        (
            {"scope": "tests.no_such_module.tenant"},
            ["settings.IDEMFN_HTTP['scope']", "'tests.no_such_module.tenant' does not import"],
        ),
        (
            {"fingerprint": f"{__name__}.no_such_function"},
            ["settings.IDEMFN_HTTP['fingerprint']", "does not import"],
        ),
        ({"deadline": 3}, ["settings.IDEMFN_HTTP", "deadline must be a callable"]),
        ({"scope": async_order}, ["settings.IDEMFN_HTTP['scope']", "coroutine function"]),
    ],
)
def test_bad_settings_are_refused_at_startup_naming_the_setting_and_option(
    options: dict[str, Any], named: list[str]
) -> None:
    with override_settings(IDEMFN_HTTP=options), pytest.raises(ImproperlyConfigured) as raised:
        IdempotencyMiddleware(plain)
    for words in named:
        assert words in str(raised.value)


def test_a_setting_that_is_not_a_dict_is_refused() -> None:
    with override_settings(IDEMFN_HTTP=["store"]), pytest.raises(ImproperlyConfigured) as raised:
        IdempotencyMiddleware(plain)
    assert "settings.IDEMFN_HTTP must be a dict" in str(raised.value)
