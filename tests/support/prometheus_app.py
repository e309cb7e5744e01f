"""A WSGI app that counts idemfn's decisions in Prometheus from every gunicorn worker, and the
gunicorn configuration that serves it in prometheus-client's multiprocess mode.

``gunicorn --config python:tests.support.prometheus_app 'tests.support.prometheus_app:create()'``
with ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory), ``IDEMFN_STORE``,
``IDEMFN_TEST_EFFECTS`` and ``IDEMFN_TEST_RELEASE`` in the environment
(``tests/support/http_apps/shared.py``). The routes:

- ``GET /health``, ``GET /metrics`` (every worker's metrics: ``multiprocess_registry()``);
- ``POST /orders`` through ``idemfn.wsgi.IdempotencyMiddleware`` (``?hold=1`` waits for the
  release file), appending its effect line first;
- ``POST /charge?order=O``: the decorated ``charge(order)``.

Every response carries ``X-Worker-Pid``, the worker that served it (added outside the
middleware, so a replay says who replayed it, not who ran the body).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from idemfn import idempotent

from .http_apps import shared

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


# gunicorn's server hook (this module is also its configuration): prometheus-client's own
# advice; it removes the dead worker's live-gauge files (idemfn makes no gauge, so its counts,
# in counter and histogram files, stay, as a counter's must).
def child_exit(server: object, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    print(f"child_exit: marked worker {worker.pid} dead", file=sys.stderr, flush=True)


@idempotent(name="charge")
def charge(order: str) -> dict[str, Any]:
    return {"order": order, "charged_by": os.getpid()}


def _json(start_response: StartResponse, status: str, body: object) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json")])
    return [data]


def _orders(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    key = environ.get("HTTP_IDEMPOTENCY_KEY")
    count = shared.effect(key, None, environ["PATH_INFO"])
    if parse_qs(environ.get("QUERY_STRING", "")).get("hold") == ["1"]:
        shared.hold()
    return _json(start_response, "201 Created", {"count": count, "ran_in": os.getpid()})


def create() -> WSGIApp:
    """The app, in each worker: instruments the default registry, serves the multiprocess
    registry's scrape."""
    from prometheus_client import make_wsgi_app

    from idemfn.prometheus import instrument, multiprocess_registry
    from idemfn.wsgi import IdempotencyMiddleware

    instrument()
    print(f"instrumented in process {os.getpid()}", file=sys.stderr, flush=True)
    metrics = make_wsgi_app(multiprocess_registry())
    orders = IdempotencyMiddleware(_orders)

    def route(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/metrics":
            scrape: Iterable[bytes] = metrics(environ, start_response)
            return scrape
        if path == "/health":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        if path == "/charge":
            order = parse_qs(environ.get("QUERY_STRING", ""))["order"][0]
            return _json(start_response, "200 OK", charge(order))
        return orders(environ, start_response)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def start(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            headers = [*headers, ("X-Worker-Pid", str(os.getpid()))]
            return start_response(status, headers, exc_info)  # type: ignore[no-any-return]

        return route(environ, start)

    return app
