"""Wall-clock jumps: on one machine a live claim's lease is timed on the monotonic clock, so a
clock set forwards or back by an hour never lets a second caller take it over.

The lease (60 s) is far shorter than the jump and far longer than the test: a caller judging it
on the wall clock would take the claim over at once, and no renewal needs to come in time."""

from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idemfn import AlreadyRunning, DiskStore, idempotent
from idemfn._record import FORMAT_VERSION, decode, encode
from idemfn._stores.clock import ServerClock

HOUR = 3600.0

# A process that claims "clock:k" (lease 60 s) and holds it, its wall clock shifted by argv[2]
# seconds.
HOLDER = textwrap.dedent("""
    import sys, time
    shift = float(sys.argv[2])
    real = time.time
    time.time = lambda: real() + shift
    from idemfn import DiskStore, idempotent

    @idempotent(key="k", name="clock", store=DiskStore(sys.argv[1]), lease=60.0)
    def hold():
        print("holding", flush=True)
        time.sleep(60)

    hold()
""")


@pytest.fixture
def holder(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    store = tmp_path / "store"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store), str(request.param)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"holding\n"
        yield store
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("holder", "shift"), [(0.0, HOUR), (0.0, -HOUR), (-HOUR, 0.0), (HOUR, 0.0)], indirect=["holder"]
)
def test_a_clock_jump_never_hands_a_live_claim_to_a_second_caller(
    holder: Path, shift: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []

    @idempotent(key="k", name="clock", store=DiskStore(holder), lease=60.0, on_abandoned="retry")
    def hold() -> None:
        runs.append(1)

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + shift)  # this caller's clock jumped
    for _ in range(3):
        with pytest.raises(AlreadyRunning):
            hold()
    assert runs == []


def test_a_version_1_record_is_still_read(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")

    @idempotent(key="k", name="old", store=store)
    def body() -> str:
        return "recorded"

    body()
    entry = store.get("old:k")
    assert entry is not None and FORMAT_VERSION == 3
    fields = marshal.loads(encode(entry))
    version_1 = marshal.dumps((1, *fields[1:-1]), 4)  # as idemfn wrote it before lease_mono
    assert decode(version_1) == entry._replace(lease_mono=None)


def test_a_child_forked_while_the_server_clock_is_read_can_read_it() -> None:
    # A child forked while another thread of its parent read the server's clock inherited the
    # clock's lock held: its own first reading waited forever (found by review, issue 14).
    parent = os.getpid()
    reading, finish = threading.Event(), threading.Event()

    def read(first: bool) -> float:
        if os.getpid() != parent:
            return 1000.0
        reading.set()
        assert finish.wait(60)
        return 2000.0

    clock = ServerClock(read)
    thread = threading.Thread(target=clock.now)
    thread.start()
    try:
        assert reading.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: exit 0 once its clock answered
            os._exit(0 if 1000.0 <= clock.now() < 1100.0 else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        if done == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child hung"
    finally:
        finish.set()
        thread.join(30)
