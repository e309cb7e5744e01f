"""A PostgreSQL primary and a streaming standby (``pg_basebackup -R``), with the faults of a
failover: stop the primary hard, promote the standby, build a new standby in the old primary's
place.

Two nodes, ``a`` and ``b``, each a data directory and a unix socket directory of its own (no TCP:
the standby streams from the primary's socket). ``dsn`` names both sockets with
``target_session_attrs=read-write``, so a client reaches whichever is the primary now; the roles
swap at each ``promote()`` and ``rebuild()`` makes a new standby in the dead node's directory,
so ``dsn`` stays right for ever.

Replication is synchronous (``synchronous_standby_names = '*'``, ``synchronous_commit = on``: a
commit returns once the standby has flushed its WAL) or asynchronous (``synchronous=False``, or
``set_synchronous(False)``). A promoted standby runs alone, asynchronously, until ``rebuild()``
gives it a standby: a synchronous primary without one makes every commit wait.

Everything waits for a condition (an LSN replayed, a WAL receiver gone, ``pg_is_in_recovery()``
false), within ``TIMEOUT`` seconds, never for a time. The servers run as user ``postgres``
when the tests run as root, as ``PostgresServer``'s do; ``remove()`` (the fixture's teardown)
stops both and removes every file, also when a test failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import PostgresServer, _pg_binary

__all__ = ["TIMEOUT", "PgNode", "PgStandby", "pg_standby"]

#: Seconds any condition of the deployment is waited for before the starter gives up.
TIMEOUT = 60.0


class PgNode(PostgresServer):
    """One node of the pair: a data directory (made by ``initdb`` for the first primary, by
    ``pg_basebackup`` for a standby) served on the unix socket directory ``socket_dir``."""

    def __init__(self, directory: Path, name: str) -> None:  # no initdb: see PgStandby
        self.name = name
        self.directory = directory / name
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "sock"
        self.socket_dir.mkdir(parents=True)
        as_root = os.geteuid() == 0
        if as_root:
            shutil.chown(self.directory, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        self._pg_ctl = _pg_binary("pg_ctl")
        self.dsn = f"host={self.socket_dir} user=postgres dbname=postgres"
        self.running = False

    def initdb(self) -> None:
        self._as_postgres(
            _pg_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )

    def basebackup(self, primary: PgNode) -> None:
        """Make this node a standby of ``primary``: a fresh copy of its data (``-R`` writes
        ``standby.signal`` and ``primary_conninfo``)."""
        shutil.rmtree(self.data, ignore_errors=True)
        self._as_postgres(
            _pg_binary("pg_basebackup"),
            "-D",
            str(self.data),
            "-d",
            primary.dsn,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            [*self._prefix, *command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def start(self) -> None:
        # cluster_name: the standby's application_name on its primary (pg_stat_replication).
        options = (
            f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
            f" -c cluster_name={self.name} -c wal_level=replica -c max_wal_senders=4"
            " -c synchronous_commit=on"
        )
        self._ctl("-o", options, "-l", str(self.directory / "log"), "-w", "start")
        self.running = True

    def stop(self) -> None:
        """Stop hard (``pg_ctl -m immediate``): no checkpoint, no goodbye to the standby."""
        super().stop()
        self.running = False

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run ``sql`` on this node, in autocommit, and return its rows."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])


class PgStandby:
    """A primary and a streaming standby, started now; see the module's docstring.

    Attributes:
        primary, standby: The nodes in each role now (``standby`` is None between ``promote``
            and ``rebuild``).
        dsn: Reaches whichever node is the primary (both sockets, read-write).
        synchronous: Whether the primary's commits wait for its standby.
    """

    def __init__(self, *, synchronous: bool = True) -> None:
        # Under /tmp, not pytest's 0700 directories: the servers run as user postgres.
        self.directory = Path(tempfile.mkdtemp(prefix="idemfn-pgha-"))
        if os.geteuid() == 0:
            os.chmod(self.directory, 0o755)
        self.synchronous = synchronous
        a, b = PgNode(self.directory, "a"), PgNode(self.directory, "b")
        self.nodes = (a, b)
        self.dsn = (
            f"host={a.socket_dir},{b.socket_dir} user=postgres dbname=postgres"
            " target_session_attrs=read-write"
        )
        self.primary: PgNode = a
        self.standby: PgNode | None = None
        self.promotions = 0
        self._conninfo = ""  # the standby's primary_conninfo while detached
        try:
            a.initdb()
            a.start()
            self._attach(b)
        except BaseException:
            self.remove()
            raise

    # Replication.
    def _attach(self, node: PgNode) -> None:
        node.basebackup(self.primary)
        node.start()
        self.standby = node
        _wait(
            lambda: self._streaming(node.name),
            f"standby {node.name} streaming from {self.primary.name}",
        )
        self.set_synchronous(self.synchronous)

    def _streaming(self, name: str, sync: bool = False) -> bool:
        rows = self.primary.query(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s"
            " AND state = 'streaming'",
            (name,),
        )
        return bool(rows) and (not sync or rows[0][0] == "sync")

    def set_synchronous(self, on: bool) -> None:
        """Make the primary's commits wait for the standby (``on``), or not; once in effect."""
        self.synchronous = on
        names = "*" if on else ""
        self.primary.query(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        self.primary.query("SELECT pg_reload_conf()")
        want = "*" if on else ""
        _wait(
            lambda: self.primary.query("SHOW synchronous_standby_names")[0][0] == want,
            "synchronous_standby_names in effect",
        )
        if on and self.standby is not None:
            _wait(lambda: self._streaming(self.standby.name, sync=True), "a synchronous standby")  # type: ignore[union-attr]

    def lsn(self) -> str:
        """The primary's current WAL position."""
        return str(self.primary.query("SELECT pg_current_wal_lsn()")[0][0])

    def caught_up(self) -> None:
        """Wait until the standby has replayed the primary's WAL up to where it is now."""
        assert self.standby is not None, "no standby"
        target, standby = self.lsn(), self.standby
        _wait(
            lambda: standby.query(
                "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s::pg_lsn) >= 0", (target,)
            )[0][0],
            f"the standby replaying up to {target}",
        )

    def detach(self) -> None:
        """Cut the standby off its primary (its WAL receiver stopped, and gone from the
        primary's ``pg_stat_replication``): whatever the primary commits from now on never
        reaches it. A synchronous primary's commits then wait (for ever: a test's way to hold
        a commit that has landed on the primary)."""
        assert self.standby is not None
        standby = self.standby
        self._conninfo = str(standby.query("SHOW primary_conninfo")[0][0])
        standby.query("ALTER SYSTEM SET primary_conninfo = ''")
        standby.query("SELECT pg_reload_conf()")
        _wait(
            lambda: (
                not standby.query("SELECT 1 FROM pg_stat_wal_receiver")
                and not self.primary.query("SELECT 1 FROM pg_stat_replication")
            ),
            "the WAL receiver gone",
        )

    def reattach(self) -> None:
        """Undo ``detach()``: the standby streams from its primary again (and catches up)."""
        assert self.standby is not None
        standby = self.standby
        from psycopg import sql

        standby.query(
            sql.SQL("ALTER SYSTEM SET primary_conninfo = {}")
            .format(sql.Literal(self._conninfo))
            .as_string(None)
        )
        standby.query("SELECT pg_reload_conf()")
        _wait(lambda: self._streaming(standby.name), f"standby {standby.name} streaming again")

    # The failover.
    def fail(self) -> None:
        """Stop the primary hard: ``pg_ctl -m immediate stop``, as a crash."""
        self.primary.stop()

    def promote(self) -> PgNode:
        """Promote the standby and wait until it accepts writes; it runs alone (asynchronously)
        until ``rebuild()``. Returns the new primary."""
        assert self.standby is not None, "no standby to promote"
        node, self.standby = self.standby, None
        node._ctl("-w", "promote")
        _wait(lambda: not node.in_recovery(), f"{node.name} out of recovery")
        self.primary = node
        self.promotions += 1
        # Its configuration is its old primary's copy, taken before synchronous replication was
        # set there: it waits for no standby.
        return node

    def rebuild(self) -> None:
        """A new standby of the primary, in the other node's directory (its old data gone),
        synchronous again when the pair is."""
        (other,) = (n for n in self.nodes if n is not self.primary)
        if other.running:
            other.stop()
        self._attach(other)

    def remove(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait(condition: Callable[[], object], what: str) -> None:
    give_up = time.monotonic() + TIMEOUT
    while True:
        with contextlib.suppress(Exception):  # a server still starting, or going
            if condition():
                return
        if time.monotonic() > give_up:
            raise TimeoutError(f"pg_standby: no {what} within {TIMEOUT:g} s")
        time.sleep(0.01)


@pytest.fixture
def pg_standby() -> Iterator[PgStandby]:
    """A primary and a synchronous standby of its own (see ``PgStandby``), removed after."""
    pair = PgStandby(synchronous=True)
    try:
        yield pair
    finally:
        pair.remove()
