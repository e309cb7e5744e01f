"""Real database servers for the tests, started by the suite itself and stopped after it.

``redis-server`` is Debian's package (the README's test command installs it when missing);
PostgreSQL is the version 15 binaries on the machine (``initdb``, ``pg_ctl``), run as user
``postgres`` when the tests run as root. Both listen on unix sockets in temporary directories
only. A missing server fails the tests that need it, loudly: a skipped store test would let a
broken store land.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "RedisServer", "postgres_server", "redis_server"]


class RedisServer:
    """A ``redis-server`` on a unix socket; ``url`` reaches it; ``restart()`` restarts it."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: `apt-get install redis-server` (the README's"
                " test command does it)"
            )
        self.binary = binary
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Tests stop it (SIGSTOP): in the suite's process group, the kernel would continue it
            # when any `idemfn run` command there exits (the group is orphaned, and a stopped
            # member of an orphaned group gets SIGHUP and SIGCONT).
            start_new_session=True,
        )
        give_up = time.monotonic() + 20
        import redis

        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            with contextlib.suppress(redis.RedisError, OSError):
                if self.socket.exists() and redis.Redis(unix_socket_path=str(self.socket)).ping():
                    return
            if time.monotonic() > give_up:
                raise RuntimeError("redis-server did not start within 20 s")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)),
        None,
    )
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed (the PostgreSQL 15 server binaries)")
    return found


class PostgresServer:
    """A PostgreSQL cluster of its own on a unix socket; ``dsn`` reaches it."""

    def __init__(self) -> None:
        # Under /tmp, not pytest's 0700 directories: the server runs as user postgres.
        self.directory = Path(tempfile.mkdtemp(prefix="idemfn-pg-"))
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "sock"
        self.socket_dir.mkdir()
        as_root = os.geteuid() == 0
        if as_root:
            os.chmod(self.directory, 0o755)
            shutil.chown(self.directory, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        self._pg_ctl = _pg_binary("pg_ctl")
        subprocess.run(
            [
                *self._prefix,
                _pg_binary("initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.dsn = f"host={self.socket_dir} user=postgres dbname=postgres"
        self.start()

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self._prefix, self._pg_ctl, "-D", str(self.data), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self) -> None:
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._ctl("-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.remove()
