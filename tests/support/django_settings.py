"""Django configured for one test module, and unconfigured after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import django
from django import conf
from django.utils.functional import empty


@contextlib.contextmanager
def configured(urlconf: str) -> Iterator[None]:
    """Django's settings for in-process tests (no database, no apps), with ``urlconf`` as the
    root URLconf. Left as they are if something configured them already (tests then set what
    they need with ``override_settings``); else unconfigured again at the end, so that a
    later ``settings.configure()`` in the same process still works."""
    configured_here = not conf.settings.configured
    if configured_here:
        conf.settings.configure(
            SECRET_KEY="idemfn-tests-only",
            DEBUG=False,
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=urlconf,
            INSTALLED_APPS=[],
            DATABASES={},
            USE_TZ=True,
        )
        django.setup()
    try:
        yield
    finally:
        if configured_here:
            conf.settings._wrapped = empty
