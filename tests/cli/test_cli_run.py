"""``idemfn run``: a shell command at most once per key, its outcome replayed after.

Every test drives the real command in a subprocess (``python -m idemfn run``, so that a
signal sent to the process reaches the runner itself; the installed console script in a few
tests) against a ``DiskStore`` in ``tmp_path``, with an explicit environment and a timeout.
Commands are ``sh -c`` or ``python -c`` scripts that leave traces in files: a line appended per
execution is how runs are counted. Commands that must still be running at some point wait for
a release file (with their own deadline), and the tests poll for files instead of sleeping.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from idemfn import DiskStore, Status, idempotent
from idemfn._cli import process
from idemfn._cli.parser import Exit
from tests.support.cli import (
    PY,
    TIMEOUT,
    argv_of,
    checked,
    cli_env,
    idemfn_cli,
    needs_script,
    one_line,
    poll,
)
from tests.support.stores import age

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _default_dispositions() -> None:
    # A test runner started in the background ignores SIGINT, and children inherit that: give
    # the runner the dispositions it has when started from a terminal.
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)


def start(
    *args: str | Path, env: Mapping[str, str], new_session: bool = False
) -> subprocess.Popen[bytes]:
    """Start the command in the background, its output piped; with ``new_session``, in a
    session of its own (no terminal; the group can be killed) with default signal handling."""
    return subprocess.Popen(
        argv_of(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        start_new_session=new_session,
        preexec_fn=_default_dispositions if new_session else None,
    )


def finish(proc: subprocess.Popen[bytes], status: int | None) -> subprocess.CompletedProcess[bytes]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return checked(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), status)


def stop(*procs: subprocess.Popen[bytes], group: bool = False) -> None:
    """Kill (with its process group, when it leads one) and reap."""
    for proc in procs:
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def show(key: str, env: Mapping[str, str]) -> dict[str, Any]:
    return json.loads(idemfn_cli("show", key, "--json", env=env).stdout)  # type: ignore[no-any-return]


# A command that appends "<pid> <IDEMFN_ATTEMPT>" to LOG, prints to both streams, creates
# STARTED, then waits for RELEASE (120 s at most: never outliving a broken test for long) and
# exits with CODE.
BLOCK = """\
import os, sys, time
log, started, release, code = sys.argv[1:5]
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, f"{os.getpid()} {os.environ.get('IDEMFN_ATTEMPT')}\\n".encode())
os.close(fd)
sys.stdout.write(f"ran {os.getpid()}\\n")
sys.stdout.flush()
sys.stderr.write("to stderr\\n")
sys.stderr.flush()
open(started, "w").close()
give_up = time.monotonic() + 120
while not os.path.exists(release) and time.monotonic() < give_up:
    time.sleep(0.005)
sys.exit(int(code))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Blocker:
    """The files of a ``BLOCK`` command, and its command line."""

    def __init__(self, tmp_path: Path, code: int = 0) -> None:
        self.log = tmp_path / "runs.log"
        self.started = tmp_path / "started"
        self.release = tmp_path / "release"
        self.argv = [
            PY,
            "-c",
            BLOCK,
            str(self.log),
            str(self.started),
            str(self.release),
            str(code),
        ]

    def wait_started(self, *runners: subprocess.Popen[bytes]) -> None:
        def started() -> bool:
            for runner in runners:
                if runner.poll() is not None:
                    out, err = runner.communicate()
                    raise AssertionError(
                        f"the runner exited ({runner.returncode}): {out!r} {err!r}"
                    )
            return self.started.exists()

        poll(started, "the command to start")


# -- once, and replayed byte for byte --------------------------------------------------------


def test_run_twice_runs_the_command_once(tmp_path: Path, env: dict[str, str]) -> None:
    applied = tmp_path / "applied.txt"
    cmd = [
        "sh",
        "-c",
        'echo "applying $1"; echo "$1" >> "$2"; echo warned >&2',
        "sh",
        "0042",
        str(applied),
    ]
    first = idemfn_cli("run", "--key", "deploy:migrate:0042", "--", *cmd, env=env)
    assert (first.stdout, first.stderr) == (b"applying 0042\n", b"warned\n")
    assert applied.read_text() == "0042\n"
    second = idemfn_cli("run", "--key", "deploy:migrate:0042", "--", *cmd, env=env)
    assert (second.stdout, second.stderr) == (first.stdout, first.stderr)
    assert applied.read_text() == "0042\n", "the command ran twice"
    fields = show("deploy:migrate:0042", env)
    assert (fields["status"], fields["attempt"]) == ("ok", 1)
    assert fields["command"]["argv"] == cmd
    assert fields["command"]["exit_status"] == 0
    assert (fields["expires_at"], fields["ttl"]) == (None, None)  # kept forever


@needs_script
def test_console_script_runs_and_replays(tmp_path: Path, env: dict[str, str]) -> None:
    log = tmp_path / "log"
    cmd = ["sh", "-c", f'echo run >> {log}; echo "out"; echo "err" >&2; exit 4']
    first = idemfn_cli("run", "--key", "k", "--", *cmd, env=env, script=True, status=4)
    second = idemfn_cli("run", "--key", "k", "--", *cmd, env=env, script=True, status=4)
    third = idemfn_cli("run", "--key", "k", "--", *cmd, env=env, status=4)  # python -m: same
    assert first.stdout == second.stdout == third.stdout == b"out\n"
    assert first.stderr == second.stderr == third.stderr == b"err\n"
    assert lines(log) == ["run"]
    proc = idemfn_cli(
        "run", "--key", "k", "--", "sh", "-c", "exit 0", env=env, script=True, status=Exit.MISMATCH
    )
    assert "'k'" in one_line(proc.stderr)


BYTES = """\
import sys
code, size = int(sys.argv[1]), int(sys.argv[2])
sys.stdout.buffer.write(b"\\xff\\xfe\\x00 out\\r\\n")
sys.stdout.buffer.flush()
sys.stderr.buffer.write(b"\\x80err\\x00\\n")
sys.stderr.buffer.flush()
sys.stdout.buffer.write(bytes(range(256)) * size)
sys.stdout.buffer.write(b"no newline at the end \\xc3")
sys.stderr.buffer.write(b"\\xe9\\xe8" * size)
sys.exit(code)
"""


@pytest.mark.parametrize(("code", "size"), [(0, 0), (5, 0), (0, 4096)], ids=["ok", "exit5", "1MiB"])
def test_output_and_status_are_replayed_byte_for_byte(
    store: DiskStore, env: dict[str, str], code: int, size: int
) -> None:
    cmd = ["--", PY, "-c", BYTES, str(code), str(size)]
    out = b"\xff\xfe\x00 out\r\n" + bytes(range(256)) * size + b"no newline at the end \xc3"
    err = b"\x80err\x00\n" + b"\xe9\xe8" * size
    first = idemfn_cli("run", "--key", "bytes", *cmd, env=env, status=code)
    assert first.stdout == out
    assert first.stderr == err
    replay = idemfn_cli("run", "--key", "bytes", *cmd, env=env, status=code)
    assert replay.stdout == out
    assert replay.stderr == err
    entry = store.get("bytes")
    assert entry is not None
    assert entry.status == (Status.OK if code == 0 else Status.HALTED)
    if size:
        return
    fields = show("bytes", env)
    assert fields["command"]["exit_status"] == code
    assert fields["command"]["interrupted_by"] is None
    assert fields["command"]["dropped"] == 0
    assert fields["command"]["stdout"] == out.decode("utf-8", "backslashreplace")
    assert fields["command"]["stderr"] == err.decode("utf-8", "backslashreplace")
    # The text is for people (b"\\xff" and b"\xff" look alike there); base64 is the bytes.
    assert base64.b64decode(fields["command"]["stdout_base64"]) == out
    assert base64.b64decode(fields["command"]["stderr_base64"]) == err
    if code:
        assert fields["exc_type"] == "idemfn._run.CommandFailed"
        assert "exited with code 5" in fields["message"]


# Writes alternately to stdout and stderr; after each write, waits until the runner has read
# the pipe empty (FIONREAD), so that the runner sees the writes in the order they were made.
INTERLEAVE = """\
import fcntl, os, struct, sys, termios, time
def settle(fd):
    give_up = time.monotonic() + 60
    while struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\\0" * 4))[0]:
        if time.monotonic() > give_up:
            sys.exit(99)
        time.sleep(0.001)
for i in range(6):
    stream = sys.stdout if i % 2 == 0 else sys.stderr
    stream.write(f"{stream.name[1:-1]} {i}\\n")
    stream.flush()
    settle(stream.fileno())
sys.exit(3)
"""


def test_stdout_and_stderr_keep_their_order_in_one_pipe(
    tmp_path: Path, env: dict[str, str]
) -> None:
    expected = b"".join(f"{'stdout' if i % 2 == 0 else 'stderr'} {i}\n".encode() for i in range(6))
    for attempt in ("run", "replay"):
        proc = idemfn_cli(
            "run",
            "--key",
            "order",
            "--",
            PY,
            "-c",
            INTERLEAVE,
            env=env,
            status=3,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout == expected, attempt
    fields = show("order", env)
    assert fields["command"]["stdout"] == "stdout 0\nstdout 2\nstdout 4\n"
    assert fields["command"]["stderr"] == "stderr 1\nstderr 3\nstderr 5\n"


def test_a_command_ended_by_a_signal(store: DiskStore, env: dict[str, str]) -> None:
    cmd = ["--", PY, "-c", "import os, signal; print('x', flush=True); os.kill(os.getpid(), 9)"]
    first = idemfn_cli("run", "--key", "killed", *cmd, env=env, status=128 + 9)
    replay = idemfn_cli("run", "--key", "killed", *cmd, env=env, status=128 + 9)
    assert first.stdout == replay.stdout == b"x\n"
    assert first.stderr == replay.stderr == b""
    fields = show("killed", env)
    assert fields["status"] == "halted"
    assert fields["command"]["exit_status"] == 137
    assert "SIGKILL" in fields["command"]["ended"]
    text = idemfn_cli("show", "killed", env=env).stdout.decode()
    assert "SIGKILL" in text and "137" in text


def test_command_line_after_double_dash_is_passed_untouched(env: dict[str, str]) -> None:
    cmd = [
        PY,
        "-c",
        "import sys; print(sys.argv[1:])",
        "--",
        "--key",
        "x",
        "-v",
        "--store",
        "/nowhere",
        "--help",
        "run",
    ]
    proc = idemfn_cli("run", "--key", "argv", "--", *cmd, env=env)
    assert proc.stdout == b"['--', '--key', 'x', '-v', '--store', '/nowhere', '--help', 'run']\n"
    assert show("argv", env)["command"]["argv"] == cmd


def test_idemfn_key_and_attempt_are_in_the_command_environment(env: dict[str, str]) -> None:
    cmd = ["sh", "-c", 'printf "%s|%s" "$IDEMFN_KEY" "$IDEMFN_ATTEMPT"']
    key = "jobs:nightly 2026-11-22 \u00e9"
    proc = idemfn_cli("run", "--key", key, "--", *cmd, env=env)
    assert proc.stdout == f"{key}|1".encode()


def test_verbose_says_whether_it_ran_or_replayed(env: dict[str, str]) -> None:
    cmd = ["sh", "-c", "echo out; echo err >&2; exit 2"]
    ran = idemfn_cli("run", "-v", "--key", "loud", "--", *cmd, env=env, status=2)
    replayed = idemfn_cli("run", "--key", "loud", "--verbose", "--", *cmd, env=env, status=2)
    quiet = idemfn_cli("run", "--key", "loud", "--", *cmd, env=env, status=2)
    assert ran.stdout == replayed.stdout == quiet.stdout == b"out\n"
    assert quiet.stderr == b"err\n"  # without -v, idemfn adds nothing
    for proc in (ran, replayed):
        assert proc.stderr.startswith(b"err\n")
        note = one_line(proc.stderr[len(b"err\n") :])
        assert note.startswith("idemfn") and "'loud'" in note
    assert ran.stderr != replayed.stderr  # one says it ran, the other that it replayed


def test_ttl_expires_the_record(store: DiskStore, tmp_path: Path, env: dict[str, str]) -> None:
    log = tmp_path / "log"
    cmd = ["--", "sh", "-c", f"echo x >> {log}"]
    idemfn_cli("run", "--key", "short", "--ttl", "60.5", *cmd, env=env)
    entry = store.get("short")
    assert entry is not None and entry.expires_at is not None and entry.finished_at is not None
    assert entry.ttl == 60.5
    assert entry.expires_at - entry.finished_at == pytest.approx(60.5)
    # As it will stand in a minute (a ttl short enough to wait for could run out on a busy
    # machine before the record was first read).
    age(store, "short", 61)
    assert store.get("short") is None
    idemfn_cli("run", "--key", "short", "--ttl", "60.5", *cmd, env=env)  # runs again
    assert lines(log) == ["x", "x"]
    idemfn_cli("run", "--key", "forever", "--ttl", "none", *cmd, env=env)
    fields = show("forever", env)
    assert (fields["ttl"], fields["expires_at"]) == (None, None)


def test_run_creates_a_missing_store_but_not_its_parents(tmp_path: Path) -> None:
    store_dir = tmp_path / "new-store"
    env = cli_env(store_dir)
    idemfn_cli("run", "--key", "k", "--", "true", env=env)
    assert (store_dir / "cache.db").is_file()
    assert show("k", env)["status"] == "ok"
    # A mistyped path must not become a new, empty store in which every step runs again.
    marker = tmp_path / "ran"
    typo = tmp_path / "nwe" / "store"
    proc = idemfn_cli(
        "run", "--key", "k", "--", "touch", marker, env=cli_env(typo), status=Exit.NO_STORE
    )
    assert str(typo) in one_line(proc.stderr)
    assert not marker.exists()
    assert not (tmp_path / "nwe").exists()


# -- fingerprints ----------------------------------------------------------------------------


def test_another_command_with_the_key_is_a_mismatch(tmp_path: Path, env: dict[str, str]) -> None:
    log = tmp_path / "log"
    idemfn_cli("run", "--key", "k", "--", "sh", "-c", f"echo a >> {log}", env=env)
    for other in (
        ["sh", "-c", f"echo b >> {log}"],
        ["sh", "-c", f"echo a >> {log}", "extra"],
        ["sh", "-c", f"echo a >>  {log}"],
    ):
        proc = idemfn_cli("run", "--key", "k", "--", *other, env=env, status=Exit.MISMATCH)
        assert proc.stdout == b""
        assert "'k'" in one_line(proc.stderr)
    assert lines(log) == ["a"]
    assert show("k", env)["command"]["argv"] == ["sh", "-c", f"echo a >> {log}"]


def test_fingerprint_env(tmp_path: Path, store_dir: Path) -> None:
    log = tmp_path / "log"
    cmd = ["--", "sh", "-c", f'echo "$STAGE" >> {log}']

    def run(key: str, status: int, **variables: str | None) -> None:
        env = cli_env(store_dir, **variables)
        idemfn_cli(
            "run", "--key", key, "--fingerprint-env", "STAGE", "OTHER", *cmd, env=env, status=status
        )

    run("deploy", 0, STAGE="blue", OTHER=None)
    run("deploy", 0, STAGE="blue", OTHER=None)  # replayed
    run("deploy", Exit.MISMATCH, STAGE="green", OTHER=None)
    run("deploy", Exit.MISMATCH, STAGE="blue", OTHER="")  # unset and empty differ
    assert lines(log) == ["blue"]
    # Without --fingerprint-env, the environment is not part of the fingerprint.
    idemfn_cli("run", "--key", "plain", *cmd, env=cli_env(store_dir, STAGE="a"))
    idemfn_cli("run", "--key", "plain", *cmd, env=cli_env(store_dir, STAGE="b"))
    assert lines(log) == ["blue", "a"]
    # ... and naming variables changes it.
    proc = idemfn_cli(
        "run",
        "--key",
        "plain",
        "--fingerprint-env",
        "STAGE",
        *cmd,
        env=cli_env(store_dir, STAGE="a"),
        status=Exit.MISMATCH,
    )
    assert "'plain'" in one_line(proc.stderr)


def test_python_records_are_not_replayed_as_commands(
    store: DiskStore, tmp_path: Path, env: dict[str, str]
) -> None:
    @idempotent(key="report:{n}", name="jobs", store=store)
    def report(n: int) -> int:
        return n

    report(1)
    marker = tmp_path / "ran"
    proc = idemfn_cli(
        "run", "--key", "jobs:report:1", "--", "touch", str(marker), env=env, status=Exit.MISMATCH
    )
    assert "jobs:report:1" in one_line(proc.stderr)
    assert not marker.exists()


def test_run_on_a_halted_python_record_without_fingerprint(
    store: DiskStore, tmp_path: Path, env: dict[str, str]
) -> None:
    @idempotent(key="send:{n}", name="mail", store=store, fingerprint=False)
    def send(n: int) -> None:
        raise ValueError("smtp refused")

    with pytest.raises(ValueError, match="smtp"):
        send(1)
    marker = tmp_path / "ran"
    proc = idemfn_cli(
        "run", "--key", "mail:send:1", "--", "touch", str(marker), env=env, status=None
    )
    assert not marker.exists()
    assert "mail:send:1" in one_line(proc.stderr)
    assert proc.returncode in (Exit.MISMATCH, Exit.HALTED), proc.returncode


# -- nothing recorded: not found, not executable, --retry-on-exit ----------------------------


def test_a_command_that_cannot_start_records_nothing(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    cases = [
        ("nf:1", ["no-such-command-for-idemfn-tests"], Exit.NOT_FOUND),
        ("nf:2", [str(tmp_path / "missing" / "cmd")], Exit.NOT_FOUND),
        ("ne:1", [str(script)], Exit.CANNOT_EXECUTE),
        ("ne:2", [str(tmp_path)], Exit.CANNOT_EXECUTE),
    ]
    for key, cmd, status in cases:
        proc = idemfn_cli("run", "--key", key, "--", *cmd, "arg", env=env, status=status)
        assert proc.stdout == b""
        line = one_line(proc.stderr)
        assert cmd[0] in line and repr(key) in line, line
        assert store.get(key) is None
    # The key was released: the next run runs.
    proc = idemfn_cli("run", "--key", "nf:1", "--", "sh", "-c", "echo now", env=env)
    assert proc.stdout == b"now\n"


def test_retry_on_exit_releases_the_key(tmp_path: Path, env: dict[str, str]) -> None:
    log = tmp_path / "log"
    counter = (
        f'echo x >> {log}; n=$(wc -l < {log}); echo "try $n"; [ "$n" -ge 3 ] || exit $((n + 2))'
    )
    cmd = ["--retry-on-exit", "3", "--retry-on-exit", "4", "9", "--", "sh", "-c", counter]
    first = idemfn_cli("run", "--key", "flaky", *cmd, env=env, status=3)
    assert first.stdout == b"try 1\n"
    idemfn_cli("show", "flaky", env=env, status=Exit.NO_RECORD)  # released: no record
    second = idemfn_cli("run", "--key", "flaky", *cmd, env=env, status=4)
    assert second.stdout == b"try 2\n"
    third = idemfn_cli("run", "--key", "flaky", *cmd, env=env)
    assert third.stdout == b"try 3\n"
    assert idemfn_cli("run", "--key", "flaky", *cmd, env=env).stdout == b"try 3\n"
    assert lines(log) == ["x", "x", "x"]
    # A status not listed is recorded.
    idemfn_cli(
        "run",
        "--key",
        "hard",
        "--retry-on-exit",
        "3",
        "--",
        "sh",
        "-c",
        "exit 5",
        env=env,
        status=5,
    )
    assert show("hard", env)["status"] == "halted"


def test_retry_on_exit_with_the_status_of_a_signal(env: dict[str, str]) -> None:
    cmd = ["--retry-on-exit", "137", "--", PY, "-c", "import os; os.kill(os.getpid(), 9)"]
    idemfn_cli("run", "--key", "oom", *cmd, env=env, status=137)
    idemfn_cli("show", "oom", env=env, status=Exit.NO_RECORD)


def test_forget_then_run_runs_again(tmp_path: Path, env: dict[str, str]) -> None:
    log = tmp_path / "log"
    cmd = ["--", "sh", "-c", f'echo "$IDEMFN_ATTEMPT" >> {log}; exit 1']
    idemfn_cli("run", "--key", "step", *cmd, env=env, status=1)
    idemfn_cli("run", "--key", "step", *cmd, env=env, status=1)
    assert lines(log) == ["1"]
    proc = idemfn_cli("forget", "--status", "halted", "step", env=env)
    assert "step" in proc.stdout.decode()
    idemfn_cli("run", "--key", "step", *cmd, env=env, status=1)
    assert lines(log) == ["1", "1"]


# -- a key in flight -------------------------------------------------------------------------


def test_a_running_key_is_75_or_waited_for(tmp_path: Path, env: dict[str, str]) -> None:
    block = Blocker(tmp_path, code=6)
    owner = start("run", "--key", "busy", "--", *block.argv, env=env)
    try:
        block.wait_started(owner)
        proc = idemfn_cli("run", "--key", "busy", "--", *block.argv, env=env, status=Exit.RUNNING)
        assert proc.stdout == b""
        assert "'busy'" in one_line(proc.stderr)
        began = time.monotonic()
        idemfn_cli(
            "run", "--key", "busy", "--wait", "0.3", "--", *block.argv, env=env, status=Exit.RUNNING
        )
        assert time.monotonic() - began >= 0.3
        waiter = start("run", "--key", "busy", "--wait", "30", "--", *block.argv, env=env)
        block.release.touch()
        ran = finish(owner, 6)
        waited = finish(waiter, 6)
    finally:
        stop(owner)
    assert ran.stdout == waited.stdout and ran.stdout.startswith(b"ran ")
    assert ran.stderr == waited.stderr == b"to stderr\n"
    assert len(lines(block.log)) == 1


def test_a_claim_forgotten_with_force_mid_run_is_71(tmp_path: Path, env: dict[str, str]) -> None:
    block = Blocker(tmp_path)
    runner = start("run", "--key", "taken", "--", *block.argv, env=env)
    try:
        block.wait_started(runner)
        idemfn_cli("forget", "taken", env=env, status=Exit.RUNNING)
        idemfn_cli("forget", "--force", "taken", env=env)
        block.release.touch()
        proc = finish(runner, Exit.LOST)
    finally:
        stop(runner)
    assert proc.stdout.startswith(b"ran ")  # streamed live
    assert proc.stderr.startswith(b"to stderr\n")
    assert "'taken'" in one_line(proc.stderr[len(b"to stderr\n") :])
    idemfn_cli("show", "taken", env=env, status=Exit.NO_RECORD)  # its outcome is not recorded


def _has_open(pid: int, path: Path) -> bool:
    """Whether ``pid`` has ``path`` open (True when that cannot be told: do not wait for it)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("wait", [False, True], ids=["no-wait", "wait"])
def test_eight_racing_runs_execute_the_command_once(
    tmp_path: Path, store_dir: Path, env: dict[str, str], wait: bool
) -> None:
    block = Blocker(tmp_path, code=3)
    options = ["--wait", "30"] if wait else []
    runners = [
        start("run", "--key", "race", *options, "--", *block.argv, env=env) for _ in range(8)
    ]
    try:
        poll(block.started.exists, "the command to start")
        if wait:  # every runner has reached the store: it runs, or waits for the one that does
            poll(
                lambda: all(_has_open(r.pid, store_dir / "cache.db") for r in runners),
                "the runners to open the store",
            )
        else:  # every other runner finds the key running, and says so at once
            poll(lambda: sum(r.poll() is not None for r in runners) == 7, "7 runners to exit")
        block.release.touch()
        results = [finish(r, status=None) for r in runners]
    finally:
        stop(*runners)
    assert len(lines(block.log)) == 1, "the command ran more than once"
    pid = lines(block.log)[0].split()[0]
    expected = (3, f"ran {pid}\n".encode(), b"to stderr\n")
    outcomes = [(p.returncode, p.stdout, p.stderr) for p in results]
    if wait:
        assert outcomes == [expected] * 8
    else:
        assert sorted(outcomes).count(expected) == 1, outcomes
        for status, out, err in outcomes:
            if (status, out, err) != expected:
                assert (status, out) == (Exit.RUNNING, b"")
                assert "'race'" in one_line(err)
    late = idemfn_cli("run", "--key", "race", "--", *block.argv, env=env, status=3)
    assert (3, late.stdout, late.stderr) == expected
    assert len(lines(block.log)) == 1


# -- a killed runner -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("on_abandoned", ["halt", "retry"])
def test_a_sigkilled_runner_leaves_an_abandoned_key(
    tmp_path: Path, store: DiskStore, env: dict[str, str], on_abandoned: str
) -> None:
    block = Blocker(tmp_path)
    # A session of its own: were the command to outlive its runner, its group can be killed.
    runner = start("run", "--key", "k", "--", *block.argv, env=env, new_session=True)
    try:
        block.wait_started(runner)
        command = int(lines(block.log)[0].split()[0])
        runner.kill()
        runner.wait(timeout=TIMEOUT)
        # The command dies with its runner (its supervisor kills it): no retry runs beside it.
        poll(lambda: not _alive(command), "the command to die with its runner", timeout=60)
    finally:
        stop(runner, group=True)
    [listed] = json.loads(idemfn_cli("ls", "--json", env=env).stdout)
    assert (listed["key"], listed["status"], listed["state"]) == ("k", "processing", "abandoned")
    assert str(runner.pid) in listed["owner_gone"]
    text = idemfn_cli("ls", env=env).stdout.decode().splitlines()
    assert text[1].split()[:2] == ["k", "abandoned"]
    if on_abandoned == "halt":
        # No --wait: were the dead runner not seen at the first look, this would exit RUNNING
        # (its lease has 30 s to go).
        proc = idemfn_cli("run", "--key", "k", "--", *block.argv, env=env, status=Exit.HALTED)
        assert proc.stdout == b""
        assert "'k'" in one_line(proc.stderr)
        fields = show("k", env)
        assert (fields["status"], fields["state"]) == ("halted", "halted")
        assert "abandoned" in fields["reason"]
        idemfn_cli("run", "--key", "k", "--", *block.argv, env=env, status=Exit.HALTED)
        assert len(lines(block.log)) == 1
        return
    block.release.touch()  # the second run's command finishes at once
    proc = idemfn_cli(
        "run", "--key", "k", "--wait", "20", "--on-abandoned", "retry", "--", *block.argv, env=env
    )
    assert [line.split()[1] for line in lines(block.log)] == ["1", "2"]  # IDEMFN_ATTEMPT
    pid = lines(block.log)[1].split()[0]
    assert proc.stdout == f"ran {pid}\n".encode()
    entry = store.get("k")
    assert entry is not None and (entry.status, entry.attempt) == (Status.OK, 2)
    replay = idemfn_cli("run", "--key", "k", "--on-abandoned", "retry", "--", *block.argv, env=env)
    assert replay.stdout == proc.stdout
    assert len(lines(block.log)) == 2


# A step of a command: records its pid in DIR/NAME.pid (NAME "daemon" after detaching itself
# as a daemon does: fork, setsid, fork; "group" in a process group of its own, where
# `timeout 600 step` puts its step) and waits for DIR/release (120 s at most). A later
# attempt (IDEMFN_ATTEMPT 2) only writes to DIR/seen whether the first attempt's "fg" step still
# ran when it started, and exits.
STEP = """\
import os, sys, time
where, name = sys.argv[1:3]
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False
if os.environ.get("IDEMFN_ATTEMPT") != "1":
    with open(os.path.join(where, "fg.pid")) as f:
        seen = "alive" if alive(int(f.read())) else "dead"
    with open(os.path.join(where, "seen"), "w") as f:
        f.write(seen)
    sys.exit(0)
if name == "daemon":
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
if name == "group":
    os.setpgid(0, 0)
path = os.path.join(where, name + ".pid")
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(path + ".tmp", path)
give_up = time.monotonic() + 120
while not os.path.exists(os.path.join(where, "release")) and time.monotonic() < give_up:
    time.sleep(0.01)
"""


def _step(where: Path, *names: str) -> list[str]:
    """``sh -c`` running STEP for each name in turn ("NAME &" in the background)."""
    steps = [
        f'"$0" -c "$1" "$2" {name.rstrip(" &")}{" &" if name.endswith("&") else ";"}'
        for name in names
    ]
    return ["sh", "-c", " ".join([*steps, "echo done"]), PY, STEP, str(where)]


def _pids(where: Path, *names: str) -> dict[str, int]:
    return {name: int((where / f"{name}.pid").read_text()) for name in names}


def _started(runner: subprocess.Popen[bytes], where: Path, *names: str) -> dict[str, int]:
    """The pids of the steps ``names`` once each has started, the runner still running."""
    poll(
        lambda: all((where / f"{n}.pid").exists() for n in names) or runner.poll() is not None,
        "the steps to start",
    )
    assert runner.poll() is None, runner.communicate()
    return _pids(where, *names)


def _kill_started(where: Path, *names: str) -> None:
    """Leave none of the steps ``names`` that started running, whatever the test found."""
    _kill_all(_pids(where, *(n for n in names if (where / f"{n}.pid").exists())).values())


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def _kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux only")
def test_a_sigkilled_runner_takes_everything_its_command_started(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # Issue 14, item 5: PR_SET_PDEATHSIG took down only the command's own process (sh), and
    # `step` of `sh -c 'step; echo done'` ran on beside a retry. A background job and a
    # process that detached itself (a daemon) go too: the command is not finished.
    where = tmp_path / "steps"
    where.mkdir()
    cmd = _step(where, "bg &", "daemon", "fg")
    runner = start("run", "--key", "k", "--", *cmd, env=env, new_session=True)
    names = ("bg", "daemon", "fg")
    try:
        pids = _started(runner, where, *names)
        runner.kill()
        runner.wait(timeout=TIMEOUT)
        for name, pid in pids.items():
            poll(lambda pid=pid: not _alive(pid), f"the {name} step to die with its runner")
    finally:
        stop(runner, group=True)
        _kill_started(where, *names)
    assert not (where / "release").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux only")
def test_a_retry_waits_until_the_abandoned_attempt_is_gone(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # The supervising process that kills what the dead runner's command started is kept from
    # seeing its runner die (the test holds another write end of its control pipe), so it
    # cannot: the retry must wait for it rather than run beside `fg`. (Not SIGSTOP: the kernel
    # continues a stopped process whose process group its parent's death orphans.)
    where = tmp_path / "steps"
    where.mkdir()
    cmd = ["run", "--key", "k", "--on-abandoned", "retry", "--", *_step(where, "fg")]
    first = start(*cmd, env=env, new_session=True)
    err = tmp_path / "retry.err"
    second: subprocess.Popen[bytes] | None = None
    held: list[int] = []
    try:
        poll(lambda: (where / "fg.pid").exists() or first.poll() is not None, "the step to start")
        assert first.poll() is None, first.communicate()
        [between] = _children(first.pid)  # the process between the runner and the command
        ctl = Path(f"/proc/{between}/cmdline").read_bytes().split(b"\0")[4].decode()
        held.append(os.open(f"/proc/{between}/fd/{ctl}", os.O_WRONLY | os.O_NONBLOCK))
        first.kill()
        first.wait(timeout=TIMEOUT)
        with open(err, "wb") as stderr:
            second = subprocess.Popen(
                argv_of(cmd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                start_new_session=True,
            )
        poll(
            lambda: (
                (where / "seen").exists()
                or b"waiting for" in err.read_bytes()
                or second.poll() is not None
            ),
            "the retry to wait, or to run",
        )
        os.close(held.pop())  # the supervisor now sees its runner gone
        out, _ = second.communicate(timeout=TIMEOUT)
        assert second.returncode == 0, (out, err.read_bytes())
    finally:
        for fd in held:
            os.close(fd)
        stop(first, group=True)
        if second is not None:
            stop(second, group=True)
        if (where / "fg.pid").exists():
            _kill_all([_pids(where, "fg")["fg"]])
    assert (where / "seen").read_text() == "dead"
    assert out == b"done\n"
    assert b"waiting for" in err.read_bytes()


# -- signals sent to the runner --------------------------------------------------------------

# Catches SIG (unless "-"), writes its name to MARK, and exits with CODE.
CATCH = """\
import os, signal, sys, time
name, mark, started, code = sys.argv[1:5]
def caught(signum, frame):
    with open(mark, "w") as f:
        f.write(signal.Signals(signum).name)
    sys.stdout.write("bye\\n")
    sys.stdout.flush()
    os._exit(int(code))
if name != "-":
    signal.signal(getattr(signal, name), caught)
sys.stdout.write("ready\\n")
sys.stdout.flush()
open(started, "w").close()
give_up = time.monotonic() + 120
while time.monotonic() < give_up:
    time.sleep(0.01)
sys.exit(99)
"""


@pytest.mark.parametrize(
    ("sig", "caught", "code"),
    [
        (signal.SIGTERM, True, 7),
        (signal.SIGTERM, True, 0),  # exited 0 after the signal: 128+15, never a success
        (signal.SIGTERM, False, 128 + signal.SIGTERM),
        (signal.SIGINT, True, 130),  # no terminal: the runner has a session of its own
        (signal.SIGHUP, True, 1),
        (signal.SIGQUIT, True, 2),
    ],
    ids=["TERM-7", "TERM-0", "TERM-uncaught", "INT", "HUP", "QUIT"],
)
def test_signals_are_forwarded_and_the_key_halts(
    tmp_path: Path, env: dict[str, str], sig: signal.Signals, caught: bool, code: int
) -> None:
    mark, started = tmp_path / "mark", tmp_path / "started"
    expected = code or 128 + sig  # a halted record never exits 0
    cmd = [PY, "-c", CATCH, sig.name if caught else "-", str(mark), str(started), str(code)]
    runner = start("run", "--key", "sig", "--", *cmd, env=env, new_session=True)
    try:
        poll(lambda: started.exists() or runner.poll() is not None, "the command to start")
        assert runner.poll() is None, runner.communicate()
        runner.send_signal(sig)
        # A command that died of the signal takes the runner down with the same signal (so
        # that a shell script stops, as it would had it run the command itself).
        first = finish(runner, expected if caught else -sig)
    finally:
        stop(runner, group=True)
    assert first.stdout == (b"ready\nbye\n" if caught else b"ready\n")
    assert first.stderr == b""
    if caught:
        assert mark.read_text() == sig.name
    fields = show("sig", env)
    assert fields["status"] == "halted"  # whatever the command exited with
    assert fields["command"]["interrupted_by"] == sig.name
    assert fields["command"]["exit_status"] == expected
    assert sig.name in fields["command"]["ended"]
    replay = idemfn_cli("run", "--key", "sig", "--", *cmd, env=env, status=expected)
    assert (replay.stdout, replay.stderr) == (first.stdout, first.stderr)


# -- output -----------------------------------------------------------------------------------


def test_a_reader_that_leaves_stops_neither_the_command_nor_the_record(
    tmp_path: Path, env: dict[str, str]
) -> None:
    done = tmp_path / "done"
    code = (
        "import sys\n"
        "for i in range(20000):\n"
        "    sys.stdout.write(f'line {i:05}\\n')\n"
        "sys.stdout.flush()\n"
        f"open({str(done)!r}, 'w').close()\n"
        "sys.stderr.write('finished\\n')\n"
        "sys.exit(3)\n"
    )
    cmd = ["run", "--key", "piped", "--", PY, "-c", code]
    runner = start(*cmd, env=env)
    try:
        assert runner.stdout is not None and runner.stderr is not None
        assert runner.stdout.readline() == b"line 00000\n"  # `| head -1`
        runner.stdout.close()
        err = runner.stderr.read()
        status = runner.wait(timeout=TIMEOUT)
    finally:
        stop(runner)
    assert (status, err) == (3, b"finished\n")
    assert done.exists()
    replay = idemfn_cli(*cmd, env=env, status=3)
    assert replay.stdout == b"".join(f"line {i:05}\n".encode() for i in range(20000))
    assert replay.stderr == b"finished\n"


def test_a_background_process_holding_the_pipes_does_not_hold_the_runner(
    env: dict[str, str],
) -> None:
    # The background process holds the pipes for 10 minutes: a runner that waited for them to
    # close would outlast the command's timeout (TIMEOUT, 60 s) and fail the test.
    cmd = ["--", "sh", "-c", "sleep 600 & echo $!; echo done"]
    proc = idemfn_cli("run", "--key", "bg", *cmd, env=env)
    pid = int(proc.stdout.split()[0])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    assert proc.stdout.endswith(b"\ndone\n")
    assert idemfn_cli("run", "--key", "bg", *cmd, env=env).stdout == proc.stdout


def test_max_output_caps_what_is_recorded(env: dict[str, str]) -> None:
    cmd = ["--", "sh", "-c", "printf 0123456789abcdef"]
    first = idemfn_cli("run", "--key", "capped", "--max-output", "10", *cmd, env=env)
    assert first.stdout == b"0123456789abcdef"  # streamed in full
    assert "6" in one_line(first.stderr)  # says how much the record leaves out
    replay = idemfn_cli("run", "--key", "capped", "--max-output", "10", *cmd, env=env)
    assert replay.stdout == b"0123456789"
    assert "6" in one_line(replay.stderr)
    fields = show("capped", env)
    assert (fields["command"]["stdout"], fields["command"]["dropped"]) == ("0123456789", 6)
    # 0 records no output at all.
    cmd = ["--", "sh", "-c", "echo out; echo err >&2; exit 2"]
    idemfn_cli("run", "--key", "none", "--max-output", "0", *cmd, env=env, status=2)
    replay = idemfn_cli("run", "--key", "none", "--max-output", "0", *cmd, env=env, status=2)
    assert replay.stdout == b""
    assert "8" in one_line(replay.stderr)
    # The note starts a line of its own even when the recorded stderr ends mid-line.
    # (One stream only: across the two, the order the runner reads them in may vary.)
    cmd = ["--", "sh", "-c", "printf 'half a line' >&2; printf 0123456789abcdef >&2"]
    idemfn_cli("run", "--key", "mid", "--max-output", "11", *cmd, env=env)
    replay = idemfn_cli("run", "--key", "mid", "--max-output", "11", *cmd, env=env)
    note = replay.stderr.decode().splitlines()
    assert note[0] == "half a line"
    assert note[1].startswith("idemfn: 16 more bytes"), note


def test_idemfn_errors_never_go_to_stdout_when_stderr_is_closed(env: dict[str, str]) -> None:
    idemfn_cli("run", "--key", "first", "--", "true", env=env)
    proc = subprocess.run(
        [PY, "-m", "idemfn", "run", "--key", "first", "--", "false"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        timeout=TIMEOUT,
        check=False,
        preexec_fn=lambda: os.close(2),  # `2>&-`
    )
    assert proc.returncode == 65
    assert proc.stdout == b""


# Runs the idemfn command (argv[2:]) after arranging for the runner to send itself SIGTERM at
# one moment: "begin" (when it calls idemfn.begin to look at the key, before any claim),
# "_execute" (holding the claim, before the command starts), "popen" (while the command, or
# the process that supervises it, is being started) or "return:process.start" (as the
# function start of idemfn/_cli/process.py returns: the command has just started). A white-box
# hook: it names functions of idemfn (begin, _cli.run._execute, _cli.process.Command.start).
DRIVER = """\
import os, signal, sys
when = sys.argv[1]
sys.argv = ["idemfn", *sys.argv[2:]]
if when == "popen":
    def hook(event, args):
        if event == "subprocess.Popen":
            os.kill(os.getpid(), signal.SIGTERM)
    sys.addaudithook(hook)
else:
    event, _, name = when.rpartition(":")
    module, _, name = name.rpartition(".")
    def profile(frame, happened, arg):
        code = frame.f_code
        if (happened == (event or "call") and code.co_name == name
                and code.co_filename.endswith(f"{module}.py")):
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGTERM)
    sys.setprofile(profile)
from idemfn._cli import entry_point
entry_point()
"""


def drive(when: str, *args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [PY, "-c", DRIVER, when, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=dict(env),
        timeout=TIMEOUT,
        check=False,
    )
    return checked(proc, None)


def test_a_signal_before_the_claim_ends_the_runner_and_holds_nothing(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    marker = tmp_path / "ran"
    proc = drive("begin", "run", "--key", "early", "--", "touch", str(marker), env=env)
    assert proc.returncode == -signal.SIGTERM, proc
    assert not marker.exists()
    assert store.get("early") is None


def test_a_signal_after_the_claim_before_the_start_releases_the_key(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    marker = tmp_path / "ran"
    proc = drive("_execute", "run", "--key", "claimed", "--", "touch", str(marker), env=env)
    assert not marker.exists()  # the command never starts
    assert store.get("claimed") is None  # and the key is released
    assert proc.returncode == 128 + signal.SIGTERM, proc
    assert "'claimed'" in one_line(proc.stderr)


# Runs the idemfn command (argv[2:]) with DiskStore's primitive argv[1] ("claim" or "swap")
# wrapped so that the runner sends itself SIGTERM right after the real one returns, when it
# took the key: a new claim, or the takeover of an abandoned one. (With "claim-lost", after a
# claim that found the key taken, the first look at the key having seen it free.) The
# signal's handler runs before the engine's begin() returns: at the instant after the claim
# is written and before the runner can know it holds it.
AT_CLAIM = """\
import os, signal, sys
which = sys.argv[1]
sys.argv = ["idemfn", *sys.argv[2:]]
from idemfn import DiskStore
real_claim, real_get, real_swap = DiskStore.claim, DiskStore.get, DiskStore.swap
looked = []
def claim(self, entry):
    found = real_claim(self, entry)
    if (found is None) == (which == "claim"):
        os.kill(os.getpid(), signal.SIGTERM)
    return found
def get(self, key):
    if not looked:
        looked.append(key)
        return None
    return real_get(self, key)
def swap(self, key, token, entry):
    swapped = real_swap(self, key, token, entry)
    if swapped and entry.status == "processing" and entry.token != token:
        os.kill(os.getpid(), signal.SIGTERM)
    return swapped
if which == "swap":
    DiskStore.swap = swap
else:
    DiskStore.claim = claim
if which == "claim-lost":
    DiskStore.get = get
from idemfn._cli import entry_point
entry_point()
"""

# Claims KEY (argv[2]) for the command line argv[3:] as `idemfn run` would, in the store
# argv[1], and exits holding it: an abandoned claim.
ABANDON = """\
import os, sys
from idemfn import DiskStore, Policy, begin
from idemfn._cli.command_outcome import fingerprint
store, key, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
begin(key, store=DiskStore(store), fingerprint=fingerprint(argv, []), policy=Policy(ttl=None))
os._exit(0)
"""


@pytest.mark.parametrize("claim", ["claim", "swap"], ids=["new-claim", "takeover"])
def test_a_signal_at_the_instant_of_the_claim_releases_the_key(
    tmp_path: Path, store_dir: Path, store: DiskStore, env: dict[str, str], claim: str
) -> None:
    # Issue 14, item 6: the runner marked itself holding the key only after begin() returned;
    # a signal handled in between killed it, the key stayed processing (exit 69 next time).
    marker = tmp_path / "ran"
    cmd = ["touch", str(marker)]
    options = ["--on-abandoned", "retry"]
    if claim == "swap":
        subprocess.run(
            [PY, "-c", ABANDON, str(store_dir), "k", *cmd], env=env, check=True, timeout=TIMEOUT
        )
        entry = store.get("k")
        assert entry is not None and entry.status == Status.PROCESSING
    proc = subprocess.run(
        [PY, "-c", AT_CLAIM, claim, "run", "--key", "k", *options, "--", *cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    checked(proc, None)
    assert not marker.exists()  # the command never started
    assert store.get("k") is None, "the key was left claimed"
    assert proc.returncode == 128 + signal.SIGTERM, proc
    assert "interrupted by SIGTERM" in one_line(proc.stderr)
    assert "'k' released" in proc.stderr.decode()
    idemfn_cli("run", "--key", "k", *options, "--", *cmd, env=env)
    assert marker.exists()


def test_a_signal_at_a_claim_that_finds_the_key_taken_ends_the_runner(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    # The other side of the instant above: a claim that did not take the key leaves the
    # runner holding nothing, so the signal ends it at once (as before any claim), although
    # it would otherwise wait 600 s for the key's owner.
    block = Blocker(tmp_path)
    owner = start("run", "--key", "k", "--", *block.argv, env=env, new_session=True)
    try:
        block.wait_started(owner)
        proc = subprocess.run(
            [
                PY,
                "-c",
                AT_CLAIM,
                "claim-lost",
                "run",
                "--key",
                "k",
                "--wait",
                "600",
                "--",
                *block.argv,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
        assert proc.returncode == -signal.SIGTERM, proc
        assert (proc.stdout, proc.stderr) == (b"", b"")
        entry = store.get("k")
        assert entry is not None and entry.status == Status.PROCESSING
        assert entry.owner.rsplit("/", 2)[1] == str(owner.pid)
        block.release.touch()
        finish(owner, 0)
    finally:
        stop(owner, group=True)
    assert len(lines(block.log)) == 1


@pytest.mark.parametrize("when", ["popen", "return:process.start"], ids=["starting", "started"])
def test_a_signal_while_the_command_starts_is_not_lost(
    tmp_path: Path, store: DiskStore, env: dict[str, str], when: str
) -> None:
    started = tmp_path / "started"
    cmd = [PY, "-c", CATCH, "SIGTERM", str(tmp_path / "mark"), str(started), "5"]
    proc = drive(when, "run", "--key", "starting", "--", *cmd, env=env)
    entry = store.get("starting")
    if when == "popen" and process.supervisor_script() is not None:
        # Linux: the runner was starting the process that starts the command, which does not
        # start it when the runner was interrupted first: the key is released.
        assert entry is None
        assert proc.returncode == 128 + signal.SIGTERM, proc
        assert "interrupted by SIGTERM" in one_line(proc.stderr)
        assert not started.exists()
        return
    assert entry is not None and entry.status == Status.HALTED
    fields = show("starting", env)
    assert fields["command"]["interrupted_by"] == "SIGTERM"
    # The command got it: before its handler was set (it died of it, and so did the runner,
    # recorded as 143), or after (it exited 5).
    assert (proc.returncode, fields["command"]["exit_status"]) in (
        (-signal.SIGTERM, 128 + signal.SIGTERM),
        (5, 5),
    )


IGNORING = """\
import os, signal, sys, time
release = sys.argv[1]
print("SIGHUP ignored:", signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, flush=True)
open(release + ".started", "w").close()
give_up = time.monotonic() + 120
while not os.path.exists(release) and time.monotonic() < give_up:
    time.sleep(0.005)
"""


def test_a_signal_the_runner_was_started_ignoring_stays_ignored(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    release = tmp_path / "release"
    cmd = ["run", "--key", "nohup", "--", PY, "-c", IGNORING, str(release)]
    runner = subprocess.Popen(
        argv_of(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup does
    )
    try:
        poll(lambda: Path(f"{release}.started").exists() or runner.poll() is not None, "a start")
        runner.send_signal(signal.SIGHUP)  # the terminal hangs up
        release.touch()
        proc = finish(runner, None)
    finally:
        stop(runner, group=True)
    entry = store.get("nohup")
    assert entry is not None
    assert (proc.returncode, proc.stdout) == (0, b"SIGHUP ignored: True\n")
    assert entry.status == Status.OK


def test_a_closed_stdout_is_a_reader_that_left(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    log = tmp_path / "log"
    cmd = ["run", "--key", "closed", "--", "sh", "-c", f"echo ran >> {log}; echo out; exit 3"]
    proc = subprocess.run(
        argv_of(cmd),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        timeout=TIMEOUT,
        preexec_fn=lambda: os.close(1),  # as `>&-` does
        check=False,
    )
    assert lines(log) == ["ran"]
    assert (proc.returncode, proc.stderr) == (3, b"")
    replay = idemfn_cli(*cmd, env=env, status=3)
    assert replay.stdout == b"out\n"
    assert lines(log) == ["ran"]


def test_a_key_that_is_not_utf8_is_a_usage_error(tmp_path: Path, env: dict[str, str]) -> None:
    marker = tmp_path / "ran"
    idemfn_cli("run", "--key", "first", "--", "true", env=env)  # the store exists
    results = []
    for args in (
        [b"run", b"--key", b"k\xff", b"--", b"touch", os.fsencode(marker)],
        [b"forget", b"k\xff"],
    ):
        proc = subprocess.run(
            [os.fsencode(PY), b"-m", b"idemfn", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
        results.append(checked(proc, None))
    assert not marker.exists()
    run, forget = results
    assert run.returncode == Exit.USAGE, run
    assert forget.returncode in (Exit.USAGE, Exit.NO_RECORD), forget
    for proc in results:
        one_line(proc.stderr)


# -- from the hostile review -------------------------------------------------------------------


def test_the_command_reads_the_runners_stdin_and_a_replay_reads_nothing(
    env: dict[str, str],
) -> None:
    cmd = [PY, "-m", "idemfn", "run", "--key", "cat", "--", "cat"]
    first = subprocess.run(
        cmd, input=b"piped in\n", capture_output=True, env=env, timeout=TIMEOUT, check=True
    )
    assert first.stdout == b"piped in\n"
    # A replay leaves stdin alone: the next reader of the pipe gets all of it.
    script = f"{shlex.join(cmd)} >/dev/null; cat"
    after = subprocess.run(
        ["sh", "-c", script],
        input=b"for the next step\n",
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    assert after.stdout == b"for the next step\n"


def test_a_script_of_run_lines_stops_when_a_step_dies_of_sigint(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # Ctrl-C reaches the whole foreground group: here, the shell and the runner get SIGINT
    # (the runner passes it on). The command dies of it; so must the runner, or the shell
    # (wait and cooperative exit) would take the step as handled and run the next one.
    block = Blocker(tmp_path)
    step = shlex.join([PY, "-m", "idemfn", "run", "--key", "step1", "--", *block.argv])
    script = f"{step}; echo NEXT STEP RAN"
    shell = subprocess.Popen(
        ["bash", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=_default_dispositions,
    )
    try:
        block.wait_started(shell)
        os.killpg(shell.pid, signal.SIGINT)
        out, _ = shell.communicate(timeout=TIMEOUT)
    finally:
        stop(shell, group=True)
    assert b"NEXT STEP RAN" not in out
    assert shell.returncode == -signal.SIGINT
    fields = show("step1", env)
    assert (fields["status"], fields["command"]["exit_status"]) == ("halted", 130)


def test_a_failing_stdout_loses_neither_the_outcome_nor_the_status(
    tmp_path: Path, env: dict[str, str]
) -> None:
    cmd = ["run", "--key", "full", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [PY, "-m", "idemfn", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
    assert proc.returncode == 3
    assert proc.stderr.startswith(b"idemfn: stopped copying the command's stdout")
    assert proc.stderr.endswith(b"err\n")
    assert b"Traceback" not in proc.stderr
    replay = idemfn_cli(*cmd, env=env, status=3)
    assert (replay.stdout, replay.stderr) == (b"out\n", b"err\n")
    # Inspecting into a full disk is an I/O error, not an internal one.
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [PY, "-m", "idemfn", "ls"],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
    assert proc.returncode == Exit.STORE_ERROR
    assert b"Traceback" not in proc.stderr and b"internal error" not in proc.stderr


# -- from the second hostile review (issue 14, items 5 and 6) ---------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux only")
def test_a_runner_killed_with_its_process_group_takes_everything_its_command_started(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # `kill -9 -- -PGID`, `timeout -s KILL 60 idemfn run ...`: SIGKILL for the runner's whole
    # process group killed the supervising process too, and nothing was left to kill what the
    # command started outside that group: a step in a group of its own (`timeout 600 step`
    # puts it there) ran on beside a retry, and so did a daemon.
    where = tmp_path / "steps"
    where.mkdir()
    names = ("daemon", "group")
    runner = start("run", "--key", "k", "--", *_step(where, *names), env=env, new_session=True)
    try:
        pids = _started(runner, where, *names)
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=TIMEOUT)
        for name, pid in pids.items():
            poll(lambda pid=pid: not _alive(pid), f"the {name} step to die with its runner")
    finally:
        stop(runner, group=True)
        _kill_started(where, *names)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux only")
def test_a_killed_supervisor_takes_down_what_the_command_started(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # The supervising process killed on its own (the OOM killer, a `kill -9` of its pid): the
    # command died with it (PR_SET_PDEATHSIG), but its foreground step ran on after the runner
    # had recorded the key halted and exited, so the "check, then forget" a halted key asks
    # for found nothing running, and the next run ran beside it.
    where = tmp_path / "steps"
    where.mkdir()
    names = ("bg", "fg")
    runner = start(
        "run", "--key", "k", "--", *_step(where, "bg &", "fg"), env=env, new_session=True
    )
    try:
        pids = _started(runner, where, *names)
        [between] = _children(runner.pid)  # the process between the runner and the command
        os.kill(between, signal.SIGKILL)
        proc = finish(runner, 128 + signal.SIGKILL)
        # Gone by the time the runner exits: the runner waited for them.
        assert [name for name, pid in pids.items() if _alive(pid)] == []
    finally:
        stop(runner, group=True)
        _kill_started(where, *names)
    assert not (where / "release").exists()
    assert b"supervising" in proc.stderr
    fields = show("k", env)
    assert (fields["status"], fields["command"]["exit_status"]) == ("halted", 128 + signal.SIGKILL)


# Runs the idemfn command (argv[2:]) with the interpreter that starts the supervising process
# replaced by argv[1] (see SIGNALLING_INTERPRETER).
SLOW_START = """\
import sys
interpreter = sys.argv[1]
sys.argv = ["idemfn", *sys.argv[2:]]
sys.executable = interpreter
from idemfn._cli import entry_point
entry_point()
"""

# Stands for the supervising process's interpreter while it starts: waits until the runner
# has said "start" (a byte on the control pipe, CTL, the first argument after the script),
# sends SIGTERM to WHOM, waits until the runner has passed it on (a second byte), and runs the
# real interpreter.
SIGNALLING_INTERPRETER = """\
import array, fcntl, os, signal, sys, termios, time
ctl = int(sys.argv[4])
def waiting(count):
    n = array.array("i", [0])
    fcntl.ioctl(ctl, termios.FIONREAD, n)
    return n[0] < count
give_up = time.monotonic() + 60
while waiting(1) and time.monotonic() < give_up:
    time.sleep(0.001)
WHOM
while waiting(2) and time.monotonic() < give_up:
    time.sleep(0.001)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize(
    "whom",
    ["os.killpg(0, signal.SIGTERM)", "os.kill(os.getppid(), signal.SIGTERM)"],
    ids=["the-group", "the-runner"],
)
@pytest.mark.skipif(
    process.supervisor_script() is None, reason="Linux only: the supervising process"
)
def test_a_signal_while_the_supervisor_starts_releases_the_key(
    tmp_path: Path, store: DiskStore, env: dict[str, str], whom: str
) -> None:
    # The runner says "start" as soon as the supervising process exists, whose interpreter
    # then takes some 20 ms to start. A signal for the runner's group (Ctrl-C, a terminal's
    # hang-up, `timeout`, `kill -- -PGID`) killed that process meanwhile, and the run exited
    # 126 ("its supervising process exited with status -15"). One for the runner alone was
    # passed on after "start": the command started and at once got it, and the key halted,
    # often before the command did anything. Both came before the start: the key is released.
    interpreter = tmp_path / "python"
    interpreter.write_text(f"#!{PY}\n" + SIGNALLING_INTERPRETER.replace("WHOM", whom))
    interpreter.chmod(0o755)
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [PY, "-c", SLOW_START, str(interpreter), "run", "--key", "k", "--", "touch", str(marker)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
        start_new_session=True,
        preexec_fn=_default_dispositions,
    )
    checked(proc, None)
    assert not marker.exists()
    assert store.get("k") is None
    assert proc.returncode == 128 + signal.SIGTERM, proc
    assert "interrupted by SIGTERM" in one_line(proc.stderr)


# Runs the idemfn command (argv[3:]) and SIGKILLs the runner as idemfn._engine's function
# argv[1] is called, once the file argv[2] exists: here, as the runner records the outcome of
# a command that has exited (Claim.complete), leaving a background job behind.
KILLED_AT = """\
import os, signal, sys, time
name, wait_for = sys.argv[1:3]
sys.argv = ["idemfn", *sys.argv[3:]]
def profile(frame, happened, arg):
    code = frame.f_code
    if happened == "call" and code.co_name == name and code.co_filename.endswith("_engine.py"):
        give_up = time.monotonic() + 60
        while not os.path.exists(wait_for) and time.monotonic() < give_up:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)
sys.setprofile(profile)
from idemfn._cli import entry_point
entry_point()
"""


@pytest.mark.slow
@pytest.mark.skipif(
    process.supervisor_script() is None, reason="Linux only: the supervising process"
)
def test_a_runner_killed_while_it_records_takes_what_the_command_left_running(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    # The supervising process left as soon as the command exited, so a runner killed while
    # the command exited or while it recorded the outcome (a group SIGKILL kills both at once)
    # left the key abandoned with the command's background job still running: a retry ran
    # beside it. Until the runner is done with the outcome, its death takes all that down.
    where = tmp_path / "steps"
    where.mkdir()
    proc = subprocess.run(
        [
            PY,
            "-c",
            KILLED_AT,
            "complete",
            str(where / "bg.pid"),
            "run",
            "--key",
            "k",
            "--",
            *_step(where, "bg &"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
        start_new_session=True,
    )
    try:
        assert proc.returncode == -signal.SIGKILL, proc
        bg = _pids(where, "bg")["bg"]
        poll(lambda: not _alive(bg), "the background job to die with its runner")
    finally:
        if (where / "bg.pid").exists():
            _kill_all([_pids(where, "bg")["bg"]])
    assert proc.stdout == b"done\n"
    entry = store.get("k")
    assert entry is not None and entry.status == Status.PROCESSING  # abandoned: not recorded


# Runs the idemfn command (argv[2:]) in a Python without ctypes (built without libffi, or a
# minimal distribution package), and runs the supervising process as such a Python would:
# argv[1] stands for its interpreter.
WITHOUT_CTYPES = """\
import sys
sys.modules["ctypes"] = None  # `import ctypes` raises ImportError
interpreter = sys.argv[1]
sys.argv = ["idemfn", *sys.argv[2:]]
sys.executable = interpreter
from idemfn._cli import entry_point
entry_point()
"""


@pytest.mark.skipif(
    process.supervisor_script() is None, reason="Linux only: the supervising process"
)
def test_a_python_without_ctypes_still_runs_commands(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    # Every run exited 126: the supervising process died of the ImportError (it only expected
    # ctypes to lack prctl). Without prctl it still starts, signals and reports the command.
    interpreter = tmp_path / "python"
    interpreter.write_text(
        f"#!{PY}\n"
        "import runpy, sys\n"
        "sys.modules['ctypes'] = None\n"
        "sys.argv = sys.argv[3:]\n"  # after -I -S: the script and its arguments
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    interpreter.chmod(0o755)
    proc = subprocess.run(
        [
            PY,
            "-c",
            WITHOUT_CTYPES,
            str(interpreter),
            "run",
            "--key",
            "k",
            "--",
            "sh",
            "-c",
            "echo ran; exit 3",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    checked(proc, 3)
    assert (proc.stdout, proc.stderr) == (b"ran\n", b"")
    entry = store.get("k")
    assert entry is not None and entry.status == Status.HALTED


def test_a_runner_given_many_descriptors_runs_the_command(
    tmp_path: Path, store: DiskStore, env: dict[str, str]
) -> None:
    # Past select()'s limit of 1024 descriptors, a check on the supervisor's report failed
    # with "filedescriptor out of range in select()" (exit 70).
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("needs 1200 open files")
    given = """\
import os, resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
for _ in range(1100):
    os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)  # a parent that leaks them
sys.exit(subprocess.run(sys.argv[1:], close_fds=False).returncode)
"""
    proc = subprocess.run(
        [PY, "-c", given, PY, "-m", "idemfn", "run", "--key", "k", "--", "sh", "-c", "echo ran"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    checked(proc, 0)
    assert (proc.stdout, proc.stderr) == (b"ran\n", b"")
    entry = store.get("k")
    assert entry is not None and entry.status == Status.OK
