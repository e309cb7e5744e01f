"""The Django test project (``gunicorn tests.support.http_apps.django_site.wsgi:application``):
the routes of ``tests/support/http_apps``, with ``idemfn.django.IdempotencyMiddleware`` unless
``IDEMFN_HTTP_BARE=1``. No database, no admin, no sessions."""
