"""A process of its own that settles a key when told: a watch must hear another process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from idemfn import PostgresStore, RedisStore

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys
from idemfn import PostgresStore, RedisStore
from tests.support.records import finished
kind, where, name, key, token, how = sys.argv[1:]
if kind == "postgres":
    store = PostgresStore(where, table=name)
else:
    store = RedisStore(where, prefix=name)
store.time()  # connected, and the clock read: the settle comes at once when told
print("ready", flush=True)
sys.stdin.readline()
if how == "complete":
    ok = store.swap(key, token, finished(key, token))
else:
    ok = store.release(key, token)
print("settled" if ok else "refused", flush=True)
"""


@contextlib.contextmanager
def settler(
    store: PostgresStore | RedisStore, where: str, key: str, how: str, token: str = "t1"
) -> Iterator[subprocess.Popen[str]]:
    """A process with its own copy of ``store`` (on the server at ``where``: a DSN or URL) that
    settles the claim ``token`` on ``key`` (``how``: "complete" or "release") when told
    (``go``), and must say it did."""
    if isinstance(store, PostgresStore):
        kind, name = "postgres", store.table
    else:
        kind, name = "redis", store.prefix
    child = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, kind, where, name, key, token, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        yield child
        assert child.stdout.readline() == "settled\n"
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def go(child: subprocess.Popen[str]) -> None:
    """Tell ``settler``'s process to settle now."""
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
