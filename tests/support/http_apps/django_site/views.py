"""The views of the Django test project: the routes of ``tests/support/http_apps``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET, require_POST

from .. import shared


def _effect(request: HttpRequest) -> int:
    return shared.effect(
        request.headers.get(shared.key_header()), request.headers.get("x-api-key"), request.path
    )


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@require_POST
def orders(request: HttpRequest) -> HttpResponse:
    count = _effect(request)
    raw = request.body
    if request.GET.get("hold") == "1":
        shared.hold()
    response = JsonResponse(shared.order(count, raw), status=201)
    response["X-Order"] = str(count)
    response.set_cookie("session", f"s{count}")
    return response


@require_POST
def fail(request: HttpRequest) -> HttpResponse:
    _effect(request)
    raise RuntimeError("the handler failed")


@require_POST
def status(request: HttpRequest, code: int) -> HttpResponse:
    _effect(request)
    return HttpResponse(shared.status_text(code), status=code, content_type="text/plain")


@require_POST
def big(request: HttpRequest) -> HttpResponse:
    _effect(request)
    size = int(request.GET["size"])
    return HttpResponse(shared.big(size), content_type="application/octet-stream")


@require_POST
def stream(request: HttpRequest) -> StreamingHttpResponse:
    _effect(request)
    count = int(request.GET["chunks"])
    size = int(request.GET.get("size", "64"))
    return StreamingHttpResponse(shared.chunks(count, size), content_type="text/plain")


@require_POST
def hop(request: HttpRequest) -> HttpResponse:
    _effect(request)
    response = HttpResponse("hop\n", content_type="text/plain")
    for name, value in shared.HOP_HEADERS.items():
        response[name] = value
    return response
