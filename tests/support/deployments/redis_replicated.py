"""A Redis primary, one replica (``--replicaof``) and a Sentinel watching them (issue 19), on
TCP ports of 127.0.0.1, started by the suite (``redis_replicated`` fixture) and by
``benchmarks/deploy/redis_failover.py``, and torn down after.

The faults are real and deterministic, waited for by condition, never by time:

- ``wait_caught_up()``: the replica has applied everything the primary has written;
- ``stall()``: the replica stops taking the primary's writes, and every write the primary
  acknowledges from then on is held in the primary's own memory, so a SIGKILL of the primary
  loses it. (A stopped replica alone is not enough: the kernel keeps receiving into its socket,
  and it would apply those writes when it resumes. So the replica is stopped with SIGSTOP and
  the primary writes filler until its socket to the replica is full and the primary holds a
  backlog of its own for it: the next writes cannot leave the primary.)
- ``kill_primary()``: SIGKILL; ``failover()``: Sentinel promotes the replica (``SENTINEL
  FAILOVER``; detection by timeout is left off, so a busy machine never fails a primary over
  by itself), and it returns once Sentinel names the replica and the replica says it is the
  master; ``rejoin()`` restarts the old primary as a replica of the new one. After a failover
  ``primary`` and ``replica`` name the nodes' new roles.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.deployments import free_port

__all__ = ["RedisNode", "RedisReplicated", "redis_replicated"]

SERVICE = "idemfn"  # the name Sentinel monitors the primary under
TIMEOUT = 30.0  # seconds to wait for any condition: generous, for a busy machine
FILLER = "idemfn-test-filler:"  # keys written by stall(), never under a store's prefix


def _binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server is not installed: `apt-get install redis-server`")
    return found


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """``condition()``'s first truthy answer, asked every 10 ms (errors count as no); a
    ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    import redis

    give_up = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            answer = condition()
            if answer:
                return answer
        if time.monotonic() > give_up:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


class RedisNode:
    """One ``redis-server`` process (a data node or a Sentinel) on a port of 127.0.0.1."""

    def __init__(
        self, directory: Path, name: str, password: str, *, sentinel: bool = False
    ) -> None:
        self.directory = directory / name
        # The deployment's own: another test run's Sentinel or replica that reaches one of
        # these ports (a port it used before, reused since: two suites run at once on CI)
        # cannot authenticate, so it can neither reconfigure nor replicate from these nodes.
        self.password = password
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.sentinel = sentinel
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def client(self, **settings: Any) -> Any:
        """A new ``redis.Redis`` on this node (short timeouts: it is the test's, for admin)."""
        import redis

        return redis.Redis(
            **{
                "host": "127.0.0.1",
                "port": self.port,
                "password": None if self.sentinel else self.password,
                "socket_timeout": TIMEOUT,
                "socket_connect_timeout": 5,
                **settings,
            }
        )

    def start(
        self, *, replica_of: RedisNode | None = None, monitor: RedisNode | None = None
    ) -> None:
        """Start on its port of before (Sentinel knows a node by its address), else on a free
        port (another one if a process took it meanwhile); return once it answers."""
        for attempt in range(20):
            if not (attempt == 0 and self.port):
                self.port = free_port()
            if self._started(replica_of, monitor):
                return
        raise RuntimeError(f"{self.name}: no free port after 20 tries")

    def _started(self, replica_of: RedisNode | None, monitor: RedisNode | None) -> bool:
        log = self.directory / "log"
        log.unlink(missing_ok=True)
        common = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.directory}"',
            f'logfile "{log}"',
            "daemonize no",
            "loglevel notice",
        ]
        if self.sentinel:
            assert monitor is not None
            host, port = monitor.address
            lines = [
                *common,
                f"sentinel monitor {SERVICE} {host} {port} 1",
                f"sentinel auth-pass {SERVICE} {self.password}",
                # Never by itself: a loaded machine must not fail the primary over mid-test.
                # Failovers are asked for (SENTINEL FAILOVER).
                f"sentinel down-after-milliseconds {SERVICE} 600000",
                f"sentinel failover-timeout {SERVICE} 60000",
                f"sentinel parallel-syncs {SERVICE} 1",
            ]
        else:
            lines = [*common, 'save ""', "appendonly no", "repl-diskless-sync no"]
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
            if replica_of is not None:
                lines.append("replicaof {} {}".format(*replica_of.address))
        config = self.directory / "redis.conf"  # (Sentinel rewrites its own: a file it owns)
        config.write_text("\n".join(lines) + "\n")
        command = [_binary(), str(config)] + (["--sentinel"] if self.sentinel else [])
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # stopped by tests: see RedisServer.start
        )
        give_up = time.monotonic() + TIMEOUT
        while True:
            if self.process.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                self.process = None
                if "Address already in use" in text:
                    return False  # lost the race for the port: another one
                raise RuntimeError(f"{self.name} exited at start: {text[-2000:]}")
            with contextlib.suppress(Exception), self.client(socket_timeout=1) as probe:
                # Ours, not a server of another test run that took the port meanwhile.
                if probe.info("server")["process_id"] == self.process.pid:
                    return True
            if time.monotonic() > give_up:
                self.kill()
                raise RuntimeError(f"{self.name} did not answer within {TIMEOUT:.0f} s")
            time.sleep(0.01)

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, number)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # (a stopped process dies of SIGKILL too)
            process.wait(timeout=TIMEOUT)
            if process.stderr is not None:
                process.stderr.close()

    def info(self, section: str = "replication") -> dict[str, Any]:
        with self.client() as c:
            return c.info(section)  # type: ignore[no-any-return]


class RedisReplicated:
    """A primary, a replica and one Sentinel (quorum 1) in ``directory``.

    Attributes:
        primary, replica: The data nodes, by their role now (swapped by ``failover``).
        sentinel: The Sentinel node.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.password = secrets.token_hex(8)
        self.primary = RedisNode(directory, "a", self.password)
        self.replica = RedisNode(directory, "b", self.password)
        self.sentinel = RedisNode(directory, "sentinel", self.password, sentinel=True)
        self._stalled = False
        try:
            self.primary.start()
            self.replica.start(replica_of=self.primary)
            self.wait_caught_up()
            self.sentinel.start(monitor=self.primary)
            self._wait_sentinel_ready()
        except BaseException:
            self.stop()
            raise

    # Addresses.

    def url(self, scheme: str = "redis+sentinel", **query: Any) -> str:
        """The store URL that reaches the master through Sentinel, with ``query`` parameters."""
        host, port = self.sentinel.address
        text = f"{scheme}://:{self.password}@{host}:{port}/{SERVICE}"  # (the master's)
        if query:
            text += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return text

    def direct_url(self, **query: Any) -> str:
        """``redis://`` straight to the primary now (it does not follow a failover)."""
        host, port = self.primary.address
        text = f"redis://:{self.password}@{host}:{port}/0"
        if query:
            text += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return text

    def sentinel_master(self) -> tuple[str, int] | None:
        """The master's address as Sentinel names it to clients now (``SENTINEL MASTERS``,
        which redis-py asks), or None while a failover runs. (``GET-MASTER-ADDR-BY-NAME``
        names the promoted replica earlier, while Sentinel still reconfigures the others.)"""
        with self.sentinel.client() as c:
            state = c.sentinel_master(SERVICE)
        if state["is_sdown"] or state["is_odown"] or "failover_in_progress" in state["flags"]:
            return None
        return state["ip"], int(state["port"])

    # Conditions.

    def caught_up(self) -> bool:
        """Whether the replica has applied everything the primary wrote (its offset, which it
        reports itself, equals the primary's)."""
        with self.primary.client() as p, self.replica.client() as r:
            written = p.info("replication")["master_repl_offset"]
            replica = r.info("replication")
            return bool(
                replica.get("master_link_status") == "up"
                and replica["slave_repl_offset"] >= written
            )

    def wait_caught_up(self, timeout: float = TIMEOUT) -> None:
        wait_for(self.caught_up, f"{self.replica.name} to catch up", timeout)

    def _sentinel_knows_replica(self) -> bool:
        with self.sentinel.client() as c:
            replicas = c.sentinel_slaves(SERVICE)
        return any(
            row["port"] == self.replica.port
            and row["flags"] == "slave"
            and row["master-link-status"] == "ok"
            and row["master-port"] == self.primary.port
            for row in replicas
        )

    def _wait_sentinel_ready(self) -> None:
        wait_for(
            lambda: self.sentinel_master() == self.primary.address,
            "Sentinel to name the primary",
        )
        wait_for(self._sentinel_knows_replica, "Sentinel to see the replica healthy")

    # Faults.

    def stall(self) -> None:
        """Stop the replica from taking writes: from now on, a write the primary acknowledges
        stays in the primary's memory (see the module's docstring). ``resume()`` undoes it."""
        self.wait_caught_up()
        self.replica.signal(signal.SIGSTOP)
        self._stalled = True
        chunk = b"x" * (1 << 20)
        with self.primary.client() as p:
            for n in range(200):
                p.set(f"{FILLER}{n}", chunk)
                held = [c for c in p.client_list(_type="replica") if int(c["tot-mem"]) > 0]
                # The replica's socket is full when the primary holds more than a chunk for it.
                if held and int(held[0]["omem"]) > 2 * len(chunk):
                    return
        raise RuntimeError("the primary's socket to the stopped replica never filled")

    def resume(self) -> None:
        """Let a stalled replica run again (what it had received, it applies)."""
        self.replica.signal(signal.SIGCONT)
        self._stalled = False

    def kill_primary(self) -> None:
        self.primary.kill()

    def failover(self) -> None:
        """Sentinel promotes the replica (resumed first, if stalled); returns once Sentinel
        names it as master and it says it is one. ``primary`` is then the promoted node;
        ``replica`` the old primary (``rejoin()`` restarts it if it was killed)."""
        if self._stalled:
            self.resume()
        promoted = self.replica

        def asked() -> bool:
            with self.sentinel.client() as c:
                try:
                    c.execute_command("SENTINEL", "FAILOVER", SERVICE)
                except Exception as exc:
                    # NOGOODSLAVE: Sentinel has not heard from the replica lately (it was
                    # stopped); INPROG: a failover runs already.
                    if "INPROG" in str(exc):
                        return True
                    raise
            return True

        wait_for(asked, "Sentinel to accept SENTINEL FAILOVER")
        wait_for(
            lambda: self.sentinel_master() == promoted.address,
            f"Sentinel to name {promoted.name} master",
        )
        wait_for(lambda: promoted.info()["role"] == "master", f"{promoted.name} to act as master")
        self.primary, self.replica = promoted, self.primary
        with contextlib.suppress(Exception), self.primary.client() as p:
            fillers = list(p.scan_iter(match=FILLER + "*"))
            if fillers:
                p.delete(*fillers)

    def rejoin(self) -> None:
        """Restart the old primary (killed) as a replica of the new one, and wait until it has
        caught up and Sentinel sees it healthy: ready for the next failover."""
        if self.replica.process is None:
            self.replica.start(replica_of=self.primary)
        self.wait_caught_up()
        wait_for(self._sentinel_knows_replica, "Sentinel to see the rejoined replica healthy")

    def fail_over_now(self) -> None:
        """SIGKILL the primary, promote the replica, restart the old primary as a replica."""
        self.kill_primary()
        self.failover()
        self.rejoin()

    def healthy(self) -> None:
        """Bring the deployment back to a primary with a caught-up replica (after a test that
        failed midway)."""
        if self._stalled:
            self.resume()
        if self.primary.process is None:
            self.failover()
        self.rejoin()

    def stop(self) -> None:
        """Kill every process (SIGKILL: nothing to keep) and remove the directory."""
        for node in (self.sentinel, self.replica, self.primary):
            with contextlib.suppress(Exception):
                node.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def replicated() -> Iterator[RedisReplicated]:
    """A deployment in a temporary directory, stopped after (also on an error)."""
    deployment = RedisReplicated(Path(tempfile.mkdtemp(prefix="idemfn-redis-repl-")))
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="session")
def redis_replicated() -> Iterator[RedisReplicated]:
    """This worker's primary + replica + Sentinel; brought back to health before each use."""
    with replicated() as deployment:
        yield deployment
