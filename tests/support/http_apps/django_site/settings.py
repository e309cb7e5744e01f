"""Settings of the Django test project: the least Django needs to serve plain views, and the
middleware with its options from the environment (``tests.support.http_apps.shared``)."""

from __future__ import annotations

from .. import shared

SECRET_KEY = "idemfn-tests-only"
DEBUG = False  # exceptions become Django's own 500 page, as in production
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.support.http_apps.django_site.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
WSGI_APPLICATION = "tests.support.http_apps.django_site.wsgi.application"

MIDDLEWARE: list[str] = []
if not shared.bare():
    MIDDLEWARE.append("idemfn.django.IdempotencyMiddleware")
    IDEMFN_HTTP = shared.middleware_options()
