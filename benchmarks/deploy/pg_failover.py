"""``pg-failover``: a PostgreSQL primary stopped hard and its streaming standby promoted, over and
over, while processes call on fresh keys; synchronous replication against asynchronous.

Each mode starts its own pair (``tests/support/deployments/pg_standby.py``) and its callers:
``WORKERS`` processes of their own, each calling ``failover.n(key)`` on a new key after another,
through the connection string naming both nodes (``target_session_attrs=read-write``). Each body
appends its key to a file outside PostgreSQL (its run, and its claim acknowledged), each caller
logs each call's end (returned, or failed). Per promotion: the primary is stopped
(``pg_ctl -m immediate``) while they call, the standby promoted; then a new standby is built in
the old primary's place, caught up, and synchronous again (the pair is protected from then on).
After the last, the callers stop and the new primary's table is read:

- outcomes lost: calls that returned whose record is not ``ok`` on the new primary;
- claims lost: bodies that started (their claim acknowledged) whose key has no record at all;
- duplicate runs: every key is then called once more, and each body that runs again counts
  (a lost record lets a second caller run it);
- calls failed: ``StoreError`` from calls under way when the primary stopped, or started before
  the promotion; unrecorded: calls that returned their value but could not write their outcome
  (logged; the key halts once its lease runs out); recovery: from the stop to the first call
  the new primary acknowledged.

Then the first-call latency with the standby synchronous against asynchronous, one caller, on
one pair. ``GuaranteeBroken`` if synchronous replication lost an acknowledged record or ran a
body twice.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from benchmarks.deploy import GuaranteeBroken, load
from idemfn import IdempotencyError, PostgresStore, idempotent
from tests.support.deployments.pg_standby import PgStandby

ROOT = Path(__file__).resolve().parents[2]

# A caller: a new key after another until the stop file exists; its log, one line a call:
# "<monotonic> <key> ok|unrecorded|fail|lost" (unrecorded: the call returned its value, but its
# outcome could not be written; lost: OwnershipLost, its claim gone in the failover). The body
# appends its key to the runs file (O_APPEND).
CALLER = textwrap.dedent("""
    import logging, os, sys, time
    from idemfn import OwnershipLost, PostgresStore, StoreError, idempotent

    logging.getLogger("psycopg").setLevel(logging.CRITICAL)  # counted, not printed
    unrecorded = []

    class Told(logging.Handler):
        def emit(self, record):
            if "could not be recorded" in record.getMessage():
                unrecorded.append(1)

    logging.getLogger("idemfn").addHandler(Told())
    logging.getLogger("idemfn").propagate = False  # counted, not printed

    dsn, table, runs, log, stop, me = sys.argv[1:7]
    store = PostgresStore(dsn, table=table)

    @idempotent(key="{k}", name="failover", store=store)
    def n(k):
        fd = os.open(runs, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{k}\\n".encode())
        os.close(fd)
        return k

    with open(log, "a", buffering=1) as out:
        i = 0
        while not os.path.exists(stop):
            k = f"{me}-{i}"
            i += 1
            try:
                n(k)
                # A returned call whose outcome did not land (logged): not acknowledged.
                said = "unrecorded" if unrecorded else "ok"
                unrecorded.clear()
                out.write(f"{time.monotonic()} {k} {said}\\n")
            except StoreError:
                out.write(f"{time.monotonic()} {k} fail\\n")
            except OwnershipLost:  # its claim was lost in the failover (asynchronous)
                out.write(f"{time.monotonic()} {k} lost\\n")
""")


def _recorder(store: PostgresStore, runs: Path) -> object:
    @idempotent(key="{k}", name="failover", store=store)
    def n(k: str) -> str:
        with runs.open("a") as f:
            f.write(f"{k}\n")
        return k

    return n


class _Run:
    """One mode's figures."""

    def __init__(self) -> None:
        self.promotions = 0
        self.acked = 0
        self.failed = 0
        self.unrecorded = 0
        self.outcomes_lost = 0
        self.claims_lost = 0
        self.duplicates = 0
        self.recovery: list[float] = []


def _log(directory: Path) -> list[tuple[float, str, str]]:
    lines = []
    for path in directory.glob("log-*"):
        for line in path.read_text().splitlines():
            t, key, what = line.split()
            lines.append((float(t), key, what))
    return sorted(lines)


def _failovers(
    synchronous: bool, promotions: int, workers: int, calls_between: int, latency: int
) -> tuple[_Run, dict[str, tuple[float, float]]]:
    """One mode's run; first, with ``latency`` > 0, the first-call latency (``_latency``)."""
    figures = _Run()
    directory = Path(tempfile.mkdtemp(prefix="idemfn-pgfo-"))
    pair = PgStandby(synchronous=synchronous)
    table, runs, stop = f"t_{uuid.uuid4().hex}", directory / "runs", directory / "stop"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    callers: list[subprocess.Popen[bytes]] = []
    latencies = {}
    try:
        if latency:
            latencies = _latency(pair, latency)
            pair.set_synchronous(synchronous)
        PostgresStore(pair.dsn, table=table).close()  # the table, made once
        for me in range(workers):
            log = str(directory / f"log-{me}")
            argv = [sys.executable, "-c", CALLER, pair.dsn, table, str(runs), log, str(stop)]
            callers.append(subprocess.Popen([*argv, f"w{me}"], env=env, stdin=subprocess.DEVNULL))
        stops: list[tuple[float, float]] = []  # (stopped, promoted) monotonic
        for round_ in range(promotions):
            _until_calls(directory, calls_between)
            stopped = time.monotonic()
            pair.fail()
            pair.promote()
            stops.append((stopped, time.monotonic()))
            figures.promotions += 1
            if round_ + 1 < promotions:
                pair.rebuild()
                pair.caught_up()  # protected from here on (see the module's docstring)
        _until_calls(directory, calls_between)  # the new primary serves them
        stop.touch()
        for caller in callers:
            caller.wait(60)
        log = _log(directory)
        figures.acked = sum(1 for _, _, what in log if what == "ok")
        figures.failed = sum(1 for _, _, what in log if what == "fail")
        figures.unrecorded = sum(1 for _, _, what in log if what == "unrecorded")
        for stopped, promoted in stops:
            back = [t for t, _, what in log if what == "ok" and t > promoted]
            if back:
                figures.recovery.append(min(back) - stopped)
        records = dict(
            pair.primary.query(f"SELECT key, entry IS NOT NULL AND live IS NULL FROM {table}")
        )
        started = set(runs.read_text().split())
        acked = {key for _, key, what in log if what == "ok"}
        figures.outcomes_lost = sum(1 for k in acked if not records.get(f"failover:{k}"))
        figures.claims_lost = sum(1 for k in started if f"failover:{k}" not in records)
        # A second caller for every key: a lost record lets it run the body again.
        store = PostgresStore(pair.dsn, table=table)
        again = _recorder(store, runs)
        for key in sorted(started | acked):
            try:
                again(key)  # type: ignore[operator]
            except IdempotencyError:  # a claim whose outcome never landed: halted
                pass
        store.close()
        bodies = runs.read_text().split()
        figures.duplicates = len(bodies) - len(set(bodies))
    finally:
        stop.touch()
        for caller in callers:
            if caller.poll() is None:
                caller.kill()
            caller.wait()
        pair.remove()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    return figures, latencies


def _until_calls(directory: Path, calls: int) -> None:
    """Wait until the callers have acknowledged ``calls`` more calls than now."""
    start = _acked(directory)
    give_up = time.monotonic() + 120
    while _acked(directory) < start + calls:
        if time.monotonic() > give_up:
            raise RuntimeError("pg-failover: the callers acknowledged nothing for 120 s")
        time.sleep(0.01)


def _acked(directory: Path) -> int:
    return sum(p.read_text().count(" ok\n") for p in directory.glob("log-*"))


def _latency(pair: PgStandby, calls: int) -> dict[str, tuple[float, float]]:
    """First-call latency (median, p99, µs) on ``pair``, its standby synchronous, then
    asynchronous, then synchronous again (a drifting load hits both; the better is kept)."""
    figures: dict[str, tuple[float, float]] = {}
    store = PostgresStore(pair.dsn, table=f"t_{uuid.uuid4().hex}")

    @idempotent(key="{k}", name="latency", store=store)
    def first(k: int) -> int:
        return k

    first(-1)
    for round_, mode in enumerate(("synchronous", "asynchronous", "synchronous")):
        pair.set_synchronous(mode == "synchronous")
        times = []
        for i in range(calls):
            t = time.perf_counter()
            first(round_ * calls + i)
            times.append(time.perf_counter() - t)
        times.sort()
        got = (statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6)
        was = figures.get(mode, got)
        figures[mode] = (min(was[0], got[0]), min(was[1], got[1]))
    store.close()
    return figures


def run(quick: bool) -> list[str]:
    """Print and return the section's rows (see the module's docstring)."""
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)  # a failover's noise, by design
    promotions, workers, between = (1, 2, 50) if quick else (10, 4, 300)
    rows = []
    header = (
        f"{'replication':<13} {'promotions':>10} {'acked':>7} {'failed':>6} {'unrecorded':>10}"
        f" {'outcomes lost':>13} {'claims lost':>11} {'dup runs':>8} {'recovery ms':>17}"
    )
    print(f"{workers} caller processes on fresh keys, 2 cores shared with both servers")
    print(header)
    broken = []
    latency: dict[str, tuple[float, float]] = {}
    for synchronous in (True, False):
        f, measured = _failovers(
            synchronous, promotions, workers, between, (200 if quick else 2000) * synchronous
        )
        latency |= measured
        name = "synchronous" if synchronous else "asynchronous"
        recovery = (
            f"{statistics.median(f.recovery) * 1e3:.0f} (max {max(f.recovery) * 1e3:.0f})"
            if f.recovery
            else "-"
        )
        row = (
            f"{name:<13} {f.promotions:>10} {f.acked:>7} {f.failed:>6} {f.unrecorded:>10}"
            f" {f.outcomes_lost:>13}"
            f" {f.claims_lost:>11} {f.duplicates:>8} {recovery:>17}"
        )
        print(row, flush=True)
        rows.append(row)
        if synchronous and (f.outcomes_lost or f.claims_lost or f.duplicates):
            broken.append(
                f"synchronous replication lost {f.outcomes_lost} acknowledged outcomes and"
                f" {f.claims_lost} claims, and ran {f.duplicates} bodies twice, in"
                f" {f.promotions} promotions"
            )
    print(f"\nfirst call, one caller, no other load (load {load()}): median / p99 µs")
    for mode, (median, p99) in latency.items():
        row = f"{mode:<13} {median:>8.0f} / {p99:.0f}"
        print(row)
        rows.append(row)
    ratio = latency["synchronous"][0] / latency["asynchronous"][0]
    print(f"synchronous / asynchronous (median): {ratio:.2f}x", flush=True)
    if broken:
        raise GuaranteeBroken("; ".join(broken))
    return rows
