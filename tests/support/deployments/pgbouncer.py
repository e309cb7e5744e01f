"""PgBouncer in transaction pooling mode in front of a ``PostgresServer`` (issue 19).

Debian's ``pgbouncer`` (1.18: no prepared statements across transactions; that came in 1.21),
on a unix socket in a directory of its own, ``auth_type = trust``, and few server connections
(``default_pool_size``, 3 by default) so that a client's transactions really do hop from one
server connection to another. It refuses to run as root: as root it runs as user postgres
(``Popen(user=...)``: the process the fixture kills is pgbouncer itself, no wrapper).

``PgBouncer.backends()`` reads what each server connection holds (its prepared statements, the
channels it listens on, its advisory locks): a client's session state left on a server
connection stays there for whoever gets that connection next.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.servers import PostgresServer

__all__ = ["Backend", "PgBouncer", "pgbouncer"]

#: The port pgbouncer's socket is named after (``.s.PGSQL.<port>``): in a directory of its own,
#: it never collides with another worker's, so no TCP port is taken at all.
PORT = 6432


@dataclass(frozen=True)
class Backend:
    """What one server connection of PgBouncer's holds: its session state."""

    pid: int
    prepared: tuple[str, ...]  # pg_prepared_statements
    listening: tuple[str, ...]  # pg_listening_channels()
    advisory: tuple[str, ...]  # its advisory locks in pg_locks (mode, objid)

    @property
    def clean(self) -> bool:
        return not (self.prepared or self.listening or self.advisory)


class PgBouncer:
    """A pgbouncer (``pool_mode = transaction``) in front of ``server``; ``dsn`` reaches it,
    ``url`` too (a ``postgresql://`` URL, as ``IDEMFN_STORE`` takes)."""

    def __init__(self, server: PostgresServer, *, pool_size: int = 3) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(binary):
            pytest.fail("pgbouncer is not installed: `apt-get install pgbouncer` (README)")
        self.server = server
        self.pool_size = pool_size
        # Under /tmp, not pytest's 0700 directories: pgbouncer runs as user postgres.
        self.directory = Path(tempfile.mkdtemp(prefix="idemfn-pgbouncer-"))
        self.socket_dir = self.directory / "sock"
        self.socket_dir.mkdir()
        users = self.directory / "userlist.txt"
        users.write_text('"postgres" ""\n')
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"postgres = host={server.socket_dir} dbname=postgres user=postgres\n"
            "[pgbouncer]\n"
            "pool_mode = transaction\n"
            "listen_addr =\n"
            f"listen_port = {PORT}\n"
            f"unix_socket_dir = {self.socket_dir}\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 2000\n"
            "server_round_robin = 0\n"  # LIFO, PgBouncer's default: what the tests rely on
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            f"logfile = {self.directory / 'pgbouncer.log'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        self._user: dict[str, object] = {}
        if os.geteuid() == 0:
            os.chmod(self.directory, 0o755)
            for path in (self.directory, self.socket_dir, users, ini):
                shutil.chown(path, "postgres")
            self._user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self._binary = binary
        self._ini = ini
        self.dsn = f"host={self.socket_dir} port={PORT} user=postgres dbname=postgres"
        self.url = f"postgresql://postgres@/postgres?host={self.socket_dir}&port={PORT}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import psycopg

        self.process = subprocess.Popen(  # type: ignore[call-overload]
            [self._binary, str(self._ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **self._user,
        )
        give_up = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                log = self.directory / "pgbouncer.log"
                raise RuntimeError(
                    f"pgbouncer exited: {self.process.stderr.read()!r}"
                    f" {log.read_text() if log.exists() else ''}"
                )
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            if time.monotonic() > give_up:
                self.stop()
                raise RuntimeError("pgbouncer did not accept a connection within 30 s")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stderr is not None:
            process.stderr.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def backends(self) -> list[Backend]:
        """Each of PgBouncer's server connections (``pool_size``), and its session state.

        Its session's own views (``pg_prepared_statements``, ``pg_listening_channels()``) are
        read on the connection itself: ``pool_size`` client transactions through PgBouncer,
        held open at once, so that each runs on another server connection (PgBouncer opens
        those it has not yet opened: they hold nothing)."""
        import psycopg

        seen: dict[int, Backend] = {}
        with contextlib.ExitStack() as stack:
            for _ in range(self.pool_size):
                conn = stack.enter_context(
                    psycopg.connect(self.dsn, prepare_threshold=None, autocommit=False)
                )
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
                assert row is not None
                pid = row[0]
                prepared = tuple(
                    n for (n,) in conn.execute("SELECT name FROM pg_prepared_statements")
                )
                listening = tuple(c for (c,) in conn.execute("SELECT pg_listening_channels()"))
                advisory = tuple(
                    f"{mode} {objid}"
                    for mode, objid in conn.execute(
                        "SELECT mode, objid FROM pg_locks WHERE locktype = 'advisory'"
                        " AND pid = pg_backend_pid()"
                    )
                )
                seen[pid] = Backend(pid, prepared, listening, advisory)
        return sorted(seen.values(), key=lambda b: b.pid)


@pytest.fixture(scope="session")
def pgbouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """The worker's PgBouncer, in front of its ``postgres_server``."""
    bouncer = PgBouncer(postgres_server)
    yield bouncer
    bouncer.remove()
