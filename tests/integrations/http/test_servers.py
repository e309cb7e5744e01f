"""The HTTP middlewares behind real servers, over real sockets: every row of the semantics table.

Each deployment is a real server process serving one of the test apps of
``tests/support/http_apps`` with idemfn's middleware: uvicorn with 2 workers serving the
Starlette app (``idemfn.asgi``), gunicorn with 3 sync workers serving the Flask app
(``idemfn.wsgi``) and the Django project (``idemfn.django``), each on a DiskStore shared by its
workers, on the suite's redis-server and on its PostgreSQL cluster; uvicorn with 2 workers
serving the FastAPI app and the Django project's ASGI application (Django's async path), on a
DiskStore. The memory store is served by uvicorn with one worker only: a MemoryStore lives in
one process, so it is right only where one process serves every request.

One server per deployment serves every test of this module (a module-scoped fixture, its
tests kept on one xdist worker by an ``xdist_group`` of their own); each test uses keys of its
own. Handlers append a line per run to a file outside the store, which is how runs are counted.
Requests go over real sockets with httpx.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.http_apps.shared import HOP_HEADERS, big, chunks
from tests.support.http_checks import assert_first, assert_problem, assert_replay, new_key
from tests.support.http_servers import Deployment, Served, serve, store_location
from tests.support.workers import poll

LIMIT = 65536  # max_request_body and max_response_body of these servers
OPTIONS = (
    ("scope_header", "x-api-key"),
    ("deadline_header", "x-deadline"),
    ("max_request_body", LIMIT),
    ("max_response_body", LIMIT),
)
DEPLOYMENTS = [
    *(
        Deployment(server, app, workers, store, OPTIONS)
        for server, app, workers in [
            ("uvicorn", "starlette", 2),
            ("gunicorn", "flask", 3),
            ("gunicorn", "django", 3),
        ]
        for store in ("disk", "redis", "postgres")
    ),
    # FastAPI is Starlette underneath (the same middleware stack and ASGI path): the stores are
    # Starlette's to cover, and each server start costs a second or two.
    Deployment("uvicorn", "fastapi", 2, "disk", OPTIONS),
    Deployment("uvicorn", "django-asgi", 2, "disk", OPTIONS),
    Deployment("uvicorn", "starlette", 1, "memory", OPTIONS),
]
# Flask and Django turn a view's exception into their own 500 response before the middleware
# sees it; Starlette and FastAPI let it through to the middleware (docs/http/index.md).
FRAMEWORK_500 = {"flask", "django", "django-asgi"}


@pytest.fixture(
    scope="module",
    params=[
        # One xdist group per deployment: its tests run on one worker, one server for them all.
        pytest.param(d, id=d.id, marks=pytest.mark.xdist_group(f"http-{d.id}"))
        for d in DEPLOYMENTS
    ],
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    deployment: Deployment = request.param
    directory = tmp_path_factory.mktemp(deployment.id)
    with serve(deployment, directory, store_location(deployment.store, directory, request)) as s:
        yield s


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


def keyed(key: str, **more: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **more}


def test_uncovered_methods_and_requests_without_a_key_pass_through(
    served: Served, client: httpx.Client
) -> None:
    # GET is not covered: not even a key that would be refused is looked at.
    for value in ("", new_key()):
        response = client.get("/health", headers={"Idempotency-Key": value})
        assert response.status_code == 200 and response.text == "ok"
        assert "idempotent-replayed" not in response.headers
    first = client.post("/orders", json={"sku": "mug"})
    second = client.post("/orders", json={"sku": "mug"})
    assert_first(first, 201)
    assert_first(second, 201)
    assert first.json()["order"] != second.json()["order"]  # both ran


def test_a_replay_is_the_recorded_response_byte_for_byte(
    served: Served, client: httpx.Client
) -> None:
    key = new_key()  # a UUID as a bare token: the form Stripe's clients send
    first = client.post("/orders", json={"sku": "mug"}, headers=keyed(key))
    assert_first(first, 201)
    assert first.json()["body"] == {"sku": "mug"}
    assert first.headers["x-order"] == str(first.json()["order"])
    assert first.headers.get_list("set-cookie")  # recorded and replayed like any header
    for _ in range(2):
        assert_replay(first, client.post("/orders", json={"sku": "mug"}, headers=keyed(key)))
    assert len(served.runs(key)) == 1


def test_date_and_hop_by_hop_headers_are_never_replayed(
    served: Served, client: httpx.Client
) -> None:
    key = new_key()
    first = client.post("/hop", headers=keyed(key))
    assert first.status_code == 200 and first.text == "hop\n"
    # The first response is the server's business: uvicorn sends the app's Date beside its own,
    # gunicorn drops the app's; both pass the app's headers to the middleware.
    replay = client.post("/hop", headers=keyed(key))
    assert replay.status_code == 200 and replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    dates = replay.headers.get_list("date")
    assert len(dates) == 1 and dates[0] != HOP_HEADERS["Date"], replay.headers  # the server's
    assert HOP_HEADERS["Keep-Alive"] not in replay.headers.get_list("keep-alive"), replay.headers
    assert len(served.runs(key)) == 1


def test_a_quoted_key_and_a_bare_key_are_one_key(served: Served, client: httpx.Client) -> None:
    key = new_key()
    first = client.post("/orders", json={}, headers=keyed(f'"{key}"'))  # the draft's sf-string
    assert_first(first, 201)
    assert_replay(first, client.post("/orders", json={}, headers=keyed(key)))
    assert_replay(first, client.post("/orders", json={}, headers=keyed(f'"{key}";a=1')))


def test_the_longest_key_is_accepted(served: Served, client: httpx.Client) -> None:
    key = new_key().ljust(255, "x")  # max_key_length's default
    first = client.post("/orders", json={}, headers=keyed(key))
    assert_first(first, 201)
    assert_replay(first, client.post("/orders", json={}, headers=keyed(key)))


def test_the_same_key_with_another_request_is_422(served: Served, client: httpx.Client) -> None:
    key = new_key()
    first = client.post("/orders", json={"sku": "mug"}, headers=keyed(key))
    assert_first(first, 201)
    for method, path, body in [
        ("POST", "/orders", {"sku": "cup"}),  # another body
        ("POST", "/orders?express=1", {"sku": "mug"}),  # another query
        ("POST", "/status/201", {"sku": "mug"}),  # another path
        ("PATCH", "/orders", {"sku": "mug"}),  # another method
    ]:
        response = client.request(method, path, json=body, headers=keyed(key))
        assert_problem(response, 422, "key-reused", key)
    assert len(served.runs(key)) == 1
    assert_replay(first, client.post("/orders", json={"sku": "mug"}, headers=keyed(key)))


TOO_LONG = "k" * 256


@pytest.mark.parametrize(
    ("values", "slug"),
    [
        pytest.param(["k-1", "k-2"], "key-repeated", id="twice"),
        pytest.param(["k-1", "k-1"], "key-repeated", id="twice-the-same"),
        pytest.param(["k-1, k-2"], "key-repeated", id="folded"),
        pytest.param(['"k-1", "k-2"'], "key-repeated", id="folded-strings"),
        pytest.param([""], "key-invalid", id="empty"),
        pytest.param(['""'], "key-invalid", id="empty-string"),
        pytest.param([TOO_LONG], "key-invalid", id="too-long"),
        pytest.param([f'"{TOO_LONG}"'], "key-invalid", id="too-long-string"),
        pytest.param(["k 1"], "key-invalid", id="space"),
        pytest.param(['"k-1'], "key-invalid", id="unclosed-quote"),
    ],
)
def test_a_bad_key_header_is_400_and_nothing_runs(
    served: Served, client: httpx.Client, values: list[str], slug: str
) -> None:
    runs = len(served.lines())
    headers = [("Idempotency-Key", value) for value in values]
    response = client.post("/orders", json={"sku": "mug"}, headers=headers)
    assert_problem(response, 400, slug)
    assert len(served.lines()) == runs


def _chunked(size: int) -> Iterator[bytes]:
    # A generator: httpx sends it with Transfer-Encoding: chunked, no Content-Length.
    while size > 0:
        part = min(size, 16384)
        yield b"x" * part
        size -= part


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_request_body_over_the_limit_is_413_and_leaves_the_key_new(
    served: Served, client: httpx.Client, framing: str
) -> None:
    if framing == "chunked" and served.deployment.app == "django":
        pytest.skip(
            "Django under WSGI reads only CONTENT_LENGTH bytes of a request: a chunked body"
            " reaches neither its middleware nor its view"
        )
    key = new_key()

    def body(size: int) -> Any:
        return b"x" * size if framing == "content-length" else _chunked(size)

    # The server closes the connection after it (the body was not read to its end): not one
    # to reuse for the next request.
    too_large = client.post(
        "/orders", content=body(LIMIT + 1), headers=keyed(key, Connection="close")
    )
    problem = assert_problem(too_large, 413, "request-too-large")
    assert served.runs(key) == []
    # Nothing was recorded: the key is new, and a body of the limit runs.
    first = client.post("/orders", content=body(LIMIT), headers=keyed(key))
    assert_first(first, 201)
    assert first.json()["body"] == {"length": LIMIT}
    assert_replay(first, client.post("/orders", content=body(LIMIT), headers=keyed(key)))
    assert len(served.runs(key)) == 1
    assert key in problem["detail"], problem  # as every problem about a key names it


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/big?size=65536", big(LIMIT), id="big"),
        pytest.param("/stream?chunks=8&size=8192", b"".join(chunks(8, 8192)), id="stream"),
        pytest.param("/stream?chunks=3", b"".join(chunks(3, 64)), id="small-stream"),
    ],
)
def test_a_response_up_to_the_limit_is_replayed(
    served: Served, client: httpx.Client, path: str, expected: bytes
) -> None:
    key = new_key()
    first = client.post(path, headers=keyed(key))
    assert_first(first, 200)
    assert first.content == expected
    assert_replay(first, client.post(path, headers=keyed(key)))
    assert len(served.runs(key)) == 1


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/big?size=65537", big(LIMIT + 1), id="big"),
        pytest.param("/stream?chunks=10&size=8000", b"".join(chunks(10, 8000)), id="stream"),
    ],
)
def test_a_response_over_the_limit_reaches_its_client_and_never_runs_again(
    served: Served, client: httpx.Client, path: str, expected: bytes
) -> None:
    key = new_key()
    first = client.post(path, headers=keyed(key))
    assert_first(first, 200)
    assert first.content == expected  # whole, though not kept
    for _ in range(2):
        later = client.post(path, headers=keyed(key))
        assert_problem(later, 500, "response-not-recorded", key)
    assert len(served.runs(key)) == 1


@pytest.mark.parametrize("status", [202, 418, 503])
def test_every_status_is_recorded_by_default(
    served: Served, client: httpx.Client, status: int
) -> None:
    key = new_key()
    first = client.post(f"/status/{status}", headers=keyed(key))
    assert_first(first, status)
    assert first.text == f"status {status}\n"
    assert_replay(first, client.post(f"/status/{status}", headers=keyed(key)))
    assert len(served.runs(key)) == 1


def test_a_failing_handler_never_runs_twice(served: Served, client: httpx.Client) -> None:
    key = new_key()
    # uvicorn closes the connection after an app's exception: not one to reuse.
    first = client.post("/fail", headers=keyed(key, Connection="close"))
    assert first.status_code == 500
    if served.deployment.app in FRAMEWORK_500:
        # Flask and Django answer the view's exception with their own 500 page inside the app:
        # the middleware gets a response, records it and replays it (docs/http/index.md).
        assert "idempotent-replayed" not in first.headers
        for _ in range(2):
            assert_replay(first, client.post("/fail", headers=keyed(key)))
    else:
        # Starlette's exception reaches the middleware, which halts the key; the first client
        # gets Starlette's own 500 (its ServerErrorMiddleware is outside the middleware).
        assert first.text == "Internal Server Error"
        for _ in range(2):
            later = client.post("/fail", headers=keyed(key))
            body = assert_problem(later, 500, "interrupted", key)
            assert "was interrupted and can't be recovered" in body["detail"]
    assert len(served.runs(key)) == 1


def test_scopes_are_key_spaces_of_their_own(served: Served, client: httpx.Client) -> None:
    key = new_key()
    firsts = {}
    for tenant in ("alice", "bob", None):
        headers = keyed(key) if tenant is None else keyed(key, **{"X-Api-Key": tenant})
        firsts[tenant] = client.post("/orders", json={"sku": "mug"}, headers=headers)
        assert_first(firsts[tenant], 201)
    for tenant, first in firsts.items():
        headers = keyed(key) if tenant is None else keyed(key, **{"X-Api-Key": tenant})
        assert_replay(first, client.post("/orders", json={"sku": "mug"}, headers=headers))
    assert sorted(run["scope"] or "" for run in served.runs(key)) == ["", "alice", "bob"]
    # The same key with another body is refused in one scope, and is new in another.
    reused = client.post(
        "/orders", json={"sku": "cup"}, headers=keyed(key, **{"X-Api-Key": "alice"})
    )
    assert_problem(reused, 422, "key-reused", key)
    fresh = client.post(
        "/orders", json={"sku": "cup"}, headers=keyed(key, **{"X-Api-Key": "carol"})
    )
    assert_first(fresh, 201)


def test_a_request_past_its_deadline_never_runs_but_a_finished_one_is_replayed(
    served: Served, client: httpx.Client
) -> None:
    key = new_key()
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    late = client.post("/orders", json={}, headers=keyed(key, **{"X-Deadline": past}))
    assert_problem(late, 400, "request-expired", key)
    assert served.runs(key) == []
    first = client.post("/orders", json={}, headers=keyed(key, **{"X-Deadline": future}))
    assert_first(first, 201)
    replay = client.post("/orders", json={}, headers=keyed(key, **{"X-Deadline": past}))
    assert_replay(first, replay)
    assert len(served.runs(key)) == 1


async def _burst(served: Served, count: int, path: str, key: str) -> list[httpx.Response]:
    async with served.aclient() as client:
        return list(
            await asyncio.gather(
                *(client.post(path, json={"sku": "mug"}, headers=keyed(key)) for _ in range(count))
            )
        )


@pytest.mark.slow
def test_50_concurrent_requests_with_one_key_run_the_handler_once(served: Served) -> None:
    key = new_key()
    responses = asyncio.run(_burst(served, 50, "/orders", key))
    assert len(served.runs(key)) == 1
    ran = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(ran) == 1, [r.status_code for r in responses]
    for response in responses:
        if response.status_code == 409:  # the first was running: no wait= on these servers
            assert_problem(response, 409, "in-progress", key)
        elif response is not ran[0]:
            assert_replay(ran[0], response)
    with served.client() as client:
        assert_replay(ran[0], client.post("/orders", json={"sku": "mug"}, headers=keyed(key)))
    assert len(served.runs(key)) == 1


@pytest.mark.slow
def test_duplicates_of_a_running_request_get_409_then_its_replay(served: Served) -> None:
    key = new_key()
    with ThreadPoolExecutor(1) as pool, served.client() as client:
        with served.holding():
            held = pool.submit(
                client.post, "/orders?hold=1", json={"sku": "mug"}, headers=keyed(key)
            )
            served.wait_run(key)
            # 49 duplicates while the first is running, across the workers: none runs.
            duplicates = asyncio.run(_burst(served, 49, "/orders?hold=1", key))
            for response in duplicates:
                assert_problem(response, 409, "in-progress", key)
            assert len(served.runs(key)) == 1
        first = held.result(timeout=60)
        assert_first(first, 201)
        replay = client.post("/orders?hold=1", json={"sku": "mug"}, headers=keyed(key))
        assert_replay(first, replay)
    assert len(served.runs(key)) == 1


def _state(pid: int) -> str:
    """A process's state as /proc tells it, with PF_EXITING (being torn down after SIGKILL)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):  # (reaped before, or as, it was read)
        return "gone from /proc"
    exiting = ", PF_EXITING" if int(fields[6]) & 0x4 else ""
    return f"in state {fields[0]}{exiting}"


@pytest.mark.slow
def test_a_worker_killed_mid_request_halts_the_key(served: Served) -> None:
    if served.deployment.workers == 1:
        pytest.skip("one process serves: killing it takes the server (and a memory store) down")
    key = new_key()
    with ThreadPoolExecutor(1) as pool, served.client() as client:
        with served.holding():
            held = pool.submit(
                client.post, "/orders?hold=1", json={"sku": "mug"}, headers=keyed(key)
            )
            pid = served.wait_run(key)["pid"]
            served.server.kill_worker(pid)
            with pytest.raises(httpx.TransportError):  # the connection died with the worker
                held.result(timeout=60)
        for _ in range(2):  # another worker finds the dead one's claim at once: same machine
            before = _state(pid)
            retry = client.post("/orders?hold=1", json={"sku": "mug"}, headers=keyed(key))
            assert retry.status_code != 409, (
                f"409: the killed worker {pid} was {before} before the retry, {_state(pid)} after"
            )
            body = assert_problem(retry, 500, "interrupted", key)
            assert "was interrupted and can't be recovered" in body["detail"]
    assert len(served.runs(key)) == 1
    served.server.wait_workers(without=pid)  # the next tests get every worker again


def _raw_post(served: Served, target: str, key: str, body: bytes) -> socket.socket:
    """A request sent on a socket of its own, whose response is never read."""
    host, port = served.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


@pytest.mark.slow
def test_a_client_that_disconnects_gets_the_response_on_its_retry(served: Served) -> None:
    key = new_key()
    # Django's ASGI handler (5.0+) cancels the request when its client disconnects: the
    # middleware is cut off mid-request and halts the key (docs/http/index.md), which the
    # retry sees while the handler is still held. Nothing stops the others' handlers: they run
    # to their end and their response is recorded for the retry.
    cancels = served.deployment.app == "django-asgi"
    with served.client() as client:

        def retry() -> httpx.Response | None:  # None while the key is running
            response = client.post("/orders?hold=1", content=b'{"sku": "mug"}', headers=keyed(key))
            return None if response.status_code == 409 else response

        with served.holding():
            sock = _raw_post(served, "/orders?hold=1", key, b'{"sku": "mug"}')
            served.wait_run(key)
            sock.close()  # the client leaves while the handler runs
            if cancels:
                response = poll(retry, "the cancelled request's key to be halted")
                body = assert_problem(response, 500, "interrupted", key)
                assert "was interrupted and can't be recovered" in body["detail"]
        if not cancels:
            response = poll(retry, "the disconnected request's response to be recorded")
            assert response.status_code == 201, response.text
            assert response.headers.get("idempotent-replayed") == "true"
            assert response.json()["body"] == {"sku": "mug"}
    assert len(served.runs(key)) == 1
