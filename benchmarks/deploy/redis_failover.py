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

import contextlib
import multiprocessing
import os
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


def _worker(url: str, prefix: str, directory: str, wid: int, stop: Any) -> None:
    """Call fresh keys until ``stop``; body runs to ``runs-<wid>``, completed keys to
    ``done-<wid>``, given-up keys to ``lost-<wid>``."""
    import logging

    from idemfn import RedisStore, idempotent

    logging.getLogger("idemfn").setLevel(logging.CRITICAL)  # (failovers: warnings by the dozen)
    where = Path(directory)
    runs = open(where / f"runs-{wid}", "a", buffering=1)  # noqa: SIM115 - the process's whole life
    done = open(where / f"done-{wid}", "a", buffering=1)  # noqa: SIM115
    lost = open(where / f"lost-{wid}", "a", buffering=1)  # noqa: SIM115
    store = RedisStore(url, prefix=prefix)

    @idempotent(store=store, key="{key}", name="bench", wait=0)
    def body(key: str) -> str:
        runs.write(key + "\n")
        return key

    n = 0
    while not stop.is_set():
        n += 1
        key = f"{wid}-{n}"
        give_up = time.monotonic() + GIVE_UP
        while True:
            try:
                body(key)
                done.write(key + "\n")
                break
            except Exception as exc:
                if time.monotonic() > give_up:
                    lost.write(key + "\n")
                    if os.environ.get("IDEMFN_BENCH_DEBUG"):
                        print(f"lost {key}: {type(exc).__name__}: {exc}", flush=True)
                    break
                time.sleep(0.02)


def _lines(directory: Path, kind: str) -> list[str]:
    found: list[str] = []
    for path in directory.glob(f"{kind}-*"):
        found.extend(path.read_text().split())
    return found


def _traffic(
    deployment: RedisReplicated, replicas: int, kinds: list[str], quick: bool
) -> dict[str, Any]:
    """One run of ``kinds`` failovers under traffic; the counts."""
    from idemfn import Halted, RedisStore, idempotent

    directory = Path(tempfile.mkdtemp(prefix="idemfn-failover-"))
    prefix = f"bench:{uuid.uuid4().hex}:"
    url = deployment.url(replicas=replicas, replica_timeout=0.5)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    workers = [
        context.Process(target=_worker, args=(url, prefix, str(directory), wid, stop))
        for wid in range(WORKERS)
    ]
    for worker in workers:
        worker.start()

    def progressed(by: int) -> None:
        start = len(_lines(directory, "done"))
        give_up = time.monotonic() + 30
        while len(_lines(directory, "done")) < start + by and time.monotonic() < give_up:
            time.sleep(0.02)

    started = time.monotonic()
    try:
        for kind in kinds:
            progressed(30 if quick else 200)
            if kind == "lagging":
                deployment.stall()
                time.sleep(0.2)  # traffic while the replica takes nothing
            deployment.kill_primary()
            deployment.failover()
            deployment.rejoin()
        progressed(20)
    finally:
        stop.set()
        for worker in workers:
            worker.join(GIVE_UP + 20)
            if worker.is_alive():
                worker.kill()
                worker.join()
    elapsed = time.monotonic() - started
    done = _lines(directory, "done")
    runs = _lines(directory, "runs")
    lost = _lines(directory, "lost")
    # Every completed key called once more: a body run now is a lost outcome run again.
    again: list[str] = []
    halted = 0
    check = RedisStore(deployment.url(), prefix=prefix)

    @idempotent(store=check, key="{key}", name="bench", wait=0)
    def body(key: str) -> str:
        again.append(key)
        return key

    for key in done:
        try:
            body(key)
        except Halted:
            halted += 1
        except Exception:
            halted += 1
    counts: dict[str, int] = {}
    for key in runs + again:
        counts[key] = counts.get(key, 0) + 1
    duplicates = sum(1 for n in counts.values() if n > 1)
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    return {
        "calls": len(done),
        "calls_per_s": len(done) / elapsed,
        "duplicates": duplicates,
        "lost": len(lost),
        "lost_outcomes": halted,
        "rerun_on_check": len(again),
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
    # Quick: one run per setting with one failover of each kind; full: a run per kind.
    runs = [["healthy", "lagging"]] if quick else [["healthy"] * 20, ["lagging"] * 5]
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
        for replicas in (0, 1):
            for kinds in runs:
                got = _traffic(deployment, replicas, kinds, quick)
                what = " + ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
                row = (
                    f"  replicas={replicas}, {what}: {got['calls']} calls"
                    f" ({got['calls_per_s']:.0f}/s), {got['duplicates']} duplicates,"
                    f" {got['lost']} lost calls, {got['lost_outcomes']} lost outcomes"
                )
                print(
                    f"  {replicas:<9}{what:<20}{got['calls']:>7}{got['calls_per_s']:>9.0f}"
                    f"{got['duplicates']:>12}{got['lost']:>12}{got['lost_outcomes']:>15}"
                    f"   (load {load()})",
                    flush=True,
                )
                rows.append(row)
                if replicas == 1 and got["duplicates"]:
                    broken.append(row)
    if broken:
        raise GuaranteeBroken(
            "replicas=1 with one replica promises no duplicate across a failover to it: "
            + "; ".join(broken)
        )
    return rows
