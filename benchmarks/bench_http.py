#!/usr/bin/env python
"""The HTTP middlewares (issue 17) on real servers, every figure against its target in one run.

    python benchmarks/bench_http.py                  # full run (about 2 minutes on 2 cores)
    python benchmarks/bench_http.py --quick          # a short run (under a minute)
    python benchmarks/bench_http.py --stores disk,redis --frameworks starlette,flask
    python benchmarks/bench_http.py --json out.json  # also keep every request's time
    python benchmarks/bench_http.py --profile        # where a request's time goes, in process

Starts its own ``redis-server`` and PostgreSQL cluster (``bench_stores.py``'s, unix sockets),
then one server per app and configuration on loopback ports, each its own process tree:
uvicorn serving ``benchmarks/http_apps/starlette_app.py``, gunicorn (4 sync workers) serving
``flask_app.py`` and the Django project ``django_site``, each bare (no middleware), with
idemfn's middleware on a ``DiskStore`` (a temporary directory), a ``RedisStore`` and a
``PostgresStore``, and with the framework's peer (``asgi-idempotency-header`` on Starlette,
``django-idempotency-key`` on Django, both on the same redis-server). Then:

- **latency**: one persistent httpx client per server, requests one at a time: the bare route,
  a first request (a new key each time) and a replay (keys recorded in the warm-up), per store;
  beside them one store first call in this process on the same store kind (``idemfn.begin`` +
  ``complete``, and ``abegin`` + ``acomplete``). In each round every series makes one call in
  turn, ``requests`` times over, in an order shuffled each round, after a warm-up round; a
  round's figure is the median of its calls, a series' figure the median of its rounds.
- **duplicates**: 50 concurrent requests with one key (50 connections, asyncio + httpx) on a
  route whose handler appends a line to a file outside every store, then takes 50 ms: the
  handler's runs per round, for idemfn and each peer.

Targets (issue 17): a replay costs no more than the bare route; a first request at most the bare
route plus 1.3x one store first call; one handler run per key (the peers' counts as measured).
Printed beside each figure, never asserted (exit code 0). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stores import postgres_server, redis_server  # the servers the other benchmarks use

import idemfn
from idemfn import DiskStore, PostgresStore, RedisStore, Store

ROOT = Path(__file__).resolve().parent.parent  # where ``benchmarks.http_apps`` imports from
BODY = b'{"item": "book", "qty": 2}'
DUPLICATES = 50
STORES = {"disk": "DiskStore", "redis": "RedisStore", "postgres": "PostgresStore"}
FRAMEWORKS = ("starlette", "flask", "django")
PEERS = {"starlette": "asgi-idempotency-header", "django": "django-idempotency-key"}


@dataclass
class Settings:
    rounds: int  # latency rounds, after one warm-up round
    requests: int  # requests per series per round
    duplicate_rounds: int


FULL = Settings(rounds=15, requests=80, duplicate_rounds=5)
QUICK = Settings(rounds=5, requests=20, duplicate_rounds=2)


# --------------------------------------------------------------------------------------------
# Servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One HTTP server process tree: a framework's app in one configuration."""

    framework: str  # starlette, flask, django
    system: str  # bare, idemfn, or the peer's name
    store: str  # "" (bare), DiskStore, RedisStore, PostgresStore
    mode: str  # BENCH_HTTP_MODE
    where: str  # BENCH_HTTP_STORE
    workers: int = 1
    port: int = 0
    runs: Path = Path()
    log: Path = Path()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        name = "bare route" if self.system == "bare" else self.system
        return f"{name} {self.store}".strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, tmp: Path) -> None:
        self.port = _free_port()
        slug = f"{self.framework}-{self.system}-{self.store or 'none'}-{self.workers}"
        self.runs = tmp / f"runs-{slug}.txt"
        self.runs.touch()
        self.log = tmp / f"server-{slug}.log"
        address = f"127.0.0.1:{self.port}"
        if self.framework == "starlette":
            argv = [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.http_apps.starlette_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
        else:
            app = {
                "flask": "benchmarks.http_apps.flask_app:app",
                "django": "benchmarks.http_apps.django_site.wsgi:application",
            }[self.framework]
            argv = [
                sys.executable,
                "-m",
                "gunicorn",
                app,
                "--bind",
                address,
                "--workers",
                str(self.workers),
                "--log-level",
                "warning",
            ]
        path = os.environ.get("PYTHONPATH", "")  # a checkout given this way comes first
        env = os.environ | {
            "PYTHONPATH": f"{path}{os.pathsep}{ROOT}" if path else str(ROOT),
            "BENCH_HTTP_MODE": self.mode,
            "BENCH_HTTP_STORE": self.where,
            "BENCH_HTTP_RUNS": str(self.runs),
            "DJANGO_SETTINGS_MODULE": "benchmarks.http_apps.django_site.settings",
        }
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.framework} {self.label} exited:\n{self.log.read_text()}")
            try:
                httpx.get(f"{self.url}/orders", timeout=2.0)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.framework} {self.label} not ready in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # uvicorn's and gunicorn's parent stop their workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # its own session: only this server's processes
                self.proc.wait()


# Worker processes of the servers. Uvicorn's latency servers run one: with --workers 2 uvicorn
# binds the listening socket itself without naming the protocol (socket.socket(family)), so
# asyncio does not set TCP_NODELAY on the connections it accepts (it checks
# sock.proto == IPPROTO_TCP), and a response's body, sent after its headers, waits for the
# client's delayed ACK: 40 ms per request on a kept-alive connection. The duplicates part, where
# that changes no count, runs uvicorn with 2 workers. Gunicorn's sync workers answer each request
# on a new connection, which Linux ACKs at once.
UVICORN_LATENCY, UVICORN_DUPLICATES, GUNICORN = 1, 2, 4


def servers_for(
    frameworks: list[str], stores: list[str], where: dict[str, str], django_ok: bool
) -> tuple[list[Server], list[Server]]:
    """The latency part's servers, and the duplicates part's (gunicorn's are the same)."""
    latency: list[Server] = []
    duplicates: list[Server] = []
    for framework in frameworks:
        if framework == "django" and not django_ok:
            continue
        workers = UVICORN_LATENCY if framework == "starlette" else GUNICORN
        guarded = [Server(framework, "idemfn", STORES[k], "idemfn", where[k]) for k in stores]
        if framework in PEERS:
            guarded.append(
                Server(framework, PEERS[framework], "RedisStore", "peer", where["redis"])
            )
        latency.append(Server(framework, "bare", "", "bare", "", workers))
        for server in guarded:
            server.workers = workers
            latency.append(server)
            if framework == "starlette":
                server = dataclasses.replace(server, workers=UVICORN_DUPLICATES)
            duplicates.append(server)
    return latency, duplicates


# --------------------------------------------------------------------------------------------
# Latency series


SYNC_FIRST, ASYNC_FIRST = "begin + complete", "abegin + acomplete"


@dataclass
class Series:
    """Requests (or store calls) timed one at a time; ``batch(n)`` gives n timings in µs."""

    framework: str  # or "in-process" for the store calls
    system: str
    store: str
    kind: str  # bare, first, replay, SYNC_FIRST, ASYNC_FIRST
    batch: Callable[[int], list[float]]
    rounds: list[list[float]] = field(default_factory=list)
    tight: list[list[float]] = field(default_factory=list)  # store calls in a tight loop
    unexpected: Counter[str] = field(default_factory=Counter)

    @property
    def name(self) -> str:
        return f"{self.framework} / {self.system} {self.store} / {self.kind}".replace("  ", " ")

    @property
    def medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]

    @property
    def value(self) -> float:
        return statistics.median(self.medians)

    @property
    def tight_value(self) -> float:
        """The median of the tight loops' medians (store series only)."""
        return statistics.median(statistics.median(r) for r in self.tight)

    @property
    def spread(self) -> str:
        values = self.medians
        m = statistics.median(values)
        return f"-{(m - min(values)) / m:.0%}/+{(max(values) - m) / m:.0%}"


# httpx writes a request's headers and its body in two sends and, unlike urllib3 (requests) and
# browsers, leaves Nagle's algorithm on: the body then waits for the server's delayed ACK of the
# headers, 40 ms on Linux, on every request of a kept-alive connection.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _transport() -> httpx.HTTPTransport:
    return httpx.HTTPTransport(socket_options=NODELAY)


def _keys() -> Iterator[str]:
    while True:
        yield str(uuid.uuid4())


def http_series(server: Server, replay_keys: int = 16) -> list[Series]:
    """The server's series: bare for a bare server, first and replay for the others."""
    client = httpx.Client(base_url=server.url, timeout=30.0, transport=_transport())
    url = "/orders"
    headers = {"content-type": "application/json"}
    fresh = _keys()

    def timed(
        make_key: Callable[[], str], series: Series, replayed: bool
    ) -> Callable[[int], list[float]]:
        def batch(n: int) -> list[float]:
            out: list[float] = []
            for _ in range(n):
                h = headers | {"idempotency-key": make_key()}
                t0 = time.perf_counter_ns()
                r = client.post(url, content=BODY, headers=h)
                out.append((time.perf_counter_ns() - t0) / 1000)
                if r.status_code != 201:
                    series.unexpected[f"status {r.status_code}"] += 1
                elif (
                    replayed
                    and server.system != "django-idempotency-key"  # (it marks no replay)
                    and r.headers.get("idempotent-replayed") != "true"
                ):
                    series.unexpected["not marked replayed"] += 1
            return out

        return batch

    made: list[Series] = []
    if server.system == "bare":
        s = Series(server.framework, "bare route", "", "bare", lambda n: [])
        s.batch = timed(lambda: next(fresh), s, False)
        return [s]
    first = Series(server.framework, server.system, server.store, "first", lambda n: [])
    first.batch = timed(lambda: next(fresh), first, False)
    recorded = [next(fresh) for _ in range(replay_keys)]
    for key in recorded:
        r = client.post(url, content=BODY, headers=headers | {"idempotency-key": key})
        if r.status_code != 201:
            raise RuntimeError(f"{server.framework} {server.label}: {r.status_code} {r.text}")
    cycle = iter(recorded * 10**6)
    replay = Series(server.framework, server.system, server.store, "replay", lambda n: [])
    replay.batch = timed(lambda: next(cycle), replay, True)
    made += [first, replay]
    return made


def store_series(kind: str, store: Store, loop: asyncio.AbstractEventLoop) -> list[Series]:
    """One store first call in this process: ``idemfn.begin`` + ``complete`` of a new key
    (a fingerprint and a value the size of the middleware's), and the same awaited."""
    fingerprint = "http1:" + "0" * 64
    value = b'{"status":201,"headers":[["content-type","application/json"]],"kept":true}\n' + BODY
    fresh = _keys()

    def batch(n: int) -> list[float]:
        out: list[float] = []
        for _ in range(n):
            key = f"http::{next(fresh)}"
            t0 = time.perf_counter_ns()
            claim = idemfn.begin(key, store=store, fingerprint=fingerprint)
            assert isinstance(claim, idemfn.Claim)
            with claim:
                claim.complete(value)
            out.append((time.perf_counter_ns() - t0) / 1000)
        return out

    async def abatch(n: int) -> list[float]:
        out: list[float] = []
        for _ in range(n):
            key = f"http::{next(fresh)}"
            t0 = time.perf_counter_ns()
            claim = await idemfn.abegin(key, store=store, fingerprint=fingerprint)
            assert isinstance(claim, idemfn.Claim)
            async with claim:
                await claim.acomplete(value)
            out.append((time.perf_counter_ns() - t0) / 1000)
        return out

    name = STORES[kind]
    return [
        Series("in-process", "idemfn", name, SYNC_FIRST, batch),
        Series(
            "in-process",
            "idemfn",
            name,
            ASYNC_FIRST,
            lambda n: loop.run_until_complete(abatch(n)),
        ),
    ]


def run_latency(series: list[Series], settings: Settings, block: int) -> None:
    """Rounds of interleaved turns: each round, every series in turn makes ``block`` calls
    (requests, or store calls) one at a time, until each made ``requests``, in an order
    shuffled each round; so a load that drifts (a shared machine) hits every series alike.
    Then each store series runs its calls in a tight loop too (``tight``), as bench_stores.py
    does. ``block`` 1: every call follows other servers' calls (caches cold, as in a server
    between sparse requests); 10: most follow their own series' (warm, as back to back)."""
    rng = random.Random(17)
    order = list(series)
    n = settings.requests
    print(f"\nlatency: {settings.rounds} rounds of {n} calls per series, {block} at a turn", end="")
    for r in range(settings.rounds + 1):
        rng.shuffle(order)
        timings: dict[int, list[float]] = {id(s): [] for s in order}
        for _ in range(max(1, (n if r else max(10, n // 2)) // block)):
            for s in order:
                timings[id(s)] += s.batch(block)
        if r:  # round 0 warms up: connections, imports, caches
            for s in order:
                s.rounds.append(timings[id(s)])
                if s.framework == "in-process":
                    s.tight.append(s.batch(n))
        print(".", end="", flush=True)
    print()


# --------------------------------------------------------------------------------------------
# Duplicates


async def _burst(server: Server, key: str) -> Counter[str]:
    limits = httpx.Limits(max_connections=DUPLICATES, max_keepalive_connections=DUPLICATES)
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=NODELAY)
    async with httpx.AsyncClient(base_url=server.url, transport=transport, timeout=60.0) as client:

        async def one() -> str:
            r = await client.post("/slow", content=BODY, headers={"idempotency-key": key})
            replayed = r.headers.get("idempotent-replayed") == "true"
            return f"{r.status_code}{' replayed' if replayed else ''}"

        return Counter(await asyncio.gather(*(one() for _ in range(DUPLICATES))))


def run_duplicates(servers: list[Server], settings: Settings) -> dict[str, Any]:
    print(f"\nduplicates: {DUPLICATES} concurrent requests with one key, handler ~50 ms")
    out: dict[str, Any] = {}
    for server in servers:
        if server.system == "bare":
            continue
        runs: list[int] = []
        answers: Counter[str] = Counter()
        for _ in range(settings.duplicate_rounds):
            key = str(uuid.uuid4())
            answers += asyncio.run(_burst(server, key))
            runs.append(server.runs.read_text().split().count(key))
        name = f"{server.framework} / {server.label}"
        out[name] = {"runs": runs, "answers": dict(answers), "system": server.system}
        print(f"  {name:<52} runs per round {runs}  answers {dict(sorted(answers.items()))}")
    return out


# --------------------------------------------------------------------------------------------
# --profile: where a request's time goes, in this process, without a server


def _asgi_scope(key: str) -> dict[str, Any]:
    """The scope uvicorn gives the Starlette app for the benchmark's request (httpx's headers)."""
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"user-agent", b"python-httpx/0.28.1"),
        (b"content-type", b"application/json"),
        (b"idempotency-key", key.encode()),
        (b"content-length", str(len(BODY)).encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


def _wsgi_environ(key: str) -> dict[str, Any]:
    """The environ gunicorn gives the Flask app for the benchmark's request."""
    import io

    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/orders",
        "QUERY_STRING": "",
        "RAW_URI": "/orders",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_ACCEPT": "*/*",
        "HTTP_ACCEPT_ENCODING": "gzip, deflate",
        "HTTP_CONNECTION": "keep-alive",
        "HTTP_USER_AGENT": "python-httpx/0.28.1",
        "HTTP_IDEMPOTENCY_KEY": key,
        "wsgi.input": io.BytesIO(BODY),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


class _Driver:
    """Calls an app as its server would, one request at a time, in this process."""

    def __init__(self, framework: str, app: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.framework = framework
        self.app = app
        self.loop = loop

    def request(self, key: str) -> int:
        if self.framework == "starlette":
            return self.loop.run_until_complete(self._asgi(key))
        status: list[str] = []

        def start_response(line: str, headers: list[Any], exc_info: Any = None) -> Any:
            status.append(line)
            return lambda chunk: None

        result = self.app(_wsgi_environ(key), start_response)
        b"".join(result)
        close = getattr(result, "close", None)
        if close is not None:
            close()
        return int(status[0].split()[0])

    async def _asgi(self, key: str) -> int:
        sent: list[dict[str, Any]] = []
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if given:
                await asyncio.Event().wait()  # a server's receive blocks until the disconnect
            given = True
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(_asgi_scope(key), receive, send)
        return int(sent[0]["status"])

    def timed(
        self, keys: Iterator[str], n: int, between: Callable[[], object] | None = None
    ) -> float:
        """Median µs of ``n`` requests (``between`` runs untimed before each)."""
        out: list[float] = []
        for _ in range(n):
            if between is not None:
                between()
            key = next(keys)
            t0 = time.perf_counter_ns()
            status = self.request(key)
            out.append((time.perf_counter_ns() - t0) / 1000)
            if status != 201:
                raise RuntimeError(f"{self.framework}: {status} in the profile's driver")
        return statistics.median(out)


# What a first request's or a replay's phases are timed as: these functions of idemfn's driver
# modules (and HttpOptions.identify), wrapped for the profile. They are idemfn's internals: a
# name that is gone is left out (the "rest" row takes its time).
_PHASES = {
    "starlette": ("read_key", "_read_body", "astart", "asettle", "outcome", "_respond"),
    "flask": ("read_key", "_read_body", "start", "settle", "outcome", "_respond"),
}


@contextlib.contextmanager
def _phase_timers(framework: str, middleware: Any, totals: Counter[str]) -> Iterator[None]:
    import functools
    import inspect

    from idemfn._http import options as http_options

    module = sys.modules[type(middleware).__module__]
    undo: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str, asynchronous: bool = False) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        if asynchronous or inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def awrapped(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter_ns()
                try:
                    return await original(*args, **kwargs)
                finally:
                    totals[label] += time.perf_counter_ns() - t0

            setattr(owner, name, awrapped)
        else:

            @functools.wraps(original)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter_ns()
                try:
                    return original(*args, **kwargs)
                finally:
                    totals[label] += time.perf_counter_ns() - t0

            setattr(owner, name, wrapped)
        undo.append((owner, name, original))

    for name in _PHASES[framework]:
        wrap(module, name, name)
    wrap(http_options.HttpOptions, "identify", "identify")
    wrap(middleware, "app", "app", asynchronous=framework == "starlette")
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def _phases(driver: _Driver, middleware: Any, keys: Iterator[str], n: int) -> dict[str, float]:
    """The median µs of each phase over ``n`` requests, and of the whole request (``rest``:
    each request's time outside the phases, the middleware's own code between them and the
    driver's call). Medians of each, so they need not add up to the total's."""
    totals: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    with _phase_timers(driver.framework, middleware, totals):
        for _ in range(n):
            totals.clear()
            t0 = time.perf_counter_ns()
            driver.request(next(keys))
            total = time.perf_counter_ns() - t0
            one = {name: ns / 1000 for name, ns in totals.items()}
            # ASGI: the response is recorded as the app sends its body, inside "app"
            if "app" in one:
                one["app"] -= one.get("asettle", 0.0)
            one["rest"] = total / 1000 - sum(one.values())
            samples.append({"total": total / 1000} | one)
    return {name: statistics.median(s[name] for s in samples) for name in samples[0]}


def _guarded(framework: str, app: Any) -> Any:
    """idemfn's middleware inside the built app (Starlette builds its stack on first call)."""
    if framework == "flask":
        return app.wsgi_app
    found = app.middleware_stack
    while found is not None and type(found).__module__ != "idemfn.asgi":
        found = getattr(found, "app", None)
    return found


def run_profile(stores: dict[str, Store], settings: Settings, cprofile: bool) -> dict[str, Any]:
    """Where a request's time goes, with the apps called in this process by a raw driver: the
    bare app, a first request and a replay, the store's first call, the bare app right after a
    store's first call (its caches cold), and each phase of the middleware's requests."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.http_apps import flask_app, starlette_app

    rounds, n = (3, 100) if settings is QUICK else (7, 300)
    loop = asyncio.new_event_loop()
    out: dict[str, Any] = {}
    print(f"\nprofile: in this process, raw ASGI/WSGI calls; medians of {rounds} rounds of {n}")
    for framework, module in (("starlette", starlette_app), ("flask", flask_app)):
        for kind, store in stores.items():
            name = f"{framework} / {STORES[kind]}"
            print(f"  {name}")
            out[name] = _profile_one(framework, module, kind, store, loop, rounds, n, cprofile)
    loop.close()
    return out


def _profile_one(
    framework: str,
    module: Any,
    kind: str,
    store: Store,
    loop: asyncio.AbstractEventLoop,
    rounds: int,
    n: int,
    cprofile: bool,
) -> dict[str, Any]:
    bare = _Driver(framework, module.build("bare").__call__, loop)
    bare.request("warm")
    app = module.build("idemfn", store)
    guarded = _Driver(framework, app.__call__, loop)
    guarded.request(str(uuid.uuid4()))  # builds Starlette's stack
    middleware = _guarded(framework, app)
    recorded = [str(uuid.uuid4()) for _ in range(16)]
    for key in recorded:
        guarded.request(key)
    replays = iter(recorded * 10**6)
    fresh = _keys()
    one = store_series(kind, store, loop)[1 if framework == "starlette" else 0]  # as called

    def store_first() -> None:
        one.batch(1)

    one_call = f"store first call ({'awaited' if framework == 'starlette' else 'sync'})"
    measures: dict[str, Callable[[], float]] = {
        "bare app": lambda: bare.timed(fresh, n),
        "first request": lambda: guarded.timed(fresh, n),
        "replay": lambda: guarded.timed(replays, n),
        one_call: lambda: statistics.median(one.batch(n)),
        "bare app after a store first call": lambda: bare.timed(fresh, n, store_first),
    }
    rows: dict[str, list[float]] = {label: [] for label in measures}
    for _ in range(rounds):
        for label, measure in measures.items():
            rows[label].append(measure())
    figures = {label: statistics.median(v) for label, v in rows.items()}
    first = _phases(guarded, middleware, fresh, n * 2)
    replay = _phases(guarded, middleware, replays, n * 2)
    for label, value in figures.items():
        print(f"    {label:<40}{value:>8.1f} µs")
    b = figures["bare app"]
    over = figures["first request"] - b
    print(
        f"    first - bare {over:.1f} µs = {over / figures[one_call]:.2f}x the store first call;"
        f" replay - bare {figures['replay'] - b:+.1f} µs"
    )
    for title, phases in (("first request", first), ("replay", replay)):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if k != "total")
        print(f"    {title} phases, medians (µs; whole request {phases['total']:.1f}): {parts}")
    if cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n * 2):
            guarded.request(next(fresh))
        profiler.disable()
        print(f"    cProfile, {n * 2} first requests, by own time:")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    return {"figures": figures, "first phases": first, "replay phases": replay}


# --------------------------------------------------------------------------------------------
# The table


@dataclass
class Figure:
    part: str
    name: str
    value: float
    unit: str
    target: str = ""  # "<= 1.3", "== 1", ...
    met: bool | None = None
    detail: str = ""


def _line(f: Figure) -> str:
    met = {None: "", True: "met", False: "MISSED"}[f.met]
    return f"  {f.name:<56}{f.value:>9.2f} {f.unit:<4}{f.target:>8} {met:<7}{f.detail}"


def figures_of(series: list[Series], duplicates: dict[str, Any]) -> list[Figure]:
    by = {(s.framework, s.system, s.store, s.kind): s for s in series}
    out: list[Figure] = []
    for framework in FRAMEWORKS:
        bare = by.get((framework, "bare route", "", "bare"))
        if bare is None:
            continue
        b = bare.value
        out.append(
            Figure("latency", f"{framework}: bare route", b, "µs", detail=f"spread {bare.spread}")
        )
        for s in series:
            if s.framework != framework or s.system == "bare route":
                continue
            if s.kind == "replay":
                ratio = s.value / b
                target, met = ("<= 1", ratio <= 1.0) if s.system == "idemfn" else ("", None)
                out.append(
                    Figure(
                        "latency",
                        f"{framework}: {s.system} {s.store} replay / bare",
                        ratio,
                        "x",
                        target,
                        met,
                        f"{s.value:.0f} / {b:.0f} µs, spread {s.spread}",
                    )
                )
            elif s.kind == "first":
                over = s.value - b
                # The store first call the middleware makes: awaited in ASGI, sync in WSGI.
                sync = by.get(("in-process", "idemfn", s.store, SYNC_FIRST))
                awaited = by.get(("in-process", "idemfn", s.store, ASYNC_FIRST))
                one, other = (awaited, sync) if framework == "starlette" else (sync, awaited)
                detail = f"{s.value:.0f} - {b:.0f} = {over:.0f} µs, spread {s.spread}"
                if s.system == "idemfn" and one is not None:
                    ratio = over / one.value
                    detail += (
                        f"; {one.kind} {one.value:.0f} µs (in a tight loop {one.tight_value:.0f}:"
                        f" {over / one.tight_value:.2f}x"
                    )
                    if other is not None:
                        detail += f"; {other.kind} {other.value:.0f}: {over / other.value:.2f}x"
                    detail += ")"
                    out.append(
                        Figure(
                            "latency",
                            f"{framework}: idemfn {s.store} (first - bare) / store first call",
                            ratio,
                            "x",
                            "<= 1.3",
                            ratio <= 1.3,
                            detail,
                        )
                    )
                else:
                    out.append(
                        Figure(
                            "latency",
                            f"{framework}: {s.system} {s.store} first / bare",
                            s.value / b,
                            "x",
                            detail=detail,
                        )
                    )
    for s in series:
        if s.framework == "in-process":
            out.append(
                Figure(
                    "store",
                    f"in-process: {s.store} first call, {s.kind}",
                    s.value,
                    "µs",
                    detail=f"spread {s.spread}; in a tight loop {s.tight_value:.0f} µs",
                )
            )
    for name, d in duplicates.items():
        worst = max(d["runs"])
        ours = d["system"] == "idemfn"
        out.append(
            Figure(
                "duplicates",
                f"{name}: handler runs (worst round)",
                worst,
                "runs",
                "== 1" if ours else "",
                (worst == 1 and min(d["runs"]) == 1) if ours else None,
                f"rounds {d['runs']}; answers {dict(sorted(d['answers'].items()))}",
            )
        )
    return out


def _commit() -> str:
    where = Path(idemfn.__file__).resolve().parent.parent
    out = subprocess.run(
        ["git", "-C", str(where), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{out.stdout.strip() or '?'} ({where})"


def _postgres_url(dsn: str) -> str:
    """``bench_stores.postgres_server``'s DSN as the store URL the apps are given."""
    parts = dict(part.split("=", 1) for part in dsn.split())
    return f"postgresql://{parts['user']}@/{parts['dbname']}?host={parts['host']}"


def _django_ready() -> bool:
    try:
        import idemfn.django  # noqa: F401
    except ImportError as exc:
        print(f"(Django not measured: idemfn.django does not import: {exc})")
        return False
    return True


def _csv(value: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = set(chosen) - set(allowed)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown: {','.join(sorted(unknown))}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 minutes)")
    parser.add_argument(
        "--stores", default="disk,redis,postgres", help="some of disk,redis,postgres"
    )
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="some of starlette,flask,django"
    )
    parser.add_argument(
        "--block",
        type=int,
        default=10,
        help="calls a series makes at each turn (default 10; 1: every call after others')",
    )
    parser.add_argument("--no-duplicates", action="store_true", help="skip the duplicates part")
    parser.add_argument("--json", type=Path, help="also write every round here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the servers: where a request's time goes, in this process",
    )
    parser.add_argument("--cprofile", action="store_true", help="with --profile: cProfile too")
    args = parser.parse_args(argv)
    stores = _csv(args.stores, list(STORES))
    frameworks = _csv(args.frameworks, FRAMEWORKS)
    settings = QUICK if args.quick else FULL
    commit = _commit()
    print(f"idemfn at {commit}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(
        f"uvicorn {_version('uvicorn')} (asyncio loop, h11; {UVICORN_LATENCY} worker for"
        f" latency, {UVICORN_DUPLICATES} for duplicates), gunicorn {_version('gunicorn')}"
        f" ({GUNICORN} sync workers: a new connection per request), httpx {_version('httpx')}"
    )
    started = time.perf_counter()
    django_ok = "django" not in frameworks or _django_ready()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idemfn-bench-http-")))
        redis_url = stack.enter_context(redis_server(tmp))
        where = {"disk": str(tmp / "disk"), "redis": redis_url}
        dsn = ""
        if "postgres" in stores:
            dsn = stack.enter_context(postgres_server())
            where["postgres"] = _postgres_url(dsn)
        in_process: dict[str, Store] = {}
        for kind in stores:
            store: Store
            if kind == "disk":
                store = DiskStore(tmp / "in-process-disk")
            elif kind == "redis":
                store = RedisStore(redis_url)
            else:
                store = PostgresStore(dsn)
            in_process[kind] = store
            stack.callback(store.close)
        if args.profile:
            profile = run_profile(in_process, settings, args.cprofile)
            if args.json is not None:
                args.json.write_text(json.dumps({"commit": commit, "profile": profile}, indent=1))
            return 0
        servers, dup_servers = servers_for(frameworks, stores, where, django_ok)
        every = servers + [s for s in dup_servers if s not in servers]
        for server in every:
            stack.callback(server.stop)
            server.start(tmp)
        for server in every:
            server.wait_ready()
        print(f"{len(every)} servers up in {time.perf_counter() - started:.0f} s")
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        series: list[Series] = []
        for server in servers:
            series += http_series(server)
        for kind, store in in_process.items():
            series += store_series(kind, store, loop)
        run_latency(series, settings, args.block)
        duplicates = {} if args.no_duplicates else run_duplicates(dup_servers, settings)
        for s in series:
            if s.unexpected:
                print(f"  unexpected answers, {s.name}: {dict(s.unexpected)}")
    figures = figures_of(series, duplicates)
    print(
        f"\nsummary (idemfn at {commit}, --block {args.block}): µs are medians of rounds' median"
        " calls"
    )
    part = ""
    for f in figures:
        if f.part != part:
            part = f.part
            print(f" {part}")
        print(_line(f))
    missed = [f for f in figures if f.met is False]
    print(f"  {len(missed)} target(s) missed" if missed else "  every target met")
    print(f"({time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f})")
    if args.json is not None:
        data = {
            "commit": commit,
            "settings": settings.__dict__ | {"block": args.block},
            "workers": {"uvicorn": [UVICORN_LATENCY, UVICORN_DUPLICATES], "gunicorn": GUNICORN},
            "figures": [f.__dict__ for f in figures],
            "series": {
                s.name: {"rounds": s.rounds, "tight": s.tight, "unexpected": dict(s.unexpected)}
                for s in series
            },
            "duplicates": duplicates,
        }
        args.json.write_text(json.dumps(data, indent=1))
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
