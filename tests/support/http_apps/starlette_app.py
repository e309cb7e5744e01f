"""The Starlette test app (``uvicorn --factory tests.support.http_apps.starlette_app:create``):
the routes of ``tests/support/http_apps``, with idemfn's ASGI middleware unless
``IDEMFN_HTTP_BARE=1``. Made by a factory: importing this module (pytest's doctest collection
does) opens no store."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import shared


def _effect(request: Request) -> int:
    return shared.effect(
        request.headers.get(shared.key_header()),
        request.headers.get("x-api-key"),
        request.url.path,
    )


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def orders(request: Request) -> Response:
    count = _effect(request)
    raw = await request.body()
    if request.query_params.get("hold") == "1":
        await shared.ahold()
    response = JSONResponse(
        shared.order(count, raw), status_code=201, headers={"X-Order": str(count)}
    )
    response.set_cookie("session", f"s{count}")
    return response


async def fail(request: Request) -> Response:
    _effect(request)
    raise RuntimeError("the handler failed")


async def status(request: Request) -> Response:
    _effect(request)
    code = int(request.path_params["code"])
    return PlainTextResponse(shared.status_text(code), status_code=code)


async def big(request: Request) -> Response:
    _effect(request)
    size = int(request.query_params["size"])
    return Response(shared.big(size), media_type="application/octet-stream")


async def stream(request: Request) -> Response:
    _effect(request)
    count = int(request.query_params["chunks"])
    size = int(request.query_params.get("size", "64"))

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in shared.chunks(count, size):
            yield chunk

    return StreamingResponse(chunks(), media_type="text/plain")


async def hop(request: Request) -> Response:
    _effect(request)
    return PlainTextResponse("hop\n", headers=shared.HOP_HEADERS)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/orders", orders, methods=["POST"]),
    Route("/fail", fail, methods=["POST"]),
    Route("/status/{code:int}", status, methods=["POST"]),
    Route("/big", big, methods=["POST"]),
    Route("/stream", stream, methods=["POST"]),
    Route("/hop", hop, methods=["POST"]),
]


def create() -> Starlette:
    """The app, with the middleware and its options from the environment."""
    app = Starlette(routes=ROUTES)
    if not shared.bare():
        from idemfn.asgi import IdempotencyMiddleware

        app.add_middleware(IdempotencyMiddleware, **shared.middleware_options())
    return app
