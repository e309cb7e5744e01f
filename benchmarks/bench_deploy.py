#!/usr/bin/env python
"""idemfn on the deployments that span machines (issue 19), each started by the script itself.

    python benchmarks/bench_deploy.py                      # every section, full runs (minutes)
    python benchmarks/bench_deploy.py --quick              # short runs (the test suite's)
    python benchmarks/bench_deploy.py --only cluster,pgbouncer

Sections (each a module of ``benchmarks/deploy/`` with a ``run(quick) -> list[str]`` that prints
its own table and returns the rows it measured):

- ``cluster``: calls/s and replay/first-call latency of a RedisStore on a three-primary Redis
  Cluster at 1, 2, 4 and 8 processes, against a raw redis-py ``RedisCluster`` floor;
- ``pgbouncer``: PostgresStore through PgBouncer in transaction pooling against direct
  connections to the same server;
- ``redis-failover``: duplicate runs per N failovers of a Redis primary with a replica and
  Sentinel, for each replication setting of the store;
- ``pg-failover``: acknowledged claims and outcomes lost, and duplicate runs, per promotion of a
  PostgreSQL streaming standby, synchronous and asynchronous.

The servers are the test suite's own starters (``tests/support/deployments``), on this machine:
a cluster here shares 2 cores with its clients, so figures are ratios against floors measured in
the same run, and the load is printed beside them. Nothing is asserted on time; the exit code is
0 unless a section saw a guarantee broken that its setting promises to keep.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's idemfn, and tests.support
    sys.path.insert(0, str(ROOT))

from benchmarks.deploy import GuaranteeBroken, load  # noqa: E402

#: Section name -> module of benchmarks/deploy/.
SECTIONS = {
    "cluster": "cluster",
    "pgbouncer": "pgbouncer",
    "redis-failover": "redis_failover",
    "pg-failover": "pg_failover",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (the test suite's)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    broken = False
    for name in chosen:
        module = importlib.import_module(f"benchmarks.deploy.{SECTIONS[name]}")
        print(f"\n## {name} (load {load()})", flush=True)
        try:
            module.run(quick=args.quick)
        except GuaranteeBroken as exc:
            print(f"GUARANTEE BROKEN in {name}: {exc}", flush=True)
            broken = True
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
