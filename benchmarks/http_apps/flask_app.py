"""The Flask app (``gunicorn benchmarks.http_apps.flask_app:app``): bare or with idemfn's WSGI
middleware, per ``BENCH_HTTP_MODE`` (Flask has no maintained peer to measure)."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify, request

from benchmarks.http_apps import common


def orders() -> tuple[Response, int]:
    return jsonify(common.order(request.get_data())), 201


def slow() -> tuple[Response, int]:
    common.slow_sync(request.headers.get("idempotency-key"))
    return jsonify({"ok": True}), 201


def build(mode: str, store: Any = None) -> Flask:
    """The app: ``bare`` or ``idemfn`` (``store``: a Store, directory or URL)."""
    app = Flask(__name__)
    app.post("/orders")(orders)
    app.post("/slow")(slow)
    if mode == "idemfn":
        from idemfn.wsgi import IdempotencyMiddleware

        app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store=store)  # type: ignore[method-assign]
    elif mode == "peer":
        raise ValueError("the Flask app has no peer (Flask-Idempotent does not run on Flask 3)")
    return app


app = build(common.mode(), None if common.mode() == "bare" else common.store())
