"""Deployments that span servers, started by the suite (and by ``benchmarks/bench_deploy.py``)
and torn down after: a Redis Cluster, a Redis primary with a replica and Sentinel, PgBouncer in
front of PostgreSQL, a PostgreSQL primary with a streaming standby. One module each; each
exposes its starter class and a session fixture (registered in ``tests/conftest.py``).

They listen on TCP ports of 127.0.0.1 where the server needs one (replication, Sentinel and the
cluster bus name their peers by address): ``free_port()`` picks one, and a starter that loses
the race for it (another process took it in between) tries again with another.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
