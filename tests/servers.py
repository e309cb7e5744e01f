"""Real database servers for the tests, started by the suite itself and stopped after it.

``redis-server`` is Debian's package (the README's test command installs it when missing); it
listens on a unix socket in a temporary directory only. A missing server fails the tests that
need it, loudly: a skipped store test would let a broken store land.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_server"]


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
            [self.binary, "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--daemonize", "no", "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
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
