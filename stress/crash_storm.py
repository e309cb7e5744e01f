#!/usr/bin/env python
"""Crash storm: worker processes call ``@idempotent`` keys while a killer SIGKILLs them.

    python stress/crash_storm.py --store disk --seconds 600 --workers 8 --keys 200 --mode both
    python stress/crash_storm.py --store redis --seconds 60 --workers 4      # starts its own server
    python stress/crash_storm.py --store postgres --url "host=/tmp/pg user=postgres dbname=postgres"

Run it from the repository root. ``--workers`` processes each loop calling one
``@idempotent(key="{key}", lease=--lease, wait=..., on_abandoned=MODE)`` function over random
keys of a shared key set, while the parent SIGKILLs a random worker every 50 to 300 ms
(``--kill-every``) and starts another in its place. The body records evidence in a file of the
worker's own, independently of the store: a ``S key attempt token pid`` line (one ``os.write``
to an ``O_APPEND`` descriptor, atomic for lines under PIPE_BUF) BEFORE its "side effect" (a sleep
of random length, now and then longer than the lease so that the heartbeat has to renew it) and
an ``E key value`` line AFTER it; the body learns its claim's attempt and token from
``fn.status(key)``, which must show the claim as this process's. Each call's outcome is a line
too (returned value, ``Halted``, ``AlreadyRunning``, or any other exception: a violation).

When the time is up the workers are stopped (a stop file, then SIGKILL for those still in a
call half a second later), the claims they left behind are counted (``abandoned=``), and a
*settle pass* in the parent calls every key once more, with no killer and no sleep in the
bodies, which halts (``halt``) or takes over and finishes (``retry``) every abandoned claim.
Then the invariants are checked, from the evidence files and from a store opened afresh in a
process of its own:

- ``--mode halt``: no key's body started more than once; a key recorded ``ok`` ran exactly once,
  and its recorded token is that run's, and no call of it raised ``Halted``; a halted key was
  halted as abandoned and no call of it returned a value; no key gave two different values.
- ``--mode retry``: at most one body started per (key, attempt); every key ends ``ok``, with the
  value of the run of its final attempt, and no body ran in a later attempt than the recorded
  one; no call raised ``Halted``.
- both: no record is left ``processing`` (all its owners are dead); every key has a record; the
  store opens again and a full ``scan()`` finds no corrupt record; for ``disk``, SQLite's
  ``PRAGMA integrity_check`` on ``cache.db`` says ``ok``; no worker died of anything but the
  killer's SIGKILL; ``AlreadyRunning`` never reaches the settle pass.

It prints one summary line per mode, after the first violations found (if any), and exits 1
when there are violations (their evidence is then kept, and its directory printed):

    crash-storm store=disk mode=halt seconds=60 workers=4 calls=... runs=... kills=...
      keys=... ok=... halted=... abandoned=... cut=... takeovers=... violations=0

``calls`` and ``runs`` count the workers' calls and body runs (not the settle pass's);
``kills`` the killer's SIGKILLs; ``keys`` every key of the run; ``ok``/``halted`` the final
records; ``abandoned`` the claims left ``processing`` when the workers stopped; ``cut`` the
bodies a kill interrupted between their two evidence lines; ``takeovers`` the retried attempts
(sum of ``attempt - 1`` over the final records).

Keys: ``--keys`` keys are in play at any moment. With ``--generation S`` (default 4 s) the set
moves on every S seconds (keys ``g<generation>-k<n>``; 15 % of the calls go to a key of an
earlier generation, to replay it or find it abandoned), so that a long run keeps making first
calls, claims and takeovers instead of only replaying 200 finished keys; ``keys=`` then counts
every generation's keys. ``--generation 0`` keeps one fixed set of ``--keys`` keys.

Stores: ``--store disk`` uses a ``DiskStore`` in a temporary directory (or the directory
``--url``); ``redis`` and ``postgres`` start a server of their own as the test suite does
(``tests/servers.py``: Debian's ``redis-server`` on a unix socket; PostgreSQL 15, run as user
``postgres`` when root), or use ``--url`` (a Redis URL; a PostgreSQL URL or connection string).
Every run uses keys under a name of its own (``crash-storm.<run id>.<mode>``) and deletes its
records afterwards unless ``--keep`` or violations.

``--mode both`` runs ``halt`` then ``retry``, ``--seconds`` each. Workers are forked from a
``multiprocessing`` fork server that has idemfn and the store's client library imported
already, so that a replacement worker starts in milliseconds rather than the 0.1 to 0.4 s of a
fresh interpreter (each is still a separate process, with its own store connections, claims
and owner identity). On one host a dead owner is seen at once (pid and start time), so leases
only run out here if a heartbeat fails to renew one.

The parent keeps one store object for the whole run, and checks that the store opens afresh
in a separate process. (The harness found, on 2026-11-22, that a second ``DiskStore`` opening a
directory already open in the same process dropped the first one's SQLite locks; fixed, with a
regression test in tests/stores/test_permissions.py.)

``--sabotage`` is for the test suite only: it makes each worker run the body without
idempotency on its first call and now and then after, to prove that the checker reports
violations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import idemfn
from idemfn import AlreadyRunning, DiskStore, Halted, Status, Store

ROOT = Path(__file__).resolve().parent.parent
Mode = Literal["halt", "retry"]
SABOTAGE_RATE = 0.03  # of the calls, with --sabotage
OLD_GENERATION_RATE = 0.15  # of the calls go to a key of any generation so far
MAX_LINE = 1000  # evidence lines stay far below PIPE_BUF (4096): one atomic O_APPEND write


@dataclasses.dataclass(frozen=True)
class Config:
    """What a worker needs to know; pickled to each worker."""

    kind: str  # disk | redis | postgres
    url: str
    name: str  # the @idempotent name= of this run and mode: its keys' prefix
    mode: Mode
    keys: int
    generation: float
    t0: float  # wall-clock start of the storm: generations count from it
    lease: float
    wait: float
    pause: float
    evidence: str  # directory of the evidence files
    stop: str  # the stop file
    sabotage: bool


def open_store(kind: str, url: str) -> Store:
    """A new store object (never a cached one) for ``kind`` at ``url``."""
    if kind == "disk":
        return DiskStore(url)
    if kind == "redis":
        return idemfn.RedisStore(url)
    if kind == "postgres":
        return idemfn.PostgresStore(url)
    raise ValueError(f"unknown store kind {kind!r}")


class Caller:
    """The decorated function of a run, and the evidence of its calls and runs."""

    def __init__(self, cfg: Config, store: Store, evidence_path: Path) -> None:
        self.cfg = cfg
        self.fd = os.open(evidence_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.rng = random.Random()
        self.pid = os.getpid()
        self.sabotaging = False
        self.sabotaged = 0
        self.slow = True
        self.work: Any = idemfn.idempotent(
            key="{key}",
            name=cfg.name,
            store=store,
            lease=cfg.lease,
            wait=cfg.wait,
            on_abandoned=cfg.mode,
        )(self.body)

    def emit(self, *fields: object) -> None:
        line = " ".join(str(f).replace("\n", " ").replace(" ", "_") for f in fields)
        os.write(self.fd, (line[:MAX_LINE] + "\n").encode())

    def body(self, key: str) -> str:
        record = self.work.status(key)
        if self.sabotaging:  # test only: a "second run" no claim covers
            self.sabotaged += 1
            attempt = record.attempt if record is not None else 1
            token = f"sabotage-{self.pid}-{self.sabotaged}"
        elif record is None:
            attempt, token = 0, "none"
            self.emit("V", key, "the body runs but the key has no record")
        else:
            attempt, token = record.attempt, record.token
            owner = record.owner.split("/")
            if (
                record.status is not Status.PROCESSING
                or len(owner) != 4
                or owner[2] != str(self.pid)
            ):
                self.emit(
                    "V",
                    key,
                    f"the body runs but the record is {record.status.value}"
                    f"_owned_by_{record.owner}_token_{record.token}",
                )
        self.emit("S", key, attempt, token, self.pid)
        self.side_effect()
        value = f"{attempt}/{token}/{self.pid}"
        self.emit("E", key, value)
        return value

    def side_effect(self) -> None:
        if not self.slow:  # the settle pass: no killer to give time to
            return
        luck = self.rng.random()
        if luck < 0.90:
            time.sleep(self.rng.uniform(0, 0.02))
        elif luck < 0.97:
            time.sleep(self.rng.uniform(0.02, 0.2))
        else:  # longer than the lease: only the heartbeat keeps the claim alive
            time.sleep(self.rng.uniform(0.5, 1.25) * self.cfg.lease)

    def call(self, key: str) -> None:
        """One call of ``key``; its outcome goes to the evidence."""
        try:
            # Each worker's first call, then now and then: however few calls a busy machine
            # lets a run make, some are sabotaged.
            sabotage = self.sabotaged == 0 or self.rng.random() < SABOTAGE_RATE
            if self.cfg.sabotage and sabotage:
                self.sabotaging = True
                try:
                    value = self.body(key)
                finally:
                    self.sabotaging = False
            else:
                value = self.work(key)
        except Halted:
            self.emit("H", key)
        except AlreadyRunning:
            self.emit("B", key)
        except Exception as exc:
            self.emit("X", key, f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
        else:
            self.emit("R", key, value)

    def pick(self) -> str:
        cfg, rng = self.cfg, self.rng
        gen = 0
        if cfg.generation > 0:
            gen = max(0, int((time.time() - cfg.t0) / cfg.generation))
            if rng.random() < OLD_GENERATION_RATE:
                gen = rng.randint(0, gen)
        return key_name(gen, rng.randrange(cfg.keys))


def key_name(generation: int, n: int) -> str:
    return f"g{generation}-k{n:04d}"


def worker_main(cfg: Config, seq: int) -> None:
    """A worker process: call random keys until the stop file appears."""
    evidence = Path(cfg.evidence)
    err = os.open(evidence / f"w{seq:06d}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(err, 2)
    os.close(err)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    store = open_store(cfg.kind, cfg.url)
    caller = Caller(cfg, store, evidence / f"w{seq:06d}.log")
    while not os.path.exists(cfg.stop):
        caller.call(caller.pick())
        if cfg.pause:
            time.sleep(caller.rng.uniform(0, cfg.pause))
    store.close()


# --- the parent: servers, the killer, the settle pass, the checks ----------------------------


@contextlib.contextmanager
def server(kind: str, url: str | None, workdir: Path) -> Iterator[str]:
    """The store's URL: ``url``, or a server started here (as tests/servers.py does)."""
    if url is not None:
        yield url
        return
    if kind == "disk":
        yield str(workdir / "store")
        return
    sys.path.insert(0, str(ROOT))  # tests/ is a package of the repository
    try:
        from tests.servers import PostgresServer, RedisServer
    except ImportError as exc:
        sys.exit(
            f"crash-storm: --store {kind} without --url needs tests/servers.py and"
            f" pytest ({exc}); or pass --url"
        )
    try:
        if kind == "redis":
            (workdir / "redis").mkdir()
            redis_server = RedisServer(workdir / "redis")
            try:
                yield redis_server.url
            finally:
                redis_server.stop()
        else:
            pg = PostgresServer()
            try:
                yield pg.dsn
            finally:
                pg.remove()
    except BaseException as exc:  # pytest.fail's Failed is a BaseException
        if type(exc).__name__ == "Failed":
            sys.exit(f"crash-storm: {exc}")
        raise


@dataclasses.dataclass
class Storm:
    """One mode's run: the killer's side."""

    cfg: Config
    workers: int
    seconds: float
    kill_every: tuple[float, float]
    ctx: Any
    procs: dict[int, BaseProcess] = dataclasses.field(default_factory=dict)  # seq -> process
    seq: int = 0
    kills: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)

    def spawn(self) -> None:
        self.seq += 1
        proc = self.ctx.Process(target=worker_main, args=(self.cfg, self.seq), daemon=True)
        proc.start()
        self.procs[self.seq] = proc

    def reap(self, seq: int, expected_kill: bool) -> None:
        proc = self.procs.pop(seq)
        proc.join(10)
        code = proc.exitcode
        if code is None:
            proc.kill()
            proc.join(10)
            code = proc.exitcode
        proc.close()
        if code == 0 or (code == -signal.SIGKILL and expected_kill):
            return
        err = Path(self.cfg.evidence) / f"w{seq:06d}.err"
        tail = err.read_text(errors="replace").strip().splitlines()[-3:] if err.exists() else []
        self.violations.append(
            f"worker w{seq:06d} exited with {code}, not killed by the killer: " + " | ".join(tail)
        )

    def run(self) -> None:
        for _ in range(self.workers):
            self.spawn()
        rng = random.Random()
        end = time.monotonic() + self.seconds
        while True:
            for seq, proc in list(self.procs.items()):
                if proc.exitcode is not None:  # died on its own: a violation
                    self.reap(seq, expected_kill=False)
                    self.spawn()
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, rng.uniform(*self.kill_every)))
            if time.monotonic() >= end:
                break
            seq = rng.choice(list(self.procs))
            pid = self.procs[seq].pid
            assert pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
            self.reap(seq, expected_kill=True)
            self.spawn()

    def stop(self) -> None:
        """A stop file; half a second later, SIGKILL for whoever is still in a call."""
        Path(self.cfg.stop).touch()
        give_up = time.monotonic() + 0.5
        while self.procs and time.monotonic() < give_up:
            for seq, proc in list(self.procs.items()):
                if proc.exitcode is not None:
                    self.reap(seq, expected_kill=False)
            time.sleep(0.02)
        for seq, proc in list(self.procs.items()):  # their claims are left abandoned
            proc.kill()
            self.reap(seq, expected_kill=True)


@dataclasses.dataclass
class Run:
    """A body run, from its S line (and E line, if it got that far)."""

    key: str
    attempt: int
    token: str
    pid: str
    where: str
    ended: bool = False

    def __str__(self) -> str:
        return f"attempt {self.attempt} token {self.token} pid {self.pid} ({self.where})"


@dataclasses.dataclass
class Evidence:
    runs: dict[str, list[Run]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    values: dict[str, Counter[str]] = dataclasses.field(
        default_factory=lambda: defaultdict(Counter)
    )
    halted: Counter[str] = dataclasses.field(default_factory=Counter)
    keys: set[str] = dataclasses.field(default_factory=set)
    calls: int = 0
    body_runs: int = 0
    torn: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def read(self, path: Path, storm: bool) -> None:
        where = path.stem
        data = path.read_bytes().decode(errors="replace")
        lines = data.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif lines:
            # A kill mid-write cut the last line short: it is no evidence of anything (a cut
            # start line was written before the body's side effect, which never happened).
            self.torn += 1
            lines.pop()
        started: dict[tuple[str, str], Run] = {}
        for line in lines:
            kind, _, rest = line.partition(" ")
            fields = rest.split(" ")
            key = fields[0]
            self.keys.add(key)
            if kind == "S" and len(fields) == 4 and fields[1].isdigit():
                run = Run(key, int(fields[1]), fields[2], fields[3], where)
                self.runs[key].append(run)
                started[(key, f"{run.attempt}/{run.token}/{run.pid}")] = run
                self.body_runs += storm
            elif kind == "E" and len(fields) == 2:
                if (key, fields[1]) in started:
                    started[(key, fields[1])].ended = True
            elif kind == "R" and len(fields) == 2:
                self.values[key][fields[1]] += 1
                self.calls += storm
            elif kind == "H":
                self.halted[key] += 1
                self.calls += storm
            elif kind == "B":
                self.calls += storm
                if not storm:
                    self.problems.append(
                        f"key {key}: AlreadyRunning in the settle pass (no"
                        " worker is alive: a claim stuck processing)"
                    )
            elif kind == "X":
                self.calls += storm
                self.problems.append(
                    f"key {key}: unexpected exception in {where}: "
                    + " ".join(fields[1:]).replace("_", " ")
                )
            elif kind == "V":
                self.problems.append(
                    f"key {key}: {where}: " + " ".join(fields[1:]).replace("_", " ")
                )
            elif line:
                self.torn += 1


def integrity_problems(kind: str, url: str) -> list[str]:
    """SQLite's own check of a DiskStore's database."""
    if kind != "disk":
        return []
    db = Path(url) / "cache.db"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [f"store: {db} could not be checked: {exc}"]
    if rows != [("ok",)]:
        return [f"store: PRAGMA integrity_check on {db}: {rows[:5]}"]
    return []


def records_of(store: Store, prefix: str) -> tuple[dict[str, idemfn.Record], list[str]]:
    """Every record under ``prefix``, and the records that cannot be read."""
    corrupt: list[str] = []

    def note(key: str, error: Exception) -> None:
        corrupt.append(f"store: corrupt record {key}: {error}")

    return {e.key: e.record() for e in store.scan(prefix, corrupt=note)}, corrupt


def verify_store(kind: str, url: str, prefix: str) -> tuple[dict[str, idemfn.Record], list[str]]:
    """Run in a fresh process: open the store anew, scan the run's records, and (disk) have
    SQLite check the database. The records and the problems found."""
    store = open_store(kind, url)
    try:
        records, problems = records_of(store, prefix)
    except idemfn.StoreError as exc:
        return {}, [f"store: a full scan failed: {exc}"]
    finally:
        store.close()
    return records, problems + integrity_problems(kind, url)


def check(
    cfg: Config,
    evidence: Evidence,
    records: dict[str, idemfn.Record],
    settled: dict[str, str | None],
) -> list[str]:
    """The invariants, key by key; the violations found."""
    violations = list(evidence.problems)
    prefix = f"{cfg.name}:"
    for stored in records:
        if stored[len(prefix) :] not in settled:
            violations.append(f"store: record {stored} is not a key of this run")
    for key in sorted(settled):
        runs = evidence.runs.get(key, [])
        record = records.get(prefix + key)
        values = evidence.values.get(key, Counter())
        if record is None:
            violations.append(f"key {key}: no record after the settle pass")
            continue
        if record.status is Status.PROCESSING:
            violations.append(
                f"key {key}: still processing after the settle pass (owner"
                f" {record.owner}, every worker dead)"
            )
            continue
        if len(values) > 1:
            violations.append(
                f"key {key}: calls got {len(values)} different values: {sorted(values)[:3]}"
            )
        final = settled[key]
        if final is not None and values and set(values) != {final}:
            violations.append(f"key {key}: calls got {sorted(values)[:3]}, the settle pass {final}")
        if cfg.mode == "halt":
            if len(runs) > 1:
                violations.append(
                    f"key {key}: the body started {len(runs)} times with"
                    " on_abandoned='halt': " + "; ".join(map(str, runs[:3]))
                )
            if record.status is Status.OK:
                if final is None or final.split("/")[1] != record.token:
                    violations.append(
                        f"key {key}: ok with token {record.token}, but replays return {final}"
                    )
                if not any(f"{r.attempt}/{r.token}/{r.pid}" == final and r.ended for r in runs):
                    violations.append(f"key {key}: its value {final} is no finished body run's")
            else:  # halted
                if not (record.reason or "").startswith("abandoned"):
                    violations.append(f"key {key}: halted for {record.reason!r}, not abandoned")
                if values:
                    violations.append(f"key {key}: halted, but calls returned {sorted(values)[:3]}")
            if record.status is Status.OK and evidence.halted.get(key):
                violations.append(f"key {key}: ok, but {evidence.halted[key]} calls raised Halted")
        else:  # retry
            attempts = Counter(r.attempt for r in runs)
            for number, count in sorted(attempts.items()):
                if count > 1:
                    dup = [r for r in runs if r.attempt == number]
                    violations.append(
                        f"key {key}: attempt {number} started {count} times: "
                        + "; ".join(map(str, dup[:3]))
                    )
            if evidence.halted.get(key):
                violations.append(
                    f"key {key}: {evidence.halted[key]} calls raised Halted with"
                    " on_abandoned='retry'"
                )
            if record.status is not Status.OK:
                violations.append(
                    f"key {key}: ended {record.status.value} with"
                    f" on_abandoned='retry': {record.reason}"
                )
                continue
            later = [r for r in runs if r.attempt > record.attempt]
            if later:
                violations.append(
                    f"key {key}: recorded attempt {record.attempt}, but a body ran in {later[0]}"
                )
            expected = [r for r in runs if r.attempt == record.attempt and r.token == record.token]
            if final is None or not any(
                f"{r.attempt}/{r.token}/{r.pid}" == final and r.ended for r in expected
            ):
                violations.append(
                    f"key {key}: ok at attempt {record.attempt} token"
                    f" {record.token}, but replays return {final}: no finished body run of it"
                )
    return violations


def settle(cfg: Config, store: Store, keys: list[str]) -> dict[str, str | None]:
    """Call every key once more, with no killer: the value each returns (None: Halted)."""
    cfg = dataclasses.replace(cfg, sabotage=False)
    caller = Caller(cfg, store, Path(cfg.evidence) / "settle.log")
    caller.slow = False
    finals: dict[str, str | None] = {}
    for key in keys:
        caller.call(key)
    os.close(caller.fd)
    for line in (Path(cfg.evidence) / "settle.log").read_text().splitlines():
        kind, _, rest = line.partition(" ")
        fields = rest.split(" ")
        if kind == "R":
            finals[fields[0]] = fields[1]
        elif kind in ("H", "B", "X"):
            finals[fields[0]] = None
    for key in keys:
        finals.setdefault(key, None)
    return finals


def run_mode(
    args: argparse.Namespace, mode: Mode, url: str, store: Store, workdir: Path, run_id: str
) -> bool:
    """One mode's storm, settle pass and checks; True when no violation was found."""
    evidence_dir = workdir / f"evidence-{mode}"
    evidence_dir.mkdir()
    cfg = Config(
        kind=args.store,
        url=url,
        name=f"crash-storm.{run_id}.{mode}",
        mode=mode,
        keys=args.keys,
        generation=args.generation,
        t0=time.time(),
        lease=args.lease,
        wait=args.wait,
        pause=args.pause,
        evidence=str(evidence_dir),
        stop=str(evidence_dir / "STOP"),
        sabotage=args.sabotage,
    )
    ctx = multiprocessing.get_context("forkserver")
    storm = Storm(cfg, args.workers, args.seconds, args.kill_every, ctx)
    try:
        storm.run()
    finally:
        storm.stop()

    # All workers are dead: every processing record now has a dead owner.
    generations = int((time.time() - cfg.t0) / cfg.generation) + 1 if cfg.generation > 0 else 1
    evidence = Evidence()
    for path in sorted(evidence_dir.glob("w*.log")):
        evidence.read(path, storm=True)
    prefix = f"{cfg.name}:"
    before, _ = records_of(store, prefix)
    abandoned = sum(r.status is Status.PROCESSING for r in before.values())
    keys = {key_name(g, n) for g in range(generations) for n in range(cfg.keys)}
    keys |= evidence.keys | {k[len(prefix) :] for k in before}
    finals = settle(cfg, store, sorted(keys))
    evidence.read(evidence_dir / "settle.log", storm=False)

    # The store must open afresh and read back whole: in a process of its own, which neither
    # shares this one's connections nor disturbs them.
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        records, problems = pool.submit(verify_store, args.store, url, prefix).result()
    violations = storm.violations + problems + check(cfg, evidence, records, finals)

    statuses = Counter(r.status for r in records.values())
    cut = sum(not r.ended for runs in evidence.runs.values() for r in runs)
    takeovers = sum(r.attempt - 1 for r in records.values())
    for line in violations[: args.show]:
        print(f"violation: {line}")
    if len(violations) > args.show:
        print(f"... and {len(violations) - args.show} more violations")
    if evidence.torn:
        print(f"note: {evidence.torn} evidence lines torn by kills")
    if violations:
        print(f"evidence kept in {evidence_dir}; records under {prefix!r} in {url}")
    print(
        f"crash-storm store={args.store} mode={mode} seconds={args.seconds:g}"
        f" workers={args.workers} calls={evidence.calls} runs={evidence.body_runs}"
        f" kills={storm.kills} keys={len(keys)} ok={statuses[Status.OK]}"
        f" halted={statuses[Status.HALTED]} abandoned={abandoned} cut={cut}"
        f" takeovers={takeovers} violations={len(violations)}",
        flush=True,
    )
    if not violations and not args.keep:
        for key in records:
            store.delete(key)
    return not violations


def span(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    pair = (float(low), float(high or low))
    if not 0 < pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds with 0 < MIN <= MAX: {text}")
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="SIGKILL worker processes calling @idempotent keys, then check the"
        " invariants (see the module docstring).",
    )
    parser.add_argument("--store", choices=["disk", "redis", "postgres"], default="disk")
    parser.add_argument(
        "--url",
        help="an existing store: directory (disk), Redis URL, or"
        " PostgreSQL URL/connection string; default: start one",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="storm time, per mode")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--keys", type=int, default=200, help="keys in play at any moment")
    parser.add_argument("--mode", choices=["halt", "retry", "both"], default="both")
    parser.add_argument(
        "--generation",
        type=float,
        default=4.0,
        help="seconds before the key set moves on (0: one fixed set)",
    )
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--wait", type=float, default=0.05, help="wait= of the calls")
    parser.add_argument(
        "--pause", type=float, default=0.002, help="a worker sleeps up to this long between calls"
    )
    parser.add_argument(
        "--kill-every",
        type=span,
        default=(0.05, 0.3),
        metavar="MIN,MAX",
        help="seconds between kills, drawn uniformly",
    )
    parser.add_argument("--workdir", type=Path, help="where evidence goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the evidence and the records")
    parser.add_argument(
        "--show", type=int, default=10, metavar="N", help="violations listed above the summary line"
    )
    parser.add_argument("--sabotage", action="store_true", help=argparse.SUPPRESS)  # tests only
    args = parser.parse_args(argv)
    if args.workers < 1 or args.keys < 1 or args.seconds <= 0:
        parser.error("--workers, --keys and --seconds must be positive")

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="crash-storm-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    modes: list[Mode] = ["halt", "retry"] if args.mode == "both" else [args.mode]
    preload = ["__main__", "idemfn", {"redis": "redis", "postgres": "psycopg_pool"}.get(args.store)]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in preload if m])
    handler = logging.FileHandler(workdir / "parent.log")  # the settle pass's warnings
    logging.getLogger("idemfn").addHandler(handler)
    logging.getLogger("idemfn").propagate = False
    ok = True
    with server(args.store, args.url, workdir) as url:
        # ONE store object in this process for the whole run: a second DiskStore on the same
        # directory drops the first one's SQLite locks when it opens (see the docstring).
        store = open_store(args.store, url)
        try:
            store.get("crash-storm:probe")  # create the directory or table before workers race
            for mode in modes:
                ok = run_mode(args, mode, url, store, workdir, run_id) and ok
        finally:
            store.close()
    if ok and own_workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
