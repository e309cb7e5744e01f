"""The Django project's WSGI entry point."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.http_apps.django_site.settings")
application = get_wsgi_application()
