"""The Flask test app (``gunicorn 'tests.support.http_apps.flask_app:create()'``): the routes of
``tests/support/http_apps``, with idemfn's WSGI middleware unless ``IDEMFN_HTTP_BARE=1``. Made
by a factory: importing this module opens no store."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request

from . import shared

routes = Blueprint("routes", __name__)


def _effect() -> int:
    return shared.effect(
        request.headers.get(shared.key_header()), request.headers.get("x-api-key"), request.path
    )


@routes.get("/health")
def health() -> Response:
    return Response("ok", mimetype="text/plain")


@routes.post("/orders")
def orders() -> Response:
    count = _effect()
    raw = request.get_data()
    if request.args.get("hold") == "1":
        shared.hold()
    response = current_app.json.response(shared.order(count, raw))
    response.status_code = 201
    response.headers["X-Order"] = str(count)
    response.set_cookie("session", f"s{count}")
    return response


@routes.post("/fail")
def fail() -> Response:
    _effect()
    raise RuntimeError("the handler failed")


@routes.post("/status/<int:code>")
def status(code: int) -> Response:
    _effect()
    return Response(shared.status_text(code), status=code, mimetype="text/plain")


@routes.post("/big")
def big() -> Response:
    _effect()
    return Response(shared.big(int(request.args["size"])), mimetype="application/octet-stream")


@routes.post("/stream")
def stream() -> Response:
    _effect()
    count = int(request.args["chunks"])
    size = int(request.args.get("size", "64"))

    def body() -> Iterator[bytes]:
        yield from shared.chunks(count, size)

    return Response(body(), mimetype="text/plain")


@routes.post("/hop")
def hop() -> Response:
    _effect()
    return Response("hop\n", mimetype="text/plain", headers=shared.HOP_HEADERS)


def create() -> Flask:
    """The app, with the middleware and its options from the environment."""
    app = Flask(__name__)
    app.register_blueprint(routes)
    if not shared.bare():
        from idemfn.wsgi import IdempotencyMiddleware

        app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, **shared.middleware_options())  # type: ignore[method-assign]
    return app
