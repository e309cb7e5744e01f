"""Real task-queue worker processes for the integration tests (Celery and RQ here; the other
queues' adapters in ``tests/support/queues/`` build on ``Worker``).

Each worker runs in its own session (process group), logs to a file the test can read, and is
SIGKILLed with its whole group when the test ends: nothing it holds needs a clean shutdown, and
each test uses queues, task ids and keys of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def effect(name: str, line: str) -> int:
    """Append ``line`` to the side-effect file ``name`` in ``$IDEMFN_TEST_EFFECTS``; return how
    many lines it now has. Task and job bodies call this; the tests count the lines."""
    path = Path(os.environ["IDEMFN_TEST_EFFECTS"]) / name
    with path.open("a") as f:
        f.write(line + "\n")
    return len(path.read_text().splitlines())


def held(name: str) -> None:
    """Block until the test releases ``name`` (``release(effects, name)``), or for 120 s at
    most: a body that a test must find running runs until the test has seen what it needs."""
    path = Path(os.environ["IDEMFN_TEST_EFFECTS"]) / f"release-{name}"
    give_up = time.monotonic() + 120
    while not path.exists() and time.monotonic() < give_up:
        time.sleep(0.01)


def release(effects: Path, name: str) -> None:
    """Let the bodies ``held`` on ``name`` go on (``effects``: their $IDEMFN_TEST_EFFECTS)."""
    (effects / f"release-{name}").touch()


def crash_on_first_run(name: str) -> str:
    """A body that hangs on its first run (the test SIGKILLs it there) and returns on others."""
    runs = effect(name, str(os.getpid()))
    if runs == 1:
        time.sleep(120)
    return f"finished on run {runs}"


def poll(condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """Call ``condition`` until it returns something true, and return that; fail after
    ``timeout`` seconds saying ``what`` was awaited."""
    give_up = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def lines(path: Path) -> list[str]:
    """The lines of ``path``, or [] while it does not exist."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class Worker:
    """A worker process started from ``argv`` in ``ROOT``, its output in ``log``."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str) -> None:
        self.argv = argv
        self.log = log
        self._out = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_for_log(ready, timeout=60)
        except BaseException:
            self.kill()  # never leave a worker that was not handed to the test running
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker {self.argv} exited ({self.process.returncode}):\n{self.output()}"
                )
            return text in self.output()

        try:
            poll(seen, f"{text!r} in the worker's log", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL the worker and every process it started."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        self._out.close()


def celery_worker(tmp_path: Path, env: dict[str, str], name: str, **options: Any) -> Worker:
    """A Celery worker of ``tests.support.celery_tasks``: prefork pool, concurrency 2."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "--workdir",
        str(options.get("workdir", ROOT)),
        "-A",
        str(options.get("app", "tests.support.celery_tasks")),
        "worker",
        "--pool",
        str(options.get("pool", "prefork")),
        "--concurrency",
        str(options.get("concurrency", 2)),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"{name}@%h",
    ]
    return Worker(argv, env, tmp_path / f"{name}.log", ready=" ready.")


def rq_worker(
    tmp_path: Path,
    env: dict[str, str],
    name: str,
    url: str,
    queue: str,
    worker_class: str,
    path: Path = ROOT,
) -> Worker:
    """An ``rq worker`` of ``queue`` with its scheduler, of class ``worker_class``, importing
    jobs from ``path``."""
    argv = [
        sys.executable,
        "-m",
        "rq.cli",
        "worker",
        "--url",
        url,
        "--name",
        name,
        "--path",
        str(path),
        "--worker-class",
        worker_class,
        "--with-scheduler",
        "--logging_level",
        "DEBUG",
        queue,
    ]
    return Worker(argv, env, tmp_path / f"{name}.log", ready="Listening on")
