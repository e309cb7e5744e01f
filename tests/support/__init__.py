"""Support: what the tests of several layers share, and no tests of its own. Servers, task queue
workers, stores and the records put in them, values to fingerprint, forked children, the
command line. Tests import it directly (``from tests.support.servers import RedisServer``);
nothing imports a conftest."""

import pytest

# Before any of its modules is imported: their assertions are rewritten as the tests' are.
pytest.register_assert_rewrite(
    *(
        f"tests.support.{name}"
        for name in (
            "celery_tasks",
            "cli",
            "concurrency",
            "deployments",
            "forks",
            "http_checks",
            "http_servers",
            "records",
            "rq_jobs",
            "servers",
            "stores",
            "values",
            "workers",
        )
    )
)
