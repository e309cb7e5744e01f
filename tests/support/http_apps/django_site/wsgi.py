"""The Django test project's WSGI application, for gunicorn:
``'tests.support.http_apps.django_site.wsgi:create()'``.

Made by a factory: importing this module (pytest's doctest collection does) neither sets Django
up nor opens a store in the importing process."""

from __future__ import annotations

import os
from typing import Any


def create() -> Any:
    """The project's WSGI application."""
    from django.core.wsgi import get_wsgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.support.http_apps.django_site.settings")
    return get_wsgi_application()
