"""Read by mypy and pyright only: the HTTP middlewares fit their frameworks' typed hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette

from idemfn import MemoryStore
from idemfn.asgi import IdempotencyMiddleware, Request
from idemfn.wsgi import IdempotencyMiddleware as WSGIIdempotencyMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication


def tenant(request: Request) -> str | None:
    return request.headers.get("x-api-key")


def check_asgi() -> None:
    app = Starlette()
    # Starlette types add_middleware's options from the middleware's own signature (ParamSpec).
    app.add_middleware(IdempotencyMiddleware, store=MemoryStore(), scope=tenant, wait=5)
    api = FastAPI()
    api.add_middleware(IdempotencyMiddleware, required=True, recorded_statuses=range(200, 500))
    wrapped = IdempotencyMiddleware(app, methods=("POST",))
    assert wrapped.app is app


def check_wsgi() -> None:
    flask_app = Flask(__name__)
    # Flask's documented way is `flask_app.wsgi_app = IdempotencyMiddleware(flask_app.wsgi_app)`
    # (mypy calls assigning over a method an error): the middleware takes and is a WSGI app.
    guarded: WSGIApplication = WSGIIdempotencyMiddleware(
        flask_app.wsgi_app, store=MemoryStore(), scope=tenant
    )
    assert guarded is not None
