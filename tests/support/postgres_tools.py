"""Looking at a test's PostgreSQL from outside a store: its sessions, the marks waiters hold,
what its settles NOTIFY, the server stalled (every process stopped) for a while, and a ledger
table that transactional bodies write to."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

from idemfn._stores.postgres import PostgresStore, _table_mark

from .servers import PostgresServer

__all__ = ["Heard", "ledger_rows", "ledger_table", "marks", "named_dsn", "sessions", "stopped"]


def ledger_table(server: PostgresServer, constraint: str = "") -> str:
    """A table the bodies write to, in the store's database, with one row ('o-1', 1)."""
    name = f"ledger_{uuid.uuid4().hex}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (order_id text, cents int{constraint})")
        conn.execute(f"INSERT INTO {name} VALUES ('o-1', 1)")
    return name


def ledger_rows(server: PostgresServer, name: str) -> list[tuple[str, int]]:
    """The rows of the ledger ``name``, in order."""
    with psycopg.connect(server.dsn) as conn:
        return conn.execute(f"SELECT order_id, cents FROM {name} ORDER BY 1, 2").fetchall()


def named_dsn(server: PostgresServer) -> tuple[str, str]:
    """A connection string for ``server`` whose sessions carry a name of their own, and the
    name: what ``sessions`` counts."""
    name = f"idemfn_t_{os.urandom(6).hex()}"
    return f"{server.dsn} application_name={name}", name


def sessions(server: PostgresServer, name: str) -> int:
    """How many sessions of ``server`` carry the application name ``name``."""
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def marks(server: PostgresServer, store: PostgresStore, *, granted: bool = True) -> int:
    """How many marks (a waiter's shared advisory lock on a key) are held on ``store``'s table
    (with ``granted`` False: waited for)."""
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2"
            " AND classid = %s AND granted = %s",
            (_table_mark(store.table) & 0xFFFFFFFF, granted),  # (an oid: the int4, unsigned)
        ).fetchone()
    assert row is not None
    return int(row[0])


class Heard:
    """A session that LISTENs on ``store``'s channel: ``since()`` is what was notified since the
    last call, in order (the listening connections' probes left out)."""

    def __init__(self, server: PostgresServer, store: PostgresStore) -> None:
        self.conn = psycopg.connect(server.dsn, autocommit=True)
        self.conn.execute(store._sql["listen"])
        self.channel = store._channel
        self.count = 0

    def since(self) -> list[str]:
        """Notifications reach a session in the order their transactions committed: this one
        NOTIFYs a marker, and reads up to it."""
        self.count += 1
        marker = f"marker {self.count} {os.urandom(4).hex()}"
        self.conn.execute("SELECT pg_notify(%s, %s)", (self.channel, marker))
        payloads: list[str] = []
        with contextlib.closing(self.conn.notifies(timeout=60)) as notes:
            for note in notes:
                if note.payload == marker:
                    return payloads
                if not note.payload.startswith("idemfn probe "):
                    payloads.append(note.payload)
        raise AssertionError("the marker was never heard")

    def close(self) -> None:
        self.conn.close()


def _processes(server: PostgresServer) -> list[int]:
    """The server's postmaster and every process it started."""
    postmaster = int(Path(server.data, "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def stopped(server: PostgresServer, *, at_most: float = 30.0) -> Iterator[Callable[[], None]]:
    """``server`` stalled: every one of its processes stopped (SIGSTOP) until the block calls
    the function it is given, or ends, or ``at_most`` seconds pass (a safety net: a test whose
    thread is blocked by the stall still ends)."""
    pids = _processes(server)

    def resume() -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    safety = threading.Timer(at_most, resume)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    safety.start()
    try:
        yield resume
    finally:
        safety.cancel()
        resume()
