"""``idemfn.wsgi.IdempotencyMiddleware`` in-process: raw ``environ``/``start_response`` calls
made as a WSGI server makes them (call, iterate, close), threads for concurrent requests, then a
Flask app through its test client.

The table rows of docs/http as idemfn.asgi's tests check them, plus what is WSGI's own: the
body read from ``wsgi.input`` and handed to the app again, a chunked body the server ends
(``wsgi.input_terminated``), the legacy ``write()``, a response iterator that raises or is
closed early, and its ``close()`` called exactly once. Real servers: test_servers.py.
"""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, abort, request, stream_with_context

from idemfn import DiskStore, MemoryStore, Store, StoreError
from idemfn._record import Entry
from idemfn.wsgi import IdempotencyMiddleware, Request

PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"
REPLAYED = ("idempotent-replayed", "true")
TIMEOUT = 60.0  # for threads and events: a hang fails the test instead of the suite
StartResponse = Callable[..., Callable[[bytes], object]]


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else DiskStore(tmp_path / "store")
    yield made
    made.close()


def middleware(app: Any, store: Store, **options: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(app, store=store, **options)


# -- one request, as a server makes it ----------------------------------------------------------


class Input(io.BytesIO):
    """``wsgi.input``, counting what is read of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def environ_of(
    *,
    method: str = "POST",
    path: str = "/orders",
    query: str = "",
    key: str | None = "k1",
    body: bytes = b'{"item": 1}',
    length: bool = True,
    terminated: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "HTTP_HOST": "testserver",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": Input(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if length:
        environ["CONTENT_LENGTH"] = str(len(body))
    if terminated:
        environ["wsgi.input_terminated"] = True
    if key is not None:
        environ["HTTP_IDEMPOTENCY_KEY"] = key
    environ.update(headers or {})
    return environ


@dataclass
class Served:
    """What the client got."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def header(self, name: str) -> str | None:
        values = [value for found, value in self.headers if found.lower() == name]
        assert len(values) <= 1, values
        return values[0] if values else None

    @property
    def replayed(self) -> bool:
        return self.header("idempotent-replayed") == "true"

    def problem(self, code: int, slug: str, key: str | None = "k1") -> dict[str, Any]:
        """The RFC 9457 body, checked: its type, status, content type, and the key named."""
        assert self.code == code, (self.status, self.body)
        assert self.status != str(code)  # with a reason phrase
        assert self.header("content-type") == "application/problem+json"
        assert self.header("content-length") == str(len(self.body))
        assert not self.replayed
        body: dict[str, Any] = json.loads(self.body)
        assert set(body) == {"type", "title", "status", "detail"}
        assert body["type"] == PROBLEMS + slug
        assert body["status"] == code
        if key is not None:
            assert repr(key) in body["detail"], body["detail"]
        return body


class Server:
    """A WSGI server's side of one request: ``start_response``, then the iterable sent and
    closed. ``delivered`` grows as chunks go out (``write()`` too)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, list[tuple[str, str]]]] = []
        self.delivered: list[bytes] = []
        self.sent_headers = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and self.sent_headers:
            raise exc_info[1].with_traceback(exc_info[2])
        assert exc_info is not None or not self.started, "start_response called twice"
        self.started.append((status, list(headers)))
        return self.write

    def write(self, chunk: bytes) -> None:
        assert self.started
        self.sent_headers = True
        self.delivered.append(chunk)

    def serve(self, app: Any, environ: dict[str, Any], *, leave_after: int | None = None) -> Served:
        """Call ``app``, send its iterable (closing it early after ``leave_after`` chunks, as a
        server does when the client left), and close it."""
        result = app(environ, self.start_response)
        try:
            for sent, chunk in enumerate(result):
                if leave_after is not None and sent >= leave_after:
                    break
                if chunk:
                    self.write(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = self.started[-1]
        return Served(status, headers, b"".join(self.delivered))


def serve(app: Any, **environ_options: Any) -> Served:
    return Server().serve(app, environ_of(**environ_options))


# -- apps ---------------------------------------------------------------------------------------


class Body:
    """An app's response iterable: ``parts``, raising ``fails_at`` (an index) if given;
    counts its ``close()`` calls, and can fail in them."""

    def __init__(
        self, parts: list[bytes], fails_at: int | None = None, close_fails: bool = False
    ) -> None:
        self.parts = parts
        self.fails_at = fails_at
        self.close_fails = close_fails
        self.closed = 0
        self.iterated = 0
        self.generator_exits = 0

    def __iter__(self) -> Iterator[bytes]:
        try:
            for i, part in enumerate(self.parts):
                if i == self.fails_at:
                    raise ValueError("the response failed midway")
                self.iterated += 1
                yield part
        except GeneratorExit:
            self.generator_exits += 1
            raise

    def close(self) -> None:
        self.closed += 1
        if self.close_fails:
            raise RuntimeError("close failed")


APP_HEADERS = [
    ("Content-Type", "application/json"),
    ("Date", "Thu, 01 Jan 2026 00:00:00 GMT"),  # never replayed
    ("X-Custom", "caf\xe9"),  # latin-1, as PEP 3333 hands it
    ("Set-Cookie", "a=1"),
    ("Set-Cookie", "b=2"),
]


class Orders:
    """Counts its runs; reads the body as a WSGI app does (CONTENT_LENGTH bytes of
    wsgi.input) and answers ``status`` with it. ``gate``: hold the request mid-app until
    ``release``. ``parts``: the response as that iterable instead (a ``Body``)."""

    def __init__(self, status: str = "201 Created", gate: bool = False) -> None:
        self.status = status
        self.gate = gate
        self.runs = 0
        self.bodies: list[bytes] = []
        self.lengths: list[str] = []
        self.environs: list[dict[str, Any]] = []
        self.responses: list[Body] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        with self.lock:
            self.runs += 1
            run = self.runs
        self.environs.append(environ)
        length = environ.get("CONTENT_LENGTH") or "0"
        self.lengths.append(length)
        body = environ["wsgi.input"].read(int(length))
        self.bodies.append(body)
        if self.gate:
            self.entered.set()
            assert self.release.wait(TIMEOUT)
        payload = json.dumps({"run": run, "body": body.decode("latin-1")}).encode()
        start_response(self.status, [*APP_HEADERS, ("Content-Length", str(len(payload)))])
        response = Body([payload[:5], payload[5:]])
        self.responses.append(response)
        return response


def returns(body: Body, status: str = "200 OK") -> Callable[..., Iterable[bytes]]:
    """An app that answers ``body`` (each call: make one app per request you check)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, [("Content-Type", "text/plain")])
        return body

    return app


def in_thread(work: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``work`` in a thread now; the returned callable joins it and gives its result."""
    results: list[Any] = []

    def target() -> None:
        try:
            results.append(work())
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        if isinstance(results[0], BaseException):
            raise results[0]
        return results[0]

    return join


# -- replays ------------------------------------------------------------------------------------


def test_the_first_request_runs_and_a_retry_is_replayed_identically(store: Store) -> None:
    app = Orders()
    mw = middleware(app, store)
    first = serve(mw)
    assert first.status == "201 Created" and not first.replayed
    assert json.loads(first.body) == {"run": 1, "body": '{"item": 1}'}
    assert first.headers[: len(APP_HEADERS)] == APP_HEADERS  # the app's own, its Date too
    for _ in range(2):
        again = serve(mw)
        assert again.status == "201 Created"
        assert again.body == first.body
        # The app's spelling kept, Date dropped, the replay marked.
        assert again.headers == [h for h in first.headers if h[0] != "Date"] + [REPLAYED]
    assert app.runs == 1
    assert [body.closed for body in app.responses] == [1]


def test_the_app_reads_the_body_the_middleware_read() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore())
    environ = environ_of(body=b'{"item": 1}')
    server_input = environ["wsgi.input"]
    Server().serve(mw, environ)
    assert server_input.bytes_read == 11  # read once, by the middleware
    assert app.bodies == [b'{"item": 1}']
    assert app.environs[0]["wsgi.input"] is not server_input
    assert app.lengths == ["11"]


def test_a_chunked_body_the_server_ends_is_read_whole() -> None:
    # No Content-Length: the server (gunicorn, Werkzeug) ends the stream itself.
    app = Orders()
    mw = middleware(app, MemoryStore())
    body = b"x" * 100_000  # more than one read
    assert serve(mw, body=body, length=False, terminated=True).code == 201
    assert app.bodies == [body] and app.lengths == ["100000"]  # the app is given its length
    assert serve(mw, body=body, length=False, terminated=True).replayed
    (serve(mw, body=b"y", length=False, terminated=True)).problem(422, "key-reused")


def test_a_body_without_length_or_end_is_not_read() -> None:
    # PEP 3333: without CONTENT_LENGTH, reading wsgi.input may block forever.
    app = Orders()
    mw = middleware(app, MemoryStore())
    environ = environ_of(body=b"unreadable", length=False)
    server_input = environ["wsgi.input"]
    Server().serve(mw, environ)
    assert server_input.reads == 0
    assert app.bodies == [b""] and app.lengths == ["0"]


def test_a_client_that_leaves_while_sending_its_body_leaves_the_key_free() -> None:
    # gunicorn's wsgi.input returns what came before the connection closed, short.
    app = Orders()
    store = MemoryStore()
    mw = middleware(app, store)
    environ = environ_of(body=b'{"item":')
    environ["CONTENT_LENGTH"] = "11"
    try:
        Server().serve(mw, environ)
    except Exception:
        pass  # an error, or a 400: either way nothing may run
    assert app.runs == 0
    assert list(store.scan()) == []
    assert serve(mw).code == 201  # the retry, whole, runs: not 422
    assert app.bodies == [b'{"item": 1}']


def test_the_response_is_recorded_before_it_goes_out(store: Store) -> None:
    app = Orders()
    mw = middleware(app, store)
    server = Server()
    result = mw(environ_of(), server.start_response)
    # The client could get all of it and retry before the server is done sending it.
    assert serve(mw).replayed
    assert b"".join(result) == serve(mw).body
    getattr(result, "close", lambda: None)()
    assert app.runs == 1


def test_a_status_outside_recorded_statuses_releases_the_key(store: Store) -> None:
    app = Orders(status="503 Service Unavailable")
    mw = middleware(app, store, recorded_statuses=range(200, 500))
    assert serve(mw).code == 503
    assert serve(mw).code == 503
    assert app.runs == 2
    app.status = "200 OK"
    assert not serve(mw).replayed
    assert serve(mw).replayed
    assert app.runs == 3


# -- a request running elsewhere ----------------------------------------------------------------


def test_a_duplicate_of_a_running_request_gets_409_then_the_replay(store: Store) -> None:
    app = Orders(gate=True)
    mw = middleware(app, store)
    first = in_thread(lambda: serve(mw))
    assert app.entered.wait(TIMEOUT)
    busy = serve(mw)
    busy.problem(409, "in-progress")
    assert busy.header("retry-after") == "1"
    serve(mw, body=b'{"item": 2}').problem(422, "key-reused")
    app.release.set()
    done = first()
    assert done.code == 201 and not done.replayed
    again = serve(mw)
    assert again.replayed and again.body == done.body
    assert app.runs == 1


class Watched(MemoryStore):
    """Sets ``busy_seen`` when a read finds the key being processed (a duplicate waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_seen = threading.Event()

    def get(self, key: str) -> Entry | None:
        entry = super().get(key)
        if entry is not None and entry.status == "processing":
            self.busy_seen.set()
        return entry


def test_wait_gives_the_duplicate_the_replay_once_the_first_finishes() -> None:
    store = Watched()
    app = Orders(gate=True)
    mw = middleware(app, store, wait=30)
    first = in_thread(lambda: serve(mw))
    assert app.entered.wait(TIMEOUT)
    second = in_thread(lambda: serve(mw))
    assert store.busy_seen.wait(TIMEOUT)
    app.release.set()
    done, waited = first(), second()
    assert done.code == 201 and not done.replayed
    assert waited.code == 201 and waited.replayed and waited.body == done.body
    assert app.runs == 1


# -- 422 and 400 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        {"body": b'{"item": 2}'},
        {"path": "/orders/2"},
        {"query": "dry_run=1"},
        {"method": "PATCH"},
    ],
)
def test_the_same_key_with_another_request_is_422(other: dict[str, Any]) -> None:
    app = Orders()
    mw = middleware(app, MemoryStore())
    serve(mw)
    serve(mw, **other).problem(422, "key-reused")
    assert serve(mw).replayed
    assert app.runs == 1


@pytest.mark.parametrize(
    ("value", "slug"),
    [
        ("a, b", "key-repeated"),  # the header twice, folded by the server
        ("a,b", "key-repeated"),
        ('"a", "b"', "key-repeated"),
        ("", "key-invalid"),
        ('""', "key-invalid"),
        ("k" * 256, "key-invalid"),
        ("a b", "key-invalid"),
        ("caf\xc3\xa9", "key-invalid"),  # UTF-8 bytes as PEP 3333 hands them over
        ('"abc', "key-invalid"),
    ],
)
def test_a_bad_key_header_is_400_and_the_app_does_not_run(value: str, slug: str) -> None:
    app = Orders()
    mw = middleware(app, MemoryStore())
    environ = environ_of(key=value)
    Server().serve(mw, environ).problem(400, slug, key=None)
    assert app.runs == 0
    assert environ["wsgi.input"].reads == 0  # refused before its body was read


def test_a_missing_key_is_400_only_when_required() -> None:
    app = Orders()
    body = serve(middleware(app, MemoryStore(), required=True), key=None).problem(
        400, "key-missing", key=None
    )
    assert "Idempotency-Key" in body["detail"]
    assert app.runs == 0
    free = middleware(app, MemoryStore())
    assert serve(free, key=None).code == serve(free, key=None).code == 201
    assert app.runs == 2


def test_a_custom_header_holds_the_key() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), header="X-Request-Id", required=True)
    serve(mw).problem(400, "key-missing", key=None)
    assert not serve(mw, key=None, headers={"HTTP_X_REQUEST_ID": "r1"}).replayed
    assert serve(mw, key=None, headers={"HTTP_X_REQUEST_ID": "r1"}).replayed
    assert app.runs == 1


# -- 413 ----------------------------------------------------------------------------------------


def test_a_content_length_over_the_limit_is_413_unread() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), max_request_body=10)
    environ = environ_of(body=b"x" * 11)
    answer = Server().serve(mw, environ)
    assert "11 bytes" in answer.problem(413, "request-too-large")["detail"]
    assert environ["wsgi.input"].reads == 0
    assert app.runs == 0
    assert serve(mw, body=b"x" * 10).code == 201  # at the limit: it runs; the key was free


def test_a_chunked_body_past_the_limit_is_413_read_no_further() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), max_request_body=10)
    environ = environ_of(body=b"x" * 1000, length=False, terminated=True)
    Server().serve(mw, environ).problem(413, "request-too-large")
    assert environ["wsgi.input"].bytes_read <= 11
    assert app.runs == 0
    assert serve(mw, body=b"x" * 10, length=False, terminated=True).code == 201


# -- the app fails ------------------------------------------------------------------------------


def test_an_app_that_raises_halts_the_key_and_the_error_reaches_the_server(store: Store) -> None:
    runs: list[int] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        runs.append(1)
        start_response("200 OK", [])
        raise ValueError("the app failed")

    mw = middleware(app, store)
    with pytest.raises(ValueError, match="the app failed"):
        serve(mw)
    for _ in range(2):
        body = serve(mw).problem(500, "interrupted")
        assert "was interrupted and can't be recovered" in body["detail"]
    assert runs == [1]
    assert [entry.status for entry in store.scan()] == ["halted"]


@pytest.mark.parametrize("limit", [1000, 3], ids=["kept", "streamed-past-the-limit"])
def test_a_response_iterator_that_raises_halts_the_key(store: Store, limit: int) -> None:
    body = Body([b"12", b"34", b"56"], fails_at=2)
    mw = middleware(returns(body), store, max_response_body=limit)
    with pytest.raises(ValueError, match="the response failed midway"):
        serve(mw)
    assert body.closed == 1
    serve(mw).problem(500, "interrupted")
    assert [entry.status for entry in store.scan()] == ["halted"]


def test_a_response_closed_early_past_the_limit_halts_the_key(store: Store) -> None:
    # Past max_response_body the response streams; a server closes it when its client leaves.
    body = Body([b"1234", b"5678", b"9abc", b"def0"])
    mw = middleware(returns(body), store, max_response_body=6)
    served = Server().serve(mw, environ_of(), leave_after=2)
    assert served.body == b"12345678"
    assert body.closed == 1
    serve(mw).problem(500, "interrupted")
    assert [entry.status for entry in store.scan()] == ["halted"]


def test_an_app_that_never_calls_start_response_halts_the_key() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return [b"no status"]

    mw = middleware(app, MemoryStore())
    with pytest.raises(RuntimeError, match="without calling start_response"):
        serve(mw)
    serve(mw).problem(500, "interrupted")


@pytest.mark.parametrize("limit", [1000, 3], ids=["kept", "streamed-past-the-limit"])
def test_an_iterable_whose_close_raises_is_closed_once_and_halts_the_key(limit: int) -> None:
    body = Body([b"12", b"34"], close_fails=True)
    mw = middleware(returns(body), MemoryStore(), max_response_body=limit)
    with pytest.raises(RuntimeError, match="close failed"):
        serve(mw)
    assert body.closed == 1
    serve(mw).problem(500, "interrupted")


def test_a_streamed_response_closed_before_it_is_iterated_halts_the_key() -> None:
    body = Body([b"1234", b"5678"])
    store = MemoryStore()
    mw = middleware(returns(body), store, max_response_body=6)
    result = mw(environ_of(), Server().start_response)
    getattr(result, "close", lambda: None)()
    assert body.closed == 1
    assert [entry.status for entry in store.scan()] == ["halted"]


# -- close() is called once ---------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1000, 4, 5], ids=["kept", "over-the-limit", "at-the-limit"])
def test_the_apps_iterable_is_closed_once(store: Store, limit: int) -> None:
    body = Body([b"12", b"3", b"", b"45"])
    mw = middleware(returns(body), store, max_response_body=limit)
    assert serve(mw).body == b"12345"
    assert body.closed == 1 and body.iterated == 4


# -- responses: write(), over the limit ---------------------------------------------------------


def test_the_legacy_write_is_recorded_in_order(store: Store) -> None:
    runs: list[int] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        runs.append(1)
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        write(b"then ")
        return [b"iterated"]

    mw = middleware(app, store)
    first = serve(mw)
    assert first.body == b"written then iterated"
    again = serve(mw)
    assert again.replayed and again.body == first.body and runs == [1]


def test_a_generator_app_that_starts_its_response_when_iterated_is_recorded() -> None:
    # start_response may be called at the iterable's first step (PEP 3333): a generator app.
    runs: list[int] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        runs.append(1)
        start_response("202 Accepted", [("Content-Type", "text/plain")])
        yield b"queued "
        yield b"job 7"

    mw = middleware(app, MemoryStore())
    first = serve(mw)
    assert (first.status, first.body) == ("202 Accepted", b"queued job 7")
    again = serve(mw)
    assert again.replayed and (again.status, again.body) == (first.status, first.body)
    assert runs == [1]


def test_the_legacy_write_is_not_buffered_past_the_limit() -> None:
    server = Server()
    held_back: list[int] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(100):
            write(b"x" * 100)
            held_back.append(100 * (i + 1) - sum(map(len, server.delivered)))
        return []

    mw = middleware(app, MemoryStore(), max_response_body=1000)
    assert len(server.serve(mw, environ_of()).body) == 10_000
    assert max(held_back) <= 1000 + 100


def test_an_error_page_chosen_before_anything_was_sent_replaces_the_response() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        try:
            raise LookupError("not found after all")
        except LookupError:
            start_response("404 Not Found", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"error page"]

    mw = middleware(app, MemoryStore())
    first = serve(mw)
    assert (first.status, first.body) == ("404 Not Found", b"error page")
    assert serve(mw).replayed


def test_a_response_over_max_response_body_reaches_its_client_once(store: Store) -> None:
    runs: list[Body] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        runs.append(Body([b"12345", b"67890", b"a"]))
        return runs[-1]

    mw = middleware(app, store, max_response_body=10)
    first = serve(mw)
    assert first.code == 200 and first.body == b"1234567890a"
    for _ in range(2):
        body = serve(mw).problem(500, "response-not-recorded")
        assert "too large to record" in body["detail"]
    assert len(runs) == 1 and runs[0].closed == 1


# -- what is not guarded passes through untouched -----------------------------------------------


def test_what_is_not_guarded_reaches_the_app_as_the_server_sent_it() -> None:
    calls: list[tuple[Any, Any, Any]] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        result = Body([b"x"])
        calls.append((environ, start_response, result))
        start_response("200 OK", [])
        return result

    mw = middleware(app, MemoryStore(), methods=("POST",))
    for environ in [environ_of(method="GET"), environ_of(method="PATCH"), environ_of(key=None)]:
        before = dict(environ)
        server = Server()
        result = mw(environ, server.start_response)
        got_environ, got_start_response, returned = calls[-1]
        assert got_environ is environ and environ == before
        assert got_start_response == server.start_response
        assert result is returned
    assert len(calls) == 3


# -- scope, deadline, fingerprint, the store ----------------------------------------------------


def test_tenants_never_share_a_key() -> None:
    app = Orders()
    mw = middleware(app, MemoryStore(), scope=lambda r: r.headers.get("x-tenant"))
    a = serve(mw, headers={"HTTP_X_TENANT": "a"}, body=b'"a"')
    b = serve(mw, headers={"HTTP_X_TENANT": "b"}, body=b'"b"')
    assert not a.replayed and not b.replayed and app.runs == 2
    assert serve(mw, headers={"HTTP_X_TENANT": "a"}, body=b'"a"').body == a.body
    assert serve(mw, headers={"HTTP_X_TENANT": "b"}, body=b'"b"').body == b.body
    assert not serve(mw, body=b'"none"').replayed
    assert app.runs == 3


def test_the_callables_get_the_request_read_before_the_app_runs() -> None:
    seen: list[Request] = []

    def tenant(request: Request) -> str:
        seen.append(request)
        return "t"

    app = Orders()
    mw = middleware(app, MemoryStore(), scope=tenant)
    environ = environ_of(
        path="/caf\xc3\xa9",  # PEP 3333: the raw UTF-8 bytes, as latin-1 text
        query="a=1&b=%20",
        body=b"payload",
        headers={"SCRIPT_NAME": "/api", "HTTP_X_API_KEY": "secret"},
    )
    Server().serve(mw, environ)
    (request,) = seen
    assert (request.method, request.path, request.query) == ("POST", "/api/café", "a=1&b=%20")
    assert request.headers["X-Api-Key"] == "secret"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == "k1"
    assert request.body == b"payload"
    assert request.raw is environ


def test_a_request_past_its_deadline_with_no_record_is_refused() -> None:
    def deadline(request: Request) -> datetime | None:
        given = request.headers.get("x-deadline")
        return None if given is None else datetime.fromisoformat(given)

    app = Orders()
    store = MemoryStore()
    mw = middleware(app, store, deadline=deadline)
    past = {"HTTP_X_DEADLINE": (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()}
    serve(mw, headers=past).problem(400, "request-expired")
    assert app.runs == 0 and list(store.scan()) == []
    assert not serve(mw).replayed
    assert serve(mw, headers=past).replayed  # a record is replayed after the deadline too
    assert app.runs == 1


def test_a_fingerprint_callable_says_what_must_match() -> None:
    by_query = Orders()
    mw = middleware(by_query, MemoryStore(), fingerprint=lambda r: r.query)
    serve(mw, query="v=1", body=b"1")
    assert serve(mw, query="v=1", body=b"2", path="/other").replayed
    serve(mw, query="v=2", body=b"1").problem(422, "key-reused")
    assert by_query.runs == 1

    by_bytes = Orders()
    mw = middleware(by_bytes, MemoryStore(), fingerprint=lambda r: r.body[:1])
    serve(mw, body=b"a1")
    assert serve(mw, body=b"a2").replayed
    serve(mw, body=b"b1").problem(422, "key-reused")
    assert by_bytes.runs == 1

    anything = Orders()
    mw = middleware(anything, MemoryStore(), fingerprint=lambda r: "")
    serve(mw, body=b"1")
    assert serve(mw, body=b"2", method="PATCH").replayed
    assert anything.runs == 1


class Unreachable(MemoryStore):
    def get(self, key: str) -> Entry | None:
        raise StoreError("the store is down", key=key)

    def claim(self, entry: Entry) -> Entry | None:
        raise StoreError("the store is down", key=entry.key)


def test_a_failing_store_is_503_and_the_app_does_not_run() -> None:
    app = Orders()
    answer = serve(middleware(app, Unreachable()))
    answer.problem(503, "store-unavailable")
    assert answer.header("retry-after") == "1"
    assert app.runs == 0


class WontRecord(MemoryStore):
    def swap(self, key: str, token: str, entry: Entry) -> bool:
        raise StoreError("the store is down", key=key)


def test_a_store_failing_to_record_still_sends_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Orders()
    mw = middleware(app, WontRecord())
    assert serve(mw).code == 201
    serve(mw).problem(409, "in-progress")  # processing as far as the store knows
    assert app.runs == 1
    assert "was sent but could not be recorded" in caplog.text


def test_options_are_checked_when_the_middleware_is_made() -> None:
    with pytest.raises(TypeError, match=r"^idemfn\.wsgi\.IdempotencyMiddleware: recorded_statuses"):
        IdempotencyMiddleware(Orders(), store=MemoryStore(), recorded_statuses=200)
    with pytest.raises(TypeError, match="must be a WSGI app"):
        IdempotencyMiddleware(None, store=MemoryStore())  # type: ignore[arg-type]


# -- Flask, through its test client -------------------------------------------------------------


def flask_app(store: Store, **options: Any) -> tuple[Flask, list[str]]:
    app = Flask(__name__)
    runs: list[str] = []

    @app.post("/orders")
    def create() -> Any:
        data = request.get_json()
        runs.append(f"order {data['item']}")
        if data["item"] == 404:
            abort(404)
        return {"run": len(runs), **data}, 201

    @app.post("/stream")
    def stream() -> Any:
        runs.append("stream")

        @stream_with_context
        def parts() -> Iterator[bytes]:
            for i in range(4):
                yield f"part {i};".encode()

        return app.response_class(parts(), mimetype="text/plain")

    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store=store, **options)  # type: ignore[method-assign]
    return app, runs


def test_flask_replays_and_refuses_a_reused_key() -> None:
    app, runs = flask_app(MemoryStore())
    client = app.test_client()
    first = client.post("/orders", json={"item": 1}, headers={"Idempotency-Key": "f1"})
    assert first.status_code == 201 and first.json == {"run": 1, "item": 1}
    again = client.post("/orders", json={"item": 1}, headers={"Idempotency-Key": "f1"})
    assert again.data == first.data and again.headers["Idempotent-Replayed"] == "true"
    reused = client.post("/orders", json={"item": 2}, headers={"Idempotency-Key": "f1"})
    assert reused.status_code == 422 and reused.mimetype == "application/problem+json"
    missing = client.post("/orders", json={"item": 404}, headers={"Idempotency-Key": "f2"})
    assert missing.status_code == 404
    again = client.post("/orders", json={"item": 404}, headers={"Idempotency-Key": "f2"})
    assert again.status_code == 404 and again.headers["Idempotent-Replayed"] == "true"
    assert runs == ["order 1", "order 404"]


def test_flask_streams_past_the_limit_and_records_it_as_not_kept() -> None:
    app, runs = flask_app(MemoryStore(), max_response_body=10)
    client = app.test_client()
    first = client.post("/stream", headers={"Idempotency-Key": "s1"})
    assert first.data == b"part 0;part 1;part 2;part 3;"
    later = client.post("/stream", headers={"Idempotency-Key": "s1"})
    assert later.status_code == 500
    assert later.json is not None and later.json["type"] == PROBLEMS + "response-not-recorded"
    # Under the limit: recorded whole and replayed.
    app, runs = flask_app(MemoryStore())
    client = app.test_client()
    first = client.post("/stream", headers={"Idempotency-Key": "s1"})
    again = client.post("/stream", headers={"Idempotency-Key": "s1"})
    assert again.data == first.data and again.headers["Idempotent-Replayed"] == "true"
    assert runs == ["stream"]


def test_a_response_over_the_limit_is_recorded_before_its_last_chunk_goes_out() -> None:
    # A client that has its whole (oversized) response may retry at once: the record must be
    # there by then (500 response-not-recorded), never 409, as for a response under the limit.
    runs: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        runs.append(1)
        start_response("200 OK", [("Content-Length", "20")])
        return iter([b"0123456789", b"abcdefghij"])

    mw = middleware(app, MemoryStore(), max_response_body=15)
    result = mw(environ_of(), Server().start_response)
    chunks = iter(result)
    assert next(chunks) == b"0123456789"
    assert next(chunks) == b"abcdefghij"  # the whole body is out: the client may retry now
    retry = serve(mw)
    assert retry.code == 500 and b"#response-not-recorded" in retry.body
    assert list(chunks) == []
    getattr(result, "close", lambda: None)()
    assert runs == [1]
