"""The HTTP middlewares' options that change what a request gets, behind real servers:
``required=True``, ``recorded_statuses=`` (a status left out releases the key) and ``wait=``
(a duplicate waits for the running request and gets its replay instead of 409).

The same deployments as test_servers.py (uvicorn with 2 workers serving Starlette, FastAPI and
the Django project's ASGI app; gunicorn with 3 sync workers serving Flask and the Django
project), with these options, on a DiskStore shared by the workers only: what these options do
is decided above the store, whose part every store's tests in test_servers.py cover.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Event
from typing import Any

import httpx
import pytest

from tests.support.http_checks import assert_first, assert_problem, assert_replay, new_key
from tests.support.http_servers import Deployment, Served, serve, store_location

WAIT = 60.0  # generous: a waiting duplicate must outlast the held request on a busy machine
OPTIONS = (
    ("required", True),
    ("recorded_statuses", list(range(200, 500))),  # 5xx releases the key: a retry runs again
    ("wait", WAIT),
)
DEPLOYMENTS = [
    Deployment(server, app, workers, "disk", OPTIONS)
    for server, app, workers in [
        ("uvicorn", "starlette", 2),
        ("uvicorn", "fastapi", 2),
        ("uvicorn", "django-asgi", 2),
        ("gunicorn", "flask", 3),
        ("gunicorn", "django", 3),
    ]
]
FRAMEWORK_500 = {"flask", "django", "django-asgi"}  # as in test_servers.py


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(d, id=d.id, marks=pytest.mark.xdist_group(f"http-options-{d.id}"))
        for d in DEPLOYMENTS
    ],
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    deployment: Deployment = request.param
    directory = tmp_path_factory.mktemp(f"options-{deployment.id}")
    with serve(deployment, directory, store_location(deployment.store, directory, request)) as s:
        yield s


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def test_a_request_without_a_key_is_400_when_keys_are_required(
    served: Served, client: httpx.Client
) -> None:
    runs = len(served.lines())
    assert_problem(client.post("/orders", json={"sku": "mug"}), 400, "key-missing")
    assert_problem(client.patch("/orders", json={"sku": "mug"}), 400, "key-missing")
    assert len(served.lines()) == runs
    # Methods that are not covered still pass through without one.
    health = client.get("/health")
    assert health.status_code == 200 and health.text == "ok"


@pytest.mark.parametrize("status", [500, 503])
def test_a_status_left_out_releases_the_key_and_a_retry_runs_again(
    served: Served, client: httpx.Client, status: int
) -> None:
    key = new_key()
    for run in (1, 2):
        response = client.post(f"/status/{status}", headers=keyed(key))
        assert_first(response, status)
        assert len(served.runs(key)) == run


def test_a_recorded_status_is_replayed(served: Served, client: httpx.Client) -> None:
    key = new_key()
    first = client.post("/status/499", headers=keyed(key))
    assert_first(first, 499)
    assert_replay(first, client.post("/status/499", headers=keyed(key)))
    assert len(served.runs(key)) == 1


def test_a_failing_handler_with_500_left_out(served: Served, client: httpx.Client) -> None:
    key = new_key()
    first = client.post("/fail", headers={**keyed(key), "Connection": "close"})
    assert_first(first, 500)
    if served.deployment.app in FRAMEWORK_500:
        # Flask's and Django's 500 page is a response like any: 500 is not recorded, the key
        # is released, and the retry runs the view again (docs/http/index.md).
        assert_first(client.post("/fail", headers={**keyed(key), "Connection": "close"}), 500)
        assert len(served.runs(key)) == 2
    else:
        # Starlette's exception reaches the middleware: the key is halted whatever the
        # recorded statuses, since the handler may have done part of its work.
        later = client.post("/fail", headers=keyed(key))
        assert_problem(later, 500, "interrupted", key)
        assert len(served.runs(key)) == 1


@pytest.mark.slow
def test_a_duplicate_waits_for_the_running_request_and_gets_its_replay(served: Served) -> None:
    key = new_key()
    sent = Event()

    def trace(event: str, info: dict[str, Any]) -> None:
        # The duplicate's request is on the wire: from here on, it is the server's.
        if event == "http11.receive_response_headers.started":
            sent.set()

    with ThreadPoolExecutor(2) as pool, served.client() as one, served.client() as another:
        with served.holding():
            held = pool.submit(one.post, "/orders?hold=1", json={"sku": "mug"}, headers=keyed(key))
            served.wait_run(key)
            duplicate = pool.submit(
                another.post,
                "/orders?hold=1",
                json={"sku": "mug"},
                headers=keyed(key),
                extensions={"trace": trace},
            )
            assert sent.wait(timeout=60)
        first = held.result(timeout=60)
        assert_first(first, 201)
        assert_replay(first, duplicate.result(timeout=WAIT + 30))
    assert len(served.runs(key)) == 1
