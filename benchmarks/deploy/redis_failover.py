"""``redis-failover``: duplicate runs and lost calls per failover of a Redis primary with one
replica and Sentinel, for ``replicas=0`` and ``replicas=1`` (issue 19); and what
``replicas=1`` costs a first call.

Processes call the store (through ``redis+sentinel://``) with fresh keys, continuously; each
body run is appended to a file of the process's own, outside Redis. The primary is SIGKILLed
mid-traffic, Sentinel promotes the replica, the old primary rejoins as a replica. Two kinds of
failover:

- ``healthy``: the replica keeps up (on one machine, replication lags by microseconds);
- ``lagging``: the replica has stopped taking writes a moment before the kill (a slow or
  partitioned replica, made deterministic: ``RedisReplicated.stall``).

A caller retries a key whose call failed (a ``StoreError``, ``OwnershipLost``, ...) until it
succeeds, or gives up after ``GIVE_UP`` seconds (a lost call). After the run every completed
key is called once more: a body that runs then had its outcome lost (a duplicate); a key that
answers ``Halted`` had its outcome lost and its claim kept (a lost outcome, not a duplicate).

``replicas=1`` with one replica, failed over to it, promises no duplicate: a body runs only
after the replica acknowledged its claim, so the promoted replica holds the claim. A duplicate
there raises ``GuaranteeBroken``. ``replicas=0`` promises nothing across a failover.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.deploy import GuaranteeBroken, load
from tests.support.deployments.redis_replicated import RedisReplicated, replicated

GIVE_UP = 5.0  # seconds a caller retries one key before it counts the call as lost
WORKERS = 2


def _worker(commands: Any, finished: Any, stop: Any, wid: int) -> None:
    """Serve runs until told to exit (None). Each run, ``(url, prefix, directory)``: call fresh
    keys until ``stop``; body runs to ``runs-<wid>``, completed keys to ``done-<wid>``, given-up
    keys to ``lost-<wid>``; then put ``wid`` on ``finished``."""
    import logging

    from idemfn import RedisStore, idempotent

    if not os.environ.get("IDEMFN_BENCH_DEBUG"):
        logging.getLogger("idemfn").setLevel(logging.CRITICAL)  # (failovers: many warnings)
    while (command := commands.get()) is not None:
        url, prefix, directory = command
        where = Path(directory)
        with (
            open(where / f"runs-{wid}", "a", buffering=1) as runs,
            open(where / f"done-{wid}", "a", buffering=1) as done,
            open(where / f"lost-{wid}", "a", buffering=1) as lost,
        ):

            def body(key: str) -> str:
                runs.write(key + "\n")
                return key

            fn = idempotent(store=RedisStore(url, prefix=prefix), key="{key}", name="b", wait=0)(
                body
            )
            n = 0
            while not stop.is_set():
                n += 1
                key = f"{wid}-{n}"
                give_up = time.monotonic() + GIVE_UP
                while True:
                    try:
                        fn(key)
                        done.write(key + "\n")
                        break
                    except Exception as exc:
                        if time.monotonic() > give_up:
                            lost.write(key + "\n")
                            if os.environ.get("IDEMFN_BENCH_DEBUG"):
                                print(f"lost {key}: {type(exc).__name__}: {exc}", flush=True)
                            break
                        time.sleep(0.02)
        finished.put(wid)


class _Callers:
    """``WORKERS`` processes, started once, that serve one run after another."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.finished = context.Queue()
        self.commands = [context.Queue() for _ in range(WORKERS)]
        self.processes = [
            context.Process(target=_worker, args=(queue, self.finished, self.stop, wid))
            for wid, queue in enumerate(self.commands)
        ]
        for process in self.processes:
            process.start()

    def start(self, url: str, prefix: str, directory: Path) -> None:
        self.stop.clear()
        for queue in self.commands:
            queue.put((url, prefix, str(directory)))

    def halt(self) -> None:
        """End the run; return once every caller has finished its last key."""
        self.stop.set()
        for _ in self.processes:
            self.finished.get(timeout=GIVE_UP + 60)

    def close(self) -> None:
        self.stop.set()
        for queue in self.commands:
            queue.put(None)
        for process in self.processes:
            process.join(GIVE_UP + 20)
            if process.is_alive():
                process.kill()
                process.join()


def _lines(directory: Path, kind: str) -> list[str]:
    found: list[str] = []
    for path in directory.glob(f"{kind}-*"):
        found.extend(path.read_text().split())
    return found


def _failover(
    deployment: RedisReplicated, callers: _Callers, replicas: int, kind: str
) -> dict[str, Any]:
    """One failover of ``kind`` under traffic; the counts."""
    directory = Path(tempfile.mkdtemp(prefix="idemfn-failover-"))
    try:
        return _counted(deployment, callers, replicas, kind, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _counted(
    deployment: RedisReplicated, callers: _Callers, replicas: int, kind: str, directory: Path
) -> dict[str, Any]:
    from idemfn import RedisStore, idempotent

    prefix = f"bench:{uuid.uuid4().hex}:"
    callers.start(deployment.url(replicas=replicas, replica_timeout=0.5), prefix, directory)

    def progressed(by: int) -> None:
        start = len(_lines(directory, "done"))
        give_up = time.monotonic() + 30
        while len(_lines(directory, "done")) < start + by and time.monotonic() < give_up:
            time.sleep(0.02)

    started = time.monotonic()
    try:
        progressed(30)
        if kind == "lagging":
            deployment.stall()
            time.sleep(0.2)  # traffic while the replica takes nothing
        deployment.kill_primary()
        deployment.failover()
        deployment.rejoin()
        progressed(20)
    finally:
        callers.halt()
    elapsed = time.monotonic() - started
    done = _lines(directory, "done")
    runs = _lines(directory, "runs")
    lost = _lines(directory, "lost")
    # Every completed key called once more: a body run now is a lost outcome run again; an
    # error (Halted: its owner's claim was kept, its outcome lost) a lost outcome.
    again: list[str] = []
    unanswered = 0

    def body(key: str) -> str:
        again.append(key)
        return key

    check = RedisStore(deployment.url(), prefix=prefix)
    fn = idempotent(store=check, key="{key}", name="b", wait=0)(body)
    for key in done:
        try:
            fn(key)
        except Exception as exc:
            unanswered += 1
            if os.environ.get("IDEMFN_BENCH_DEBUG"):
                print(f"unanswered {key}: {type(exc).__name__}: {exc}", flush=True)
    counts: dict[str, int] = {}
    for key in runs + again:
        counts[key] = counts.get(key, 0) + 1
    with deployment.primary.client() as primary:  # small data: the next rejoin syncs fast
        primary.flushall()
    deployment.wait_caught_up()
    return {
        "calls": len(done),
        "seconds": elapsed,
        "duplicates": sum(1 for n in counts.values() if n > 1),
        "lost": len(lost),
        "lost_outcomes": unanswered,
    }


def _latency(deployment: RedisReplicated, replicas: int, n: int) -> tuple[float, float, float]:
    """Median and p99 first-call latency, and median replay latency, in µs, one caller."""
    from idemfn import RedisStore, idempotent

    store = RedisStore(deployment.url(replicas=replicas), prefix=f"lat:{uuid.uuid4().hex}:")
    fn = idempotent(store=store, key="{x}", name="lat")(lambda x: x)
    fn(-1)  # the first use loads the scripts and reads the clock
    firsts, replays = [], []
    for x in range(n):
        t = time.perf_counter()
        fn(x)
        firsts.append(time.perf_counter() - t)
    for x in range(n):
        t = time.perf_counter()
        fn(x)
        replays.append(time.perf_counter() - t)
    firsts.sort()
    return (
        statistics.median(firsts) * 1e6,
        firsts[int(len(firsts) * 0.99) - 1] * 1e6,
        statistics.median(replays) * 1e6,
    )


def run(quick: bool) -> list[str]:
    kinds = {"healthy": 1, "lagging": 1} if quick else {"healthy": 20, "lagging": 5}
    rows: list[str] = []
    broken: list[str] = []
    with replicated() as deployment:
        latency = {r: _latency(deployment, r, 200 if quick else 3000) for r in (0, 1)}
        print(
            f"first call through Sentinel, one caller ({os.cpu_count()} CPUs, load {load()}):",
            flush=True,
        )
        for replicas, (median, p99, replay) in latency.items():
            row = (
                f"  replicas={replicas}: first call median {median:.0f} µs, p99 {p99:.0f} µs;"
                f" replay median {replay:.0f} µs"
            )
            print(row, flush=True)
            rows.append(row)
        print(
            f"failovers under traffic ({WORKERS} processes calling fresh keys; a caller retries"
            f" a failed key for {GIVE_UP:.0f} s):",
            flush=True,
        )
        print(
            f"  {'replicas':<9}{'failovers':<20}{'calls':>7}{'calls/s':>9}{'duplicates':>12}"
            f"{'lost calls':>12}{'lost outcomes':>15}",
            flush=True,
        )
        callers = _Callers()
        try:
            for replicas in (0, 1):
                for kind, count in kinds.items():
                    total: dict[str, float] = {}
                    for _ in range(count):
                        got = _failover(deployment, callers, replicas, kind)
                        for name, value in got.items():
                            total[name] = total.get(name, 0) + value
                    what = f"{count} {kind}"
                    rate = total["calls"] / total["seconds"]
                    row = (
                        f"  replicas={replicas}, {what}: {total['calls']:.0f} calls"
                        f" ({rate:.0f}/s), {total['duplicates']:.0f} duplicates,"
                        f" {total['lost']:.0f} lost calls, {total['lost_outcomes']:.0f} lost"
                        " outcomes"
                    )
                    print(
                        f"  {replicas:<9}{what:<20}{total['calls']:>7.0f}{rate:>9.0f}"
                        f"{total['duplicates']:>12.0f}{total['lost']:>12.0f}"
                        f"{total['lost_outcomes']:>15.0f}   (load {load()})",
                        flush=True,
                    )
                    rows.append(row)
                    if replicas == 1 and total["duplicates"]:
                        broken.append(row)
        finally:
            callers.close()
    if broken:
        raise GuaranteeBroken(
            "replicas=1 with one replica promises no duplicate across a failover to it: "
            + "; ".join(broken)
        )
    return rows
