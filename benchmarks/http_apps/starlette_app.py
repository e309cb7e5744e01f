"""The Starlette app (``uvicorn benchmarks.http_apps.starlette_app:app``): bare, with idemfn's
ASGI middleware, or with asgi-idempotency-header's (its Redis backend), per ``BENCH_HTTP_MODE``."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarks.http_apps import common


async def orders(request: Request) -> Response:
    return JSONResponse(common.order(await request.body()), status_code=201)


async def slow(request: Request) -> Response:
    common.count_run(request.headers.get("idempotency-key"))
    await asyncio.sleep(common.SLOW)
    return JSONResponse({"ok": True}, status_code=201)


def build(mode: str, store: Any = None) -> Starlette:
    """The app: ``bare``, ``idemfn`` (``store``: a Store, directory or URL) or ``peer``
    (``store``: the Redis URL)."""
    app = Starlette(
        routes=[Route("/orders", orders, methods=["POST"]), Route("/slow", slow, methods=["POST"])]
    )
    if mode == "idemfn":
        from idemfn.asgi import IdempotencyMiddleware

        app.add_middleware(IdempotencyMiddleware, store=store)
    elif mode == "peer":
        from idempotency_header_middleware import IdempotencyHeaderMiddleware
        from idempotency_header_middleware.backends import RedisBackend
        from redis.asyncio import Redis

        backend = RedisBackend(redis=Redis.from_url(store))
        # (its dataclass declares backend: Backend, which Starlette's typing does not match)
        app.add_middleware(IdempotencyHeaderMiddleware, backend=backend)  # type: ignore[arg-type]
    return app


app = build(common.mode(), None if common.mode() == "bare" else common.store())
