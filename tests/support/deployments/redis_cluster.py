"""A real Redis Cluster of three primaries on this machine, for the tests and the benchmark.

``RedisClusterServers(directory)`` starts one ``redis-server --cluster-enabled yes`` per primary
(each with its own ``--cluster-config-file`` and working directory under ``directory``, a TCP
port of 127.0.0.1 and an explicit ``--cluster-port`` for the bus, both from ``free_port()``;
a node that loses the race for a port starts again on others), gives each a third of the 16384
slots (``CLUSTER ADDSLOTSRANGE``), joins them (``CLUSTER MEET``) and waits until every node
says ``cluster_state:ok`` and agrees on who serves every slot. ``move_slots`` reshards while
clients run (``SETSLOT IMPORTING``/``MIGRATING``, ``MIGRATE`` of each key, ``SETSLOT NODE``),
waiting until every node agrees on the new owner. ``stop()`` kills every node, also when a
start failed half way; the session fixture ``redis_cluster`` stops them at the session's end,
whatever the tests did.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from . import free_port

__all__ = ["ClusterNode", "RedisClusterServers", "redis_cluster"]

SLOTS = 16384
_HOST = "127.0.0.1"
_START_TRIES = 5  # new ports for a node whose port was taken in between
_TIMEOUT = 60.0  # for a node to answer, the cluster to form, a slot to move


class ClusterNode:
    """One ``redis-server`` of the cluster: ``port`` (clients), ``bus_port``, ``node_id``."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.bus_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.node_id = ""
        self._client: Any = None

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    def start(self) -> None:
        """Start on free ports, trying others when a port was taken in between."""
        for _ in range(_START_TRIES):
            self.port = free_port()
            self.bus_port = free_port()
            if self.bus_port == self.port:
                continue
            error = self._try_start()
            if error is None:
                self.node_id = self.ask("CLUSTER", "MYID").decode()
                return
            if "in use" not in error and "bind" not in error.lower():
                raise RuntimeError(f"redis-server (cluster node) failed to start: {error}")
        raise RuntimeError(f"redis-server: no free ports after {_START_TRIES} tries")

    def _try_start(self) -> str | None:
        """None once the node answers; the reason when it exited (a port taken: start again)."""
        import redis

        (self.directory / "nodes.conf").unlink(missing_ok=True)
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                _HOST,
                "--port",
                str(self.port),
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.bus_port),
                "--cluster-config-file",
                str(self.directory / "nodes.conf"),
                "--cluster-node-timeout",
                "5000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                "--logfile",
                str(log),
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # stopped by tests: see RedisServer.start
        )
        give_up = time.monotonic() + _TIMEOUT
        while True:
            if self.process.poll() is not None:
                self.process = None
                return log.read_text(errors="replace") if log.exists() else "exited"
            with contextlib.suppress(redis.RedisError, OSError), self.connect() as client:
                if client.ping():
                    return None
            if time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"redis-server (cluster node) did not answer in {_TIMEOUT} s")
            time.sleep(0.01)

    def connect(self) -> Any:
        """A plain ``redis.Redis`` to this node alone (no cluster routing)."""
        import redis

        return redis.Redis(host=_HOST, port=self.port, socket_timeout=_TIMEOUT)

    def ask(self, *command: Any) -> Any:
        """One command to this node alone (on a client kept for it); its raw reply."""
        if self._client is None:
            self._client = self.connect()
        return self._client.execute_command(*command)

    def info(self) -> dict[str, str]:
        """``CLUSTER INFO``, as a dict of str."""
        text = self.ask("CLUSTER", "INFO").decode()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def owners(self) -> dict[int, str]:
        """Who this node believes serves each assigned slot: {slot: node id}."""
        found: dict[int, str] = {}
        for start, end, primary, *_ in self.ask("CLUSTER", "SLOTS"):
            node_id = primary[2].decode() if len(primary) > 2 else ""
            for slot in range(start, end + 1):
                found[slot] = node_id
        return found

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(30)


class RedisClusterServers:
    """A Redis Cluster of ``primaries`` nodes (three by default) on this machine.

    Attributes:
        nodes: The ``ClusterNode`` of each primary, in slot order at the start (node 0 serves
            the first third of the slots).
        url: ``redis+cluster://127.0.0.1:<port>,...``: every node, as ``RedisStore`` and
            ``IDEMFN_STORE`` take it.
    """

    def __init__(self, directory: Path, primaries: int = 3) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: `apt-get install redis-server` (the README's"
                " test command does it)"
            )
        self.nodes = [ClusterNode(binary, directory / f"node-{n}") for n in range(primaries)]
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def _form(self) -> None:
        per_node = SLOTS // len(self.nodes)
        for n, node in enumerate(self.nodes):
            first = n * per_node
            last = SLOTS - 1 if n == len(self.nodes) - 1 else first + per_node - 1
            # Distinct epochs: no collision for the nodes to settle before the state is ok.
            node.ask("CLUSTER", "SET-CONFIG-EPOCH", n + 1)
            node.ask("CLUSTER", "ADDSLOTSRANGE", first, last)
        for n, node in enumerate(self.nodes):  # every pair: no node waits for gossip to hear
            for other in self.nodes[n + 1 :]:
                node.ask("CLUSTER", "MEET", _HOST, other.port, other.bus_port)
        self.wait_until(self._agreed, "every node to say cluster_state:ok")

    def _agreed(self) -> bool:
        """Every node: state ok, every node known, and one view of every slot's owner."""
        views = []
        for node in self.nodes:
            info = node.info()
            if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(
                self.nodes
            ):
                return False
            views.append(node.owners())
        return len(views[0]) == SLOTS and all(view == views[0] for view in views)

    def wait_until(self, condition: Any, what: str) -> None:
        """Poll ``condition`` (60 s at most, then fail saying ``what``)."""
        give_up = time.monotonic() + _TIMEOUT
        while not condition():
            if time.monotonic() > give_up:
                raise AssertionError(f"the Redis Cluster: timed out waiting for {what}")
            time.sleep(0.02)

    # -- where keys live ----------------------------------------------------------------------

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of ``key`` (hash tags included), as the cluster computes it."""
        from redis.crc import key_slot

        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def owner_of_slot(self, slot: int) -> int:
        """The index in ``nodes`` of the node that serves ``slot`` now."""
        node_id = self.nodes[0].owners()[slot]
        return next(n for n, node in enumerate(self.nodes) if node.node_id == node_id)

    def node_of(self, key: str | bytes) -> int:
        """The index in ``nodes`` of the node that holds ``key`` now."""
        return self.owner_of_slot(self.slot_of(key))

    def keys_on_each_node(self, prefix: str, count: int = 1, stem: str = "k") -> list[list[str]]:
        """For each node (in ``nodes`` order), ``count`` stored keys ``stem-<n>`` whose Redis
        key ``prefix + key`` it holds."""
        owners = self.nodes[0].owners()
        index = {node.node_id: n for n, node in enumerate(self.nodes)}
        found: list[list[str]] = [[] for _ in self.nodes]
        n = 0
        while any(len(keys) < count for keys in found):
            key = f"{stem}-{n}"
            keys = found[index[owners[self.slot_of(prefix + key)]]]
            if len(keys) < count:
                keys.append(key)
            n += 1
        return found

    def client(self, **options: Any) -> Any:
        """A new ``redis.cluster.RedisCluster`` reaching every node."""
        from redis.cluster import ClusterNode as Startup
        from redis.cluster import RedisCluster

        startup = [Startup(_HOST, node.port) for node in self.nodes]
        return RedisCluster(startup_nodes=startup, **options)

    def async_client(self, **options: Any) -> Any:
        """A new ``redis.asyncio.cluster.RedisCluster`` (for the running event loop)."""
        from redis.asyncio.cluster import ClusterNode as Startup
        from redis.asyncio.cluster import RedisCluster

        startup = [Startup(_HOST, node.port) for node in self.nodes]
        return RedisCluster(startup_nodes=startup, **options)

    # -- resharding ---------------------------------------------------------------------------

    def move_slots(self, slots: Sequence[int], to: int) -> None:
        """Move ``slots`` (and their keys) to ``nodes[to]``, one slot at a time, as
        ``redis-cli --cluster reshard`` does, while clients keep running: a client sent to the
        old node for a key already moved is told ``ASK`` (then ``MOVED``) and follows. Returns
        once every node agrees that ``nodes[to]`` serves every slot moved."""
        target = self.nodes[to]
        owners = self.nodes[0].owners()
        by_id = {node.node_id: node for node in self.nodes}
        for slot in slots:
            source = by_id[owners[slot]]
            if source is target:
                continue
            target.ask("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            source.ask("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            while keys := source.ask("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.ask("MIGRATE", _HOST, target.port, "", 0, 30000, "KEYS", *keys)
            # The target first (as redis-cli does): the slot is never left without an owner
            # that accepts its keys.
            others = [node for node in self.nodes if node not in (target, source)]
            for node in [target, source, *others]:
                node.ask("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        moved = set(slots)

        def agreed() -> bool:
            return all(
                all(view[slot] == target.node_id for slot in moved)
                for view in (node.owners() for node in self.nodes)
            )

        self.wait_until(agreed, f"every node to agree that node {to} serves the slots moved")

    # -- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill every node (idempotent)."""
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """This worker's Redis Cluster of three primaries, started on first use, killed at the
    session's end whatever the tests did."""
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield servers
    finally:
        servers.stop()
