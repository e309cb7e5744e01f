"""``idemfn stats`` and the events agree (issue 21): the halted records counted by the reason
word the ``halted`` event and the metrics' ``reason`` label carry, and the oldest processing
claim with how its owner was found gone, in the ``abandoned`` event's words.

The records are made by real calls (a body that raises, a value that cannot be stored, an
interrupted body, a claim block left without complete(), an abandoned claim halted by the next
call), by processes SIGKILLed while holding a claim, and by a claim whose lease already ran
out; the command reads them from a ``DiskStore``, a ``RedisStore`` and a ``PostgresStore``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idemfn
from idemfn import Store, idempotent
from idemfn._cli.records import HALTED_REASONS
from idemfn.events import Event
from idemfn.testing import _processing
from tests.support.cli import TIMEOUT, argv_of, cli_env, idemfn_cli
from tests.support.servers import PostgresServer, RedisServer

# The command opens a RedisStore with the default prefix, so these records live in a database
# of their own, emptied before and after (database 0: the other tests, each under a prefix of
# its own; 15: tests/tools/test_docs.py).
_REDIS_DB = 13

KILLED = """\
import os, signal, sys
import idemfn
url, key = sys.argv[1:]
claim = idemfn.begin(key, store=idemfn.open_store(url), fingerprint="")
assert isinstance(claim, idemfn.Claim)
os.kill(os.getpid(), signal.SIGKILL)  # dies holding the claim
"""


@pytest.fixture(params=["disk", "redis", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The store's path or URL, as the command is given it."""
    if request.param == "disk":
        yield str(tmp_path / "store")
        return
    if request.param == "postgres":
        # The command opens the default table: a database of this test's own holds it.
        import psycopg

        pg: PostgresServer = request.getfixturevalue("postgres_server")
        database = f"stats_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        url = f"postgresql://postgres@/{database}?host={pg.socket_dir}"
        yield url
        idemfn.open_store(url).close()  # (the test's, opened once per URL: its pool too)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    url = f"{server.url}?db={_REDIS_DB}"
    store = idemfn.open_store(url)
    assert isinstance(store, idemfn.RedisStore)
    store.client.flushdb()
    yield url
    store.client.flushdb()  # (left open: the next test's open_store(url) is this store)


def together(argvs: list[list[str]], env: dict[str, str]) -> list[tuple[int, bytes, bytes]]:
    """Run processes side by side (each costs an interpreter's start-up): their exit
    statuses and outputs, in order."""
    procs = [
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for argv in argvs
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def killed_holding(where: str, *keys: str) -> None:
    """Leave each of ``keys`` processing, claimed by a process SIGKILLed while holding it."""
    done = together([[sys.executable, "-c", KILLED, where, key] for key in keys], cli_env(where))
    assert [status for status, _, _ in done] == [-signal.SIGKILL] * len(keys), done


def stats(where: str) -> tuple[Any, str]:
    """``idemfn stats --json`` and ``idemfn stats``, side by side: the summary, and the text."""
    done = together([argv_of(["stats", "--json"]), argv_of(["stats"])], cli_env(where))
    for status, out, err in done:
        assert status == 0 and err == b"", (status, out, err)
    return json.loads(done[0][1]), done[1][1].decode()


def test_stats_counts_halted_records_by_the_events_reason_words(where: str) -> None:
    store: Store = idemfn.open_store(where)
    events: list[Event] = []

    @idempotent(store=store, name="raises")
    def raises(x: int) -> None:
        raise ValueError(x)

    @idempotent(store=store, name="unstorable")
    def unstorable(x: int) -> object:
        return threading.Lock()

    @idempotent(store=store, name="interrupted")
    def interrupted(x: int) -> None:
        raise KeyboardInterrupt

    @idempotent(store=store, name="abandoned", on_abandoned="halt")
    def abandoned(x: int) -> None:
        raise AssertionError("an abandoned claim halts: the body never runs")

    killed_holding(where, "stuck:dead", abandoned.key_for(1))  # stuck:dead: the oldest claim
    with idemfn.subscribe(events.append, events=["halted", "abandoned"]):
        for x in (1, 2):
            with pytest.raises(ValueError):
                raises(x)
        with pytest.raises(idemfn.Halted):
            unstorable(1)
        with pytest.raises(KeyboardInterrupt):
            interrupted(1)
        with pytest.raises(idemfn.Halted):
            abandoned(1)
        claim = idemfn.begin("block", store=store, fingerprint="fp")
        assert isinstance(claim, idemfn.Claim)
        with claim:
            pass  # ends without complete()
    # A claim whose owner (on another machine) let its lease run out 5 s ago, by the store's
    # clock (a server's, for a server store).
    assert store.claim(_processing(store, "stuck:lease", "t1", lease=-5.0)) is None
    first, text = stats(where)
    store.delete("stuck:dead")
    second = json.loads(idemfn_cli("stats", "--json", env=cli_env(where)).stdout)

    # The halted records, counted by the word each `halted` event carried as it happened.
    halted = Counter(e.reason for e in events if e.name == "halted")
    words = {e.key.partition(":")[0]: e.reason for e in events if e.name == "halted"}
    assert words == {
        "raises": "raised",
        "unstorable": "unstorable",
        "interrupted": "interrupted",
        "abandoned": "abandoned",
        # (The block's word is whatever halted_reason makes of its record: stats and the
        # event agree below, whichever it is.)
        "block": words["block"],
    }
    assert halted["raised"] >= 2
    assert first["halted_by_reason"] == {r: halted[r] for r in HALTED_REASONS}
    assert sum(first["halted_by_reason"].values()) == first["by_state"]["halted"] == 6
    assert first["by_state"]["abandoned"] == 2 and first["by_state"]["processing"] == 0
    for key in ("store", "records", "by_state", "bytes", "oldest", "newest"):  # kept for scripts
        assert key in first
    assert "halted:" in text and "unstorable 1, interrupted 1, abandoned 1" in text

    # The oldest processing claim: a process killed holding it, found gone as the next call
    # finds it (the `abandoned` event of the key halted above said owner_died too).
    assert [e.reason for e in events if e.name == "abandoned"] == ["owner_died"]
    dead = first["oldest_processing"]
    assert dead["key"] == "stuck:dead" and dead["attempt"] == 1
    assert dead["abandoned"] is True and dead["abandoned_reason"] == "owner_died"
    assert "no longer exists" in dead["owner_gone"] and dead["age_seconds"] >= 0
    assert "oldest processing: stuck:dead" in text and "owner_died" in text
    # Then the claim whose lease ran out.
    lease = second["oldest_processing"]
    assert lease["key"] == "stuck:lease"
    assert lease["abandoned"] is True and lease["abandoned_reason"] == "lease_expired"
    assert lease["lease_expires_at"] is not None and lease["owner_gone"].startswith("its lease")


def test_stats_of_a_store_with_nothing_halted_and_a_live_claim(tmp_path: Path) -> None:
    where = str(tmp_path / "store")
    store = idemfn.open_store(where)
    claim = idemfn.begin("done", store=store, fingerprint="fp")
    assert isinstance(claim, idemfn.Claim)
    claim.complete(1)
    empty, text = stats(where)
    assert empty["halted_by_reason"] == dict.fromkeys(HALTED_REASONS, 0)
    assert empty["oldest_processing"] is None and "oldest processing" not in text
    live = idemfn.begin("live", store=store, fingerprint="fp")
    assert isinstance(live, idemfn.Claim)
    try:
        running, text = stats(where)
    finally:
        live.release()
    claimed = running["oldest_processing"]
    assert claimed["key"] == "live" and claimed["abandoned"] is False
    assert claimed["abandoned_reason"] is None and claimed["owner_gone"] is None
    assert re.search(
        r"^oldest processing: live \(.*; running, lease ends in \d+s\)$", text, re.M
    ), text
