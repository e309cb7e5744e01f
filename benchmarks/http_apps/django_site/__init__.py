"""The Django project (``gunicorn benchmarks.http_apps.django_site.wsgi:application``): bare, with
idemfn's middleware, or with django-idempotency-key's (a django-redis cache, a Redis lock), per
``BENCH_HTTP_MODE``."""
