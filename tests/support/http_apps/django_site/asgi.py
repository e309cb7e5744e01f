"""The Django test project's ASGI application, for uvicorn:
``--factory tests.support.http_apps.django_site.asgi:create``.

Made by a factory: importing this module (pytest's doctest collection does) neither sets Django
up nor opens a store in the importing process."""

from __future__ import annotations

import os
from typing import Any


def create() -> Any:
    """The project's ASGI application."""
    from django.core.asgi import get_asgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.support.http_apps.django_site.settings")
    return get_asgi_application()
