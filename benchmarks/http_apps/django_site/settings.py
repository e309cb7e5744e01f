"""Settings of the benchmark's Django project, per ``BENCH_HTTP_MODE`` (see ``common``)."""

from __future__ import annotations

from typing import Any

from benchmarks.http_apps import common

SECRET_KEY = "bench-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "benchmarks.http_apps.django_site.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, Any] = {}
USE_TZ = True
LOGGING_CONFIG = None
MIDDLEWARE: list[str] = []

if common.mode() == "idemfn":
    MIDDLEWARE = ["idemfn.django.IdempotencyMiddleware"]
    IDEMFN_HTTP = {"store": common.store()}
elif common.mode() == "peer":
    # django-idempotency-key as its README sets it up for several processes: responses in a
    # Django cache (django-redis), the lookup under its Redis lock. Replays keep their status
    # (CONFLICT_STATUS_CODE None; its default rewrites every replay's status to 409).
    MIDDLEWARE = ["idempotency_key.middleware.IdempotencyKeyMiddleware"]
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": common.store(),
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
    IDEMPOTENCY_KEY = {
        "CONFLICT_STATUS_CODE": None,
        "STORAGE": {"CLASS": "idempotency_key.storage.CacheKeyStorage", "CACHE_NAME": "default"},
        "LOCK": {
            "CLASS": "idempotency_key.locks.redis.MultiProcessRedisLock",
            "LOCATION": common.store(),
        },
    }
