"""The Django project's views: the same two routes as the Starlette and Flask apps."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from benchmarks.http_apps import common


def orders(request: HttpRequest) -> JsonResponse:
    return JsonResponse(common.order(request.body), status=201)


def slow(request: HttpRequest) -> JsonResponse:
    common.slow_sync(request.headers.get("idempotency-key"))
    return JsonResponse({"ok": True}, status=201)
