"""Real web servers for the HTTP middleware tests: uvicorn and gunicorn serving the test apps of
``tests/support/http_apps`` in processes of their own, on free loopback ports.

- ``HttpServer`` starts one (``uvicorn --workers N`` or gunicorn's sync workers), waits until it
  answers ``GET /health``, and stops it (SIGTERM, then SIGKILL for whatever is left of its
  process group), also when the test fails: use it as a context manager.
- ``Deployment`` names what a test module serves (server, app, workers, store), and ``serve``
  starts it with its effects file, release file and options: a ``Served``, which a test talks
  to (``client()``, ``runs(key)``, ``holding()``).

Each server runs in a session (process group) of its own, logs to a file, and is told where its
store is (``IDEMFN_STORE``), where handler runs are written (``IDEMFN_TEST_EFFECTS``) and the
middleware's options (``IDEMFN_HTTP_OPTIONS``), as ``tests/support/http_apps/shared.py`` reads
them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from .servers import PostgresServer, RedisServer
from .workers import ROOT, lines, poll, process_alive

__all__ = [
    "APPS",
    "Deployment",
    "HttpServer",
    "Served",
    "ServerExited",
    "http_client",
    "serve",
    "store_location",
]

# The factory of each app: the ASGI ones for uvicorn, the WSGI ones for gunicorn. Factories, so
# that importing the modules (pytest's doctest collection imports every one) opens no store and
# sets no Django up in the test process.
APPS: dict[str, str] = {
    "starlette": "tests.support.http_apps.starlette_app:create",
    "fastapi": "tests.support.http_apps.fastapi_app:create",
    "flask": "tests.support.http_apps.flask_app:create",
    "django": "tests.support.http_apps.django_site.wsgi:create",
    "django-asgi": "tests.support.http_apps.django_site.asgi:create",
    # idemfn.prometheus's multiprocess test (gunicorn, configured by the same module)
    "prometheus": "tests.support.prometheus_app:create",
}
SERVERS = ("uvicorn", "gunicorn")

# Generous: a server's workers import the app, idemfn and a store's client on a busy machine.
START_TIMEOUT = 60.0
# A held request must outlive its waits: gunicorn kills a sync worker silent for --timeout.
WORKER_TIMEOUT = 120
# How long a stopping server may finish its requests before it is killed.
GRACE = 5


def http_client(url: str, **options: Any) -> httpx.Client:
    """A client of the server at ``url``: plain HTTP, so no certificates to load (httpx loads
    them for each client it makes unless told not to: 20 ms of CPU a client)."""
    options.setdefault("timeout", 60.0)
    return httpx.Client(base_url=url, verify=False, **options)


class ServerExited(AssertionError):
    """The server's master process exited while it was expected to serve."""


def _free_port() -> int:
    # The port is free when the socket closes; another process may take it before the server
    # binds it (rare): HttpServer then starts again on another.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _argv(server: str, app: str, workers: int, port: int) -> list[str]:
    target = APPS[app]
    if server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            str(GRACE),
        ]
    if server == "gunicorn":
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{port}",
            "--timeout",
            str(WORKER_TIMEOUT),
            "--graceful-timeout",
            str(GRACE),
            f"{target}()",
        ]
    raise ValueError(f"server must be one of {SERVERS}, not {server!r}")


def _serves(pid: int) -> bool:
    # uvicorn's supervisor also starts multiprocessing's resource tracker, which serves nothing.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"multiprocessing.resource_tracker" not in cmdline


class HttpServer:
    """``server`` (uvicorn or gunicorn) serving ``app`` (a name of ``APPS``) with ``workers``
    worker processes on a free port of 127.0.0.1, its environment ``env`` added to this
    process's, its output in ``log``.

    Ready when it is built: ``GET /health`` answered and every worker started. ``url`` reaches
    it; ``pid`` is its master process; ``worker_pids()`` the processes that serve requests.
    """

    def __init__(
        self,
        server: str,
        app: str,
        *,
        workers: int,
        env: Mapping[str, str],
        log: Path,
        timeout: float = START_TIMEOUT,
    ) -> None:
        self.server = server
        self.app = app
        self.workers = workers
        self.log = log
        # uvicorn --workers 1 serves in its own process, without a supervisor.
        self._serves_itself = server == "uvicorn" and workers == 1
        environ = {**os.environ, **env}
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p
        )
        for attempt in range(5):
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.argv = _argv(server, app, workers, port)
            start = log.stat().st_size if log.exists() else 0
            with log.open("ab") as out:
                self.process = subprocess.Popen(
                    self.argv,
                    cwd=ROOT,
                    env=environ,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_ready(timeout)
                return
            except BaseException as exc:
                self.stop()  # never leave a server that was not handed to the test running
                clash = "address already in use" in self.output(start).lower()
                if isinstance(exc, ServerExited) and clash and attempt < 4:
                    continue  # another process took the port first: another one
                raise

    @property
    def pid(self) -> int:
        """The master process (uvicorn's supervisor or gunicorn's arbiter)."""
        return self.process.pid

    def output(self, start: int = 0) -> str:
        """The server's log, from byte ``start``."""
        try:
            with self.log.open("rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise ServerExited(
                f"{self.server} serving {self.app} exited ({self.process.returncode}):"
                f" {' '.join(self.argv)}\n--- server log ---\n{self.output()[-6000:]}"
            )

    def _wait_ready(self, timeout: float) -> None:
        def answers() -> bool:
            self._check_running()
            try:
                response = client.get("/health")
            except httpx.TransportError:
                return False
            return response.status_code == 200 and response.text == "ok"

        def all_workers() -> bool:
            self._check_running()
            return len(self.worker_pids()) == self.workers

        try:
            with http_client(self.url, timeout=5) as client:
                poll(answers, f"{self.server} to answer GET {self.url}/health", timeout)
            poll(all_workers, f"{self.server}'s {self.workers} workers", timeout)
        except ServerExited:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server log ---\n{self.output()[-6000:]}") from None

    def worker_pids(self) -> list[int]:
        """The live processes that serve requests: the master's children (its only process
        for uvicorn with one worker)."""
        if self._serves_itself:
            return [self.pid] if process_alive(self.pid) else []
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return []
        return [pid for pid in map(int, text.split()) if process_alive(pid) and _serves(pid)]

    def kill_worker(self, pid: int) -> None:
        """SIGKILL the worker ``pid`` (one of ``worker_pids()``: never another process)."""
        assert pid in self.worker_pids(), (pid, self.worker_pids())
        os.kill(pid, signal.SIGKILL)

    def wait_workers(self, without: int | None = None, timeout: float = START_TIMEOUT) -> None:
        """Wait until the server has all its workers again, ``without`` the one killed."""

        def replaced() -> bool:
            self._check_running()
            pids = self.worker_pids()
            return len(pids) == self.workers and without not in pids

        poll(replaced, f"{self.server} to replace worker {without}", timeout)

    def stop(self) -> None:
        """SIGTERM the master, wait for it (it waits up to ``GRACE`` s for its requests), then
        SIGKILL whatever is left of its process group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=GRACE + 25)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class Deployment:
    """What a test module serves: ``server`` running ``app`` with ``workers`` processes on
    ``store`` ("disk", "memory", "redis" or "postgres"), with the middleware's ``options``."""

    server: str
    app: str
    workers: int
    store: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.server}-{self.app}-{self.store}"

    @property
    def asgi(self) -> bool:
        return self.server == "uvicorn"


@dataclass
class Served:
    """A running ``Deployment`` and what a test needs to talk to it."""

    deployment: Deployment
    server: HttpServer
    effects: Path
    release: Path

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, **options: Any) -> httpx.Client:
        """A client of the server (generous timeouts: the machine may be busy)."""
        return http_client(self.url, **options)

    def aclient(self, **options: Any) -> httpx.AsyncClient:
        """An async client of the server, with room for many concurrent connections."""
        options.setdefault("timeout", 60.0)
        options.setdefault("limits", httpx.Limits(max_connections=200))
        return httpx.AsyncClient(base_url=self.url, verify=False, **options)

    def lines(self) -> list[dict[str, Any]]:
        """Every handler run so far, in order: ``{"key", "scope", "pid", "path"}``."""
        return [json.loads(line) for line in lines(self.effects)]

    def runs(self, key: str) -> list[dict[str, Any]]:
        """The handler runs of requests that carried ``key`` in the key header."""
        return [line for line in self.lines() if line["key"] == key]

    def wait_run(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first run of ``key``, once the handler has started it."""
        return poll(lambda: self.runs(key), f"the handler to start for key {key!r}", timeout)[0]

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """While inside, ``?hold=1`` requests wait in the handler; on leaving (also on failure)
        they go on. Tests of one server run one after the other, so one release file does."""
        self.release.unlink(missing_ok=True)
        try:
            yield
        finally:
            self.release.touch()


def store_location(kind: str, directory: Path, request: pytest.FixtureRequest) -> str:
    """Where a server's store is (``IDEMFN_STORE``): a directory of its own in ``directory``
    (disk), this process's ``memory://`` (one process only), or the session's redis-server or
    PostgreSQL cluster (the tests' keys are unique, so servers share them)."""
    if kind == "disk":
        return str(directory / "store")
    if kind == "memory":
        return "memory://"
    if kind == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        return redis.url
    if kind == "postgres":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        return f"postgresql://postgres@/postgres?host={pg.socket_dir}"
    raise ValueError(f"unknown store kind {kind!r}")


@contextlib.contextmanager
def serve(
    deployment: Deployment,
    directory: Path,
    store: str,
    *,
    bare: bool = False,
    env: Mapping[str, str] | None = None,
) -> Iterator[Served]:
    """Serve ``deployment`` with its store at ``store`` (a directory or URL), its files in
    ``directory``; stopped on leaving. ``bare``: the app without the middleware."""
    effects = directory / "effects"
    release = directory / "release"
    release.touch()  # nothing is held until a test says so
    environ = {
        "IDEMFN_STORE": store,
        "IDEMFN_TEST_EFFECTS": str(effects),
        "IDEMFN_TEST_RELEASE": str(release),
        "IDEMFN_HTTP_OPTIONS": json.dumps(dict(deployment.options)),
        **({"IDEMFN_HTTP_BARE": "1"} if bare else {}),
        **(env or {}),
    }
    with HttpServer(
        deployment.server,
        deployment.app,
        workers=deployment.workers,
        env=environ,
        log=directory / f"{deployment.server}.log",
    ) as server:
        try:
            yield Served(deployment, server, effects, release)
        finally:
            release.touch()  # a held request must not keep the server from stopping
