"""What the benchmark's apps share: the environment that configures them, and the handlers' work.

``bench_http.py`` starts each server with:

- ``BENCH_HTTP_MODE``: ``bare`` (no middleware), ``idemfn`` (idemfn's middleware) or ``peer``
  (the framework's peer: asgi-idempotency-header on Starlette, django-idempotency-key on Django);
- ``BENCH_HTTP_STORE``: idemfn's store (a directory or a store URL), or the peer's Redis URL;
- ``BENCH_HTTP_RUNS``: a file the ``/slow`` handler appends a line to (its key) on each run, so
  runs are counted across worker processes, outside any store.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

SLOW = 0.05  # seconds the /slow handler takes


def mode() -> str:
    """``bare``, ``idemfn`` or ``peer``."""
    value = os.environ.get("BENCH_HTTP_MODE", "bare")
    if value not in ("bare", "idemfn", "peer"):
        raise ValueError(f"BENCH_HTTP_MODE must be bare, idemfn or peer, not {value!r}")
    return value


def store() -> str:
    """``BENCH_HTTP_STORE``: idemfn's store, or the peer's Redis URL."""
    return os.environ["BENCH_HTTP_STORE"]


def order(body: bytes) -> dict[str, Any]:
    """The /orders answer: a small JSON object built from the request's."""
    given = json.loads(body) if body else {}
    return {"id": 1, "item": given.get("item"), "qty": given.get("qty"), "status": "created"}


def count_run(key: str | None) -> None:
    """Append ``key`` to ``BENCH_HTTP_RUNS``: one line per handler run (O_APPEND: whole lines
    from any number of processes)."""
    with open(os.environ["BENCH_HTTP_RUNS"], "a") as runs:
        runs.write(f"{key}\n")


def slow_sync(key: str | None) -> None:
    """The /slow handler's work, for sync frameworks: count the run, then take ~50 ms."""
    count_run(key)
    time.sleep(SLOW)
