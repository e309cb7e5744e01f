"""The FastAPI test app (``uvicorn --factory tests.support.http_apps.fastapi_app:create``): the
routes of ``tests/support/http_apps``, with idemfn's ASGI middleware unless
``IDEMFN_HTTP_BARE=1``. Made by a factory: importing this module opens no store."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from . import shared

router = APIRouter()


def _effect(request: Request) -> int:
    return shared.effect(
        request.headers.get(shared.key_header()),
        request.headers.get("x-api-key"),
        request.url.path,
    )


@router.get("/health")
async def health() -> PlainTextResponse:
    return PlainTextResponse("ok")


@router.post("/orders")
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


@router.post("/fail")
async def fail(request: Request) -> Response:
    _effect(request)
    raise RuntimeError("the handler failed")


@router.post("/status/{code}")
async def status(code: int, request: Request) -> Response:
    _effect(request)
    return PlainTextResponse(shared.status_text(code), status_code=code)


@router.post("/big")
async def big(size: int, request: Request) -> Response:
    _effect(request)
    return Response(shared.big(size), media_type="application/octet-stream")


@router.post("/stream")
async def stream(chunks: int, request: Request, size: int = 64) -> Response:
    _effect(request)

    async def body() -> AsyncIterator[bytes]:
        for chunk in shared.chunks(chunks, size):
            yield chunk

    return StreamingResponse(body(), media_type="text/plain")


@router.post("/hop")
async def hop(request: Request) -> Response:
    _effect(request)
    return PlainTextResponse("hop\n", headers=shared.HOP_HEADERS)


def create() -> FastAPI:
    """The app, with the middleware and its options from the environment."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(router)
    if not shared.bare():
        from idemfn.asgi import IdempotencyMiddleware

        app.add_middleware(IdempotencyMiddleware, **shared.middleware_options())
    return app
