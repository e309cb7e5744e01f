"""The ``idemfn`` command's inspecting side: ls, show, forget, prune, stats, and what every
command shares (store resolution, --json, --help, usage errors, exit statuses).

Every test drives the real command in a subprocess (``python -m idemfn``, and the installed
console script where it matters) against a ``DiskStore`` in ``tmp_path``, with an explicit
environment and a timeout. Records are made with the Python API, in this process or, for
records whose owner must be gone, in a child process that claims a key and dies. Errors must be
one line on stderr with their documented exit status, and no command may print a traceback.
``idemfn run`` has its own file, tests/cli/test_cli_run.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import idemfn
from idemfn import DiskStore, Policy, Status, idempotent
from idemfn._cli.parser import EXIT_CODES, STATES, Exit
from idemfn._stores.base import prunable
from tests.support.cli import (
    TIMEOUT,
    argv_of,
    checked,
    cli_env,
    idemfn_cli,
    needs_script,
    one_line,
    poll,
)


def idemfn_many(
    argvs: Sequence[Sequence[str | Path]],
    *,
    env: Mapping[str, str] | Sequence[Mapping[str, str]],
) -> list[subprocess.CompletedProcess[bytes]]:
    """Run several commands side by side (``env``: one for all, or one each): what they
    printed, in order. Each is checked for tracebacks; the caller checks the statuses."""
    envs = [env] * len(argvs) if isinstance(env, Mapping) else list(env)
    assert len(envs) == len(argvs)
    procs = [
        subprocess.Popen(
            argv_of(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(one_env),
        )
        for args, one_env in zip(argvs, envs, strict=True)
    ]
    done: list[subprocess.CompletedProcess[bytes]] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    for result in done:
        checked(result, None)
    return done


def shown_fields(text: bytes) -> dict[str, str]:
    """The ``name: value`` lines of ``show``'s text output."""
    fields: dict[str, str] = {}
    for line in text.decode().splitlines():
        found = re.fullmatch(r"([a-z ]+):\s+(.*)", line)
        if found:
            fields[found[1]] = found[2]
    return fields


def as_json(proc: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(proc.stdout)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


# -- records made with the Python API --------------------------------------------------------


def finish(
    store: DiskStore,
    key: str,
    value: object = None,
    *,
    error: Exception | None = None,
    ttl: float | None = 86400.0,
) -> None:
    """Record ``key`` ok with ``value``, or halted with ``error``."""
    claim = idemfn.begin(key, store=store, fingerprint=f"fp:{key}", policy=Policy(ttl=ttl))
    assert isinstance(claim, idemfn.Claim)
    if error is None:
        claim.complete(value)
    else:
        claim.halt(error)


ABANDON = """\
import os, sys
import idemfn
store, key, lease, ttl = sys.argv[1:]
policy = idemfn.Policy(lease=float(lease), ttl=None if ttl == "none" else float(ttl))
claim = idemfn.begin(key, store=idemfn.DiskStore(store), fingerprint="fp:" + key, policy=policy)
assert isinstance(claim, idemfn.Claim)
os._exit(0)  # dies holding the claim
"""


def abandon(store_dir: Path, key: str, *, lease: float = 30.0, ttl: str = "none") -> None:
    """Leave ``key`` processing, claimed by a process that is gone."""
    subprocess.run(
        [sys.executable, "-c", ABANDON, str(store_dir), key, str(lease), ttl],
        stdin=subprocess.DEVNULL,
        env=cli_env(store_dir),
        check=True,
        timeout=TIMEOUT,
    )


def me() -> str:
    """How ``ls`` shows this process as an owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


# -- --help, usage errors, exit statuses -----------------------------------------------------

COMMANDS = ["ls", "show", "forget", "prune", "stats", "run"]


def test_help_of_every_command_documents_the_exit_statuses(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "missing")
    argvs = [["--help"], *([c, "--help"] for c in COMMANDS), ["ls", "-h"]]
    for args, proc in zip(argvs, idemfn_many(argvs, env=env), strict=True):
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stderr == b"", args
        text = proc.stdout.decode()
        assert text.startswith("usage: idemfn"), (args, text[:200])
        assert "--store" in text, args
        assert EXIT_CODES in text, args
        if args[0] in ("ls", "show", "forget", "prune", "stats"):
            assert "--json" in text, args
    assert not (tmp_path / "missing").exists()


def test_help_lists_every_exit_status_idemfn_uses(tmp_path: Path) -> None:
    text = idemfn_cli("--help", env=cli_env(tmp_path / "s")).stdout.decode()
    listed = {int(m) for m in re.findall(r"^ {2}(\d+) ", text, flags=re.MULTILINE)}
    assert listed >= {0, 64, 65, 66, 67, 68, 69, 70, 71, 74, 75, 126, 127}
    used = {int(s) for s in Exit if s not in (Exit.OK, Exit.DEADLINE)}  # 72 is reserved
    assert used - listed == set()


USAGE_ERRORS = [
    [],
    ["nope"],
    ["ls", "--bogus"],
    ["ls", "--limit", "0"],
    ["ls", "--status", "stuck"],
    ["ls", "-S", "running"],
    ["forget", "k", "-S", "abandoned"],
    ["show"],
    ["forget"],
    ["forget", "k", "--status", "weird"],
    ["prune", "extra"],
    ["run", "--key", "k"],
    ["run", "--key", "k", "--"],
    ["run", "--", "true"],
    ["run", "--key", "k", "true"],
    ["run", "--key", " ", "--", "true"],
    ["run", "--key", "", "--", "true"],
    ["run", "--key", "k", "--ttl", "-1", "--", "true"],
    ["run", "--key", "k", "--ttl", "0", "--", "true"],
    ["run", "--key", "k", "--lease", "0", "--", "true"],
    ["run", "--key", "k", "--wait", "nan", "--", "true"],
    ["run", "--key", "k", "--wait", "-1", "--", "true"],
    ["run", "--key", "k", "--on-abandoned", "maybe", "--", "true"],
    ["run", "--key", "k", "--retry-on-exit", "0", "--", "true"],
    ["run", "--key", "k", "--bogus", "--", "true"],
    ["run", "--key", "k", "--max-output", "-1", "--", "true"],
]


def test_usage_errors_exit_64_with_one_line_and_touch_nothing(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    marker = tmp_path / "ran"
    env = cli_env(store_dir)
    # `true` is replaced by a command that would leave a trace, were it ever run.
    trace = ["sh", "-c", f"touch {marker}"]
    argvs = [[*a[:-1], *trace] if a and a[-1] == "true" else a for a in USAGE_ERRORS]
    for args, proc in zip(argvs, idemfn_many(argvs, env=env), strict=True):
        assert proc.returncode == Exit.USAGE, (args, proc.returncode, proc.stderr)
        assert proc.stdout == b"", args
        line = one_line(proc.stderr)
        assert line.startswith("idemfn"), (args, line)
    assert not marker.exists()
    assert not store_dir.exists()


def test_missing_store_directory_is_67_for_every_inspecting_command(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "store"
    empty = tmp_path / "empty"
    empty.mkdir()
    inspecting = [
        ["ls"],
        ["ls", "--json"],
        ["show", "k"],
        ["forget", "k"],
        ["forget", "--force", "k"],
        ["prune"],
        ["stats"],
        ["stats", "--json"],
    ]
    some = [["ls"], ["show", "k", "--json"], ["forget", "--force", "k"], ["stats"]]
    argvs = [
        *inspecting,  # IDEMFN_STORE
        *(["--store", str(missing), *a] for a in some),  # --store before the command
        *([*a, "--store", str(empty)] for a in some),  # after it; a directory but no store
    ]
    results = idemfn_many(argvs, env=cli_env(missing))
    for args, proc in zip(argvs, results, strict=True):
        assert proc.returncode == Exit.NO_STORE, (args, proc.returncode, proc.stderr)
        assert proc.stdout == b"", args
        where = empty if str(empty) in args else missing
        assert str(where) in one_line(proc.stderr), args
    assert not (tmp_path / "no").exists(), "an inspecting command created the store directory"
    assert list(empty.iterdir()) == [], "an inspecting command created a store"


def test_an_unreachable_server_is_74_naming_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    url = f"unix://{tmp_path}/no-redis.sock"
    for args in (["ls"], ["show", "k"], ["run", "--key", "k", "--", "touch", str(marker)]):
        proc = idemfn_cli(
            "--store", url, *args, env=cli_env(tmp_path / "s"), status=Exit.STORE_ERROR
        )
        assert "no-redis.sock" in one_line(proc.stderr), args
    assert not marker.exists()


def test_an_unreachable_postgresql_is_one_line_within_its_connect_timeout(tmp_path: Path) -> None:
    # issue 13: 30 s, then the pool's retries and libpq's hints on many lines.
    directory = Path(tempfile.mkdtemp(prefix="idemfn-refuse-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(directory / ".s.PGSQL.5432"))  # bound, never listening: refused
        url = f"postgresql:///nothing?host={directory}&user=nobody"
        marker = tmp_path / "ran"
        argvs = [
            ["ls"],
            ["run", "-k", "k", "--", "touch", str(marker)],
            ["stats", "--store", f"{url}&connect_timeout=1"],
        ]
        began = time.monotonic()
        results = idemfn_many(argvs, env=cli_env(url))
        took = time.monotonic() - began
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert took < 20, took
    for args, proc in zip(argvs, results, strict=True):
        assert proc.returncode == Exit.STORE_ERROR, (args, proc.returncode, proc.stderr)
        line = one_line(proc.stderr)
        assert f"PostgresStore('postgresql://nobody@{directory}/nothing'" in line, line
        assert "could not connect within" in line and "Connection refused" in line, line
    assert "within 1 s" in one_line(results[2].stderr)
    assert "'k'" in one_line(results[1].stderr)
    assert not marker.exists()


def test_a_store_path_blocked_by_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    marker = tmp_path / "ran"
    cases = [
        (["ls", "--store", blocker / "store"], Exit.NO_STORE),
        (["stats", "--store", blocker], Exit.NO_STORE),
        (
            ["run", "--store", blocker / "a" / "store", "-k", "k", "--", "touch", marker],
            Exit.NO_STORE,
        ),
        (["run", "--store", blocker, "-k", "k", "--", "touch", marker], Exit.NO_STORE),
    ]
    results = idemfn_many([args for args, _ in cases], env=cli_env(tmp_path / "s"))
    for (args, status), proc in zip(cases, results, strict=True):
        assert proc.returncode == status, (args, proc.returncode, proc.stderr)
        line = one_line(proc.stderr)
        assert f"{blocker}: a file, not a directory" in line, (args, line)
    assert not marker.exists()


def _without_file_permissions() -> list[str]:
    """A command prefix that makes root obey file permissions (it drops the capabilities that
    override them); nothing for other users, who obey them anyway."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root ignores file permissions, and setpriv is absent to make it obey them")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_a_store_path_without_permission_is_one_line_naming_it(tmp_path: Path) -> None:
    # issue 13: `ls` said "cannot write the output: … Permission denied" (exit 74, as if stdout
    # had failed); a permission error must name the store path, as a store error.
    prefix = _without_file_permissions()
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        shutil.chown(locked, "nobody")
        locked.chmod(0o700)
    else:
        locked.chmod(0o000)
    marker = tmp_path / "ran"
    try:
        for args in (
            ["ls"],
            ["stats", "--json"],
            ["show", "k"],
            ["forget", "k"],
            ["run", "-k", "k", "--", "touch", str(marker)],
        ):
            proc = checked(
                subprocess.run(
                    [*prefix, *argv_of(["--store", locked / "store", *args])],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    env=cli_env(tmp_path / "s"),
                    timeout=TIMEOUT,
                    check=False,
                ),
                Exit.STORE_ERROR,
            )
            line = one_line(proc.stderr)
            assert line.startswith(f"idemfn: cannot use the store at {locked / 'store'} (--store)")
            assert "Permission denied" in line and "output" not in line, (args, line)
    finally:
        locked.chmod(0o700)
    assert not marker.exists()


def test_bad_store_url_is_68(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    good = cli_env(tmp_path / "s")
    cases: list[tuple[str, list[str], dict[str, str]]] = []
    for url in ("memcached://localhost:11211", "mysql://db/x", "ftp://host/dir"):
        cases += [
            (url, ["--store", url, "ls"], good),
            (url, ["run", "--key", "k", "--", "touch", str(marker)], cli_env(url)),
        ]
    url = "sqlite:///tmp/x.db"
    cases += [
        (url, ["show", "k", "--store", url], good),
        (url, ["stats", "--json"], cli_env(url)),
        (url, ["run", "--store", url, "--key", "k", "--", "touch", str(marker)], good),
    ]
    results = idemfn_many([args for _, args, _ in cases], env=[env for _, _, env in cases])
    for (url, args, _), proc in zip(cases, results, strict=True):
        assert proc.returncode == Exit.BAD_STORE, (args, proc.returncode, proc.stderr)
        assert proc.stdout == b"", args
        assert url in one_line(proc.stderr), args
    assert not marker.exists()
    assert not (tmp_path / "s").exists()


def test_corrupt_store_is_74_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cache.db").write_bytes(b"this is not a sqlite database" * 100)
    marker = tmp_path / "ran"
    argvs = [
        ["ls"],
        ["show", "k"],
        ["stats"],
        ["prune"],
        ["forget", "k"],
        ["run", "--key", "k", "--", "touch", str(marker)],
    ]
    for args, proc in zip(argvs, idemfn_many(argvs, env=cli_env(bad)), strict=True):
        assert proc.returncode == Exit.STORE_ERROR, (args, proc.returncode, proc.stderr)
        assert str(bad) in one_line(proc.stderr), args
    assert not marker.exists()


def test_forget_force_removes_a_corrupt_record(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    finish(store, "good", 1)
    store.cache.set("bad", b"\x00garbage")
    listed = as_json(idemfn_cli("ls", "--json", env=env))  # listed, not fatal (issue 6)
    assert {e["key"]: e["status"] for e in listed} == {"good": "ok", "bad": "corrupt"}
    proc = idemfn_cli("forget", "bad", env=env, status=Exit.STORE_ERROR)  # not unread, unforced
    assert "'bad'" in one_line(proc.stderr)
    idemfn_cli("forget", "--force", "bad", env=env)
    assert [e["key"] for e in as_json(idemfn_cli("ls", "--json", env=env))] == ["good"]


# -- which store -----------------------------------------------------------------------------


def test_store_option_environment_and_default_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for directory, key in ((a, "in-a"), (b, "in-b")):
        with DiskStore(directory) as s:
            assert isinstance(s, DiskStore)
            finish(s, key)
    state = tmp_path / "state"  # the default store: $XDG_STATE_HOME/idemfn
    with DiskStore(state / "idemfn") as s:
        assert isinstance(s, DiskStore)
        finish(s, "in-default")
    home = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(state)}
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["ls", "--json"], cli_env(a), "in-a"),
        (["--store", str(b), "ls", "--json"], cli_env(a), "in-b"),  # --store wins
        (["ls", "--json", "--store", str(b)], cli_env(a), "in-b"),
        (["--store", str(a), "ls", "--json", "--store", str(b)], cli_env(a), "in-b"),
        (["ls", "--json", "--store", f"file://{b}"], cli_env(a), "in-b"),
        (["ls", "--json"], cli_env(f"file://{b}"), "in-b"),
        (["ls", "--json"], cli_env("", **home), "in-default"),  # empty: not set
        (["ls", "--json"], cli_env("  ", **home), "in-default"),
        (["ls", "--json"], cli_env(a, IDEMFN_STORE=None, **home), "in-default"),
        (["ls", "--json", "--store", "~/../b"], cli_env(a, HOME=str(tmp_path / "home")), "in-b"),
    ]
    results = idemfn_many([args for args, _, _ in cases], env=[env for _, env, _ in cases])
    for (args, _, key), proc in zip(cases, results, strict=True):
        assert proc.returncode == 0, (args, proc.stderr)
        assert [e["key"] for e in as_json(proc)] == [key], (args, proc.stdout)
    # A relative --store is relative to the working directory.
    proc = idemfn_cli("ls", "--json", "--store", "b", env=cli_env(a), cwd=tmp_path)
    assert [e["key"] for e in as_json(proc)] == ["in-b"]
    # The default directory, when it does not exist, is named in the error, and not created.
    proc = idemfn_cli(
        "ls", env=cli_env("", XDG_STATE_HOME=str(tmp_path / "nothing")), status=Exit.NO_STORE
    )
    assert str(tmp_path / "nothing" / "idemfn") in one_line(proc.stderr)
    assert not (tmp_path / "nothing").exists()


def test_memory_url_is_refused_it_would_be_empty_in_every_process(tmp_path: Path) -> None:
    proc = idemfn_cli(
        "ls", "--json", "--store", "memory://", env=cli_env(tmp_path / "s"), status=Exit.BAD_STORE
    )
    assert "memory://" in one_line(proc.stderr)
    idemfn_cli("stats", "--json", env=cli_env("memory://"), status=Exit.BAD_STORE)
    marker = tmp_path / "ran"
    idemfn_cli(
        "run",
        "--store",
        "memory://",
        "--key",
        "k",
        "--",
        "touch",
        str(marker),
        env=cli_env(tmp_path / "s"),
        status=Exit.BAD_STORE,
    )
    assert not marker.exists()


def test_short_options_for_the_common_options(tmp_path: Path) -> None:
    # issue 13: `idemfn run -k KEY -- cmd` was refused.
    store_dir = tmp_path / "store"
    env = cli_env(tmp_path / "elsewhere")  # -s must win
    marker = tmp_path / "ran"
    proc = idemfn_cli(
        "run",
        "-s",
        store_dir,
        "-k",
        "job:1",
        "-t",
        "3600",
        "-w",
        "0",
        "--",
        "sh",
        "-c",
        f"echo once >> {marker}",
        env=env,
    )
    assert proc.stdout == b"" and marker.read_text() == "once\n"
    idemfn_cli(
        "run",
        "-s",
        store_dir,
        "-k",
        "job:1",
        "-t",
        "3600",
        "--",
        "sh",
        "-c",
        f"echo once >> {marker}",
        env=env,
    )
    assert marker.read_text() == "once\n"  # replayed
    idemfn_cli("-s", store_dir, "run", "-k", "job:2", "--", "sh", "-c", "exit 3", env=env, status=3)
    listed = as_json(
        idemfn_cli(
            "ls", "-s", store_dir, "-S", "ok", "-p", "job:", "-n", "5", "-a", "--json", env=env
        )
    )
    assert [(e["key"], e["ttl"]) for e in listed] == [("job:1", 3600.0)]
    proc = idemfn_cli("forget", "-s", store_dir, "-S", "halted", "-f", "job:2", env=env)
    assert proc.stdout.decode() == "forgot job:2 (was halted)\n"
    assert not (tmp_path / "elsewhere").exists()
    # --help shows them.
    helps = {c: idemfn_cli(c, "--help", env=env).stdout.decode() for c in ("run", "ls", "forget")}
    for command, flags in {
        "run": [
            "-s DIR|URL, --store DIR|URL",
            "-k KEY, --key KEY",
            "-t S, --ttl S",
            "-w S, --wait S",
            "-v, --verbose",
        ],
        "ls": [
            "-S STATUS, --status STATUS",
            "-p P, --prefix P",
            "-n N, --limit N",
            "-a, --all",
            "--wide",
        ],
        "forget": ["-S {processing,ok,halted}, --status {processing,ok,halted}", "-f, --force"],
    }.items():
        for flag in flags:
            assert flag in helps[command], (command, flag)
    # -s is --store: a status given to it by mistake gets a hint.
    line = one_line(
        idemfn_cli("ls", "-s", "halted", env=env, cwd=tmp_path, status=Exit.NO_STORE).stderr
    )
    assert "-S" in line and "--status" in line, line


def test_version(tmp_path: Path) -> None:
    import idemfn

    proc = idemfn_cli("--version", env=cli_env(tmp_path / "s"))
    assert proc.stdout.decode() == f"idemfn {idemfn.__version__}\n"


# -- ls --------------------------------------------------------------------------------------


def test_ls_lists_newest_first_in_columns(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    slow = idemfn.begin("s:slow", store=store, fingerprint="fp")  # started first, ends last
    assert isinstance(slow, idemfn.Claim)
    finish(store, "c:first", 1, ttl=None)
    finish(store, "a:second", error=ValueError("no"))
    abandon(store_dir, "d:third")
    finish(store, "b:fourth", 4)
    slow.complete("late")  # newest by its last change, oldest by its start
    live = idemfn.begin("e:fifth", store=store, fingerprint="x")
    assert isinstance(live, idemfn.Claim)
    try:
        proc = idemfn_cli("ls", env=env)
    finally:
        live.release()
    assert proc.stderr == b""
    header, *lines = proc.stdout.decode().splitlines()
    assert header.split() == ["KEY", "STATUS", "AGE", "OWNER", "EXPIRES"]
    rows = [line.split() for line in lines]
    assert [(r[0], r[1]) for r in rows] == [
        ("e:fifth", "processing"),
        ("s:slow", "ok"),
        ("b:fourth", "ok"),
        ("d:third", "abandoned"),
        ("a:second", "halted"),
        ("c:first", "ok"),
    ]
    assert all(re.fullmatch(r"\d+s", r[2]) for r in rows), rows
    assert {r[3] for r in rows if r[0] != "d:third"} == {me()}
    assert rows[3][3] != me() and rows[3][3].startswith(f"{socket.gethostname()}:")
    expires = [" ".join(r[4:]) for r in rows]
    assert expires[0].startswith("lease ")
    assert expires[1:] == ["in 23h", "in 23h", "owner gone", "in 23h", "never"]
    # The columns line up: each cell starts where its header word does.
    starts = [header.index(word) for word in ("STATUS", "AGE", "OWNER", "EXPIRES")]
    for line, row in zip(lines, rows, strict=True):
        cells = [row[1], row[2], row[3], " ".join(row[4:])]
        assert [line[start:].split("  ")[0] for start in starts] == cells, line


def test_ls_filters_and_limit(store: DiskStore, store_dir: Path, env: dict[str, str]) -> None:
    finish(store, "job:1", 1)
    finish(store, "job:2", error=RuntimeError("x"))
    finish(store, "other:3", 3)
    finish(store, "job:4", 4)
    finish(store, "job:gone", 5, ttl=0.01)
    abandon(store_dir, "job:stuck")
    poll(lambda: store.get("job:gone") is None, "job:gone to expire")
    argvs = [
        ["ls", "--json"],
        ["ls", "--json", "--status", "ok"],
        ["ls", "--json", "--status", "halted"],
        ["ls", "--json", "--status", "processing"],
        ["ls", "--json", "--status", "abandoned"],
        ["ls", "--json", "--status", "expired"],
        ["ls", "--json", "--prefix", "job:"],
        ["ls", "--json", "--prefix", "job:", "--limit", "2"],
        ["ls", "--json", "--limit", "1", "--status", "ok"],
        ["ls", "--json", "--all"],
        ["ls", "--json", "--all", "--prefix", "job:g"],
        ["ls", "--json", "--prefix", "job:g"],
        ["ls", "--json", "--prefix", "j%"],  # no wildcard
    ]
    keys = [[e["key"] for e in as_json(p)] for p in idemfn_many(argvs, env=env)]
    assert keys == [
        ["job:stuck", "job:4", "other:3", "job:2", "job:1"],
        ["job:4", "other:3", "job:1"],
        ["job:2"],
        [],  # job:stuck's owner is gone: abandoned, as its STATUS column says
        ["job:stuck"],
        ["job:gone"],  # --status expired needs no --all
        ["job:stuck", "job:4", "job:2", "job:1"],
        ["job:stuck", "job:4"],
        ["job:4"],
        ["job:stuck", "job:gone", "job:4", "other:3", "job:2", "job:1"],
        ["job:gone"],
        [],
        [],
    ]
    # Nothing to list: no rows, a note on stderr, success.
    proc = idemfn_cli("ls", "--prefix", "nothing:", env=env)
    assert proc.stdout == b""
    assert "nothing:" in one_line(proc.stderr)
    proc = idemfn_cli("ls", "--all", "--prefix", "job:g", env=env)
    assert proc.stdout.decode().splitlines()[1].split()[:2] == ["job:gone", "expired"]


def _check_record_json(fields: dict[str, Any], record: idemfn.Record) -> None:
    assert fields["key"] == record.key
    assert fields["status"] == record.status.value
    assert fields["fingerprint"] == record.fingerprint
    assert fields["owner"] == record.owner
    assert fields["token"] == record.token
    assert fields["attempt"] == record.attempt
    assert fields["started_at"] == iso(record.started_at)
    assert fields["finished_at"] == iso(record.finished_at)
    assert fields["expires_at"] == iso(record.expires_at)
    assert fields["lease_expires_at"] == iso(record.lease_expires_at)
    assert fields["reason"] == record.reason
    assert fields["exc_type"] == record.exc_type
    assert fields["traceback"] == record.traceback
    for name in ("started_at", "finished_at", "expires_at", "lease_expires_at"):
        if fields[name] is not None:
            assert datetime.fromisoformat(fields[name]).utcoffset() is not None


def test_ls_json_round_trips(store: DiskStore, store_dir: Path, env: dict[str, str]) -> None:
    finish(store, "ok", {"a": 1})
    finish(store, "forever", [1, 2], ttl=None)
    finish(store, "halted", error=KeyError("k"))
    abandon(store_dir, "abandoned", lease=12.5, ttl="60")
    live = idemfn.begin("live", store=store, fingerprint="fp-live", policy=Policy(lease=20))
    assert isinstance(live, idemfn.Claim)
    try:
        listed = as_json(idemfn_cli("ls", "--json", env=env))
        entries = {key: store.get(key) for key in ("ok", "forever", "halted", "abandoned", "live")}
    finally:
        live.release()
    assert {e["key"] for e in listed} == set(entries)
    for fields in listed:
        entry = entries[fields["key"]]
        assert entry is not None
        _check_record_json(fields, entry.record())
        assert fields["ttl"] == entry.ttl
        assert fields["message"] == entry.message
    by_key = {e["key"]: e for e in listed}
    assert by_key["ok"]["state"] == "ok" and by_key["ok"]["owner_gone"] is None
    assert by_key["forever"]["expires_at"] is None and by_key["forever"]["ttl"] is None
    assert by_key["halted"]["state"] == "halted"
    assert by_key["halted"]["exc_type"] == "KeyError"
    assert by_key["abandoned"]["state"] == "abandoned" and by_key["abandoned"]["ttl"] == 60.0
    assert by_key["abandoned"]["owner_gone"]  # says why
    assert by_key["live"]["state"] == "processing" and by_key["live"]["owner_gone"] is None
    assert by_key["live"]["owner"] == idemfn._owner.current()


def test_ls_into_a_closed_pipe_exits_quietly(store: DiskStore, env: dict[str, str]) -> None:
    # Enough output to fill the pipe: the command is still writing when the reader leaves.
    for i in range(200):
        finish(store, f"long:{i:03}:" + "x" * 600, i)
    for args in (["ls", "--wide"], ["ls", "--json"], ["ls", "--all", "--json"]):
        proc = subprocess.Popen(
            argv_of(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            first = proc.stdout.readline()  # `| head -1`
            proc.stdout.close()
            err = proc.stderr.read()
            status = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        assert first.strip(), args
        assert (status, err) == (0, b""), args


def test_ls_status_takes_every_state_its_status_column_shows(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    # issue 13: `ls --status abandoned` was refused, though the column says abandoned.
    finish(store, "s:ok", 1)
    finish(store, "s:halted", error=ValueError("no"))
    abandon(store_dir, "s:abandoned")
    finish(store, "s:expired", 2, ttl=0.01)
    store.cache.set("s:corrupt", b"\x00garbage")
    poll(lambda: store.get("s:expired") is None, "s:expired to expire")
    live = idemfn.begin("s:processing", store=store, fingerprint="fp", policy=Policy(lease=3600))
    assert isinstance(live, idemfn.Claim)
    try:
        listing = idemfn_cli("ls", "--all", env=env, status=0).stdout.decode()
        column = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
        assert set(column.values()) == set(STATES) - {"tampered"}  # needs signing keys
        states = list(STATES)
        argvs = [["ls", "--status", state] for state in states]
        argvs += [["ls", "--json", "-S", state] for state in states]
        results = idemfn_many(argvs, env=env)
    finally:
        live.release()
    for state, proc in zip(states, results[: len(states)], strict=True):
        assert proc.returncode == 0, (state, proc.stderr)
        rows = [line.split() for line in proc.stdout.decode().splitlines()[1:]]
        assert [(r[0], r[1]) for r in rows] == [(f"s:{state}", state)] * (state != "tampered")
    for state, proc in zip(states, results[len(states) :], strict=True):
        assert proc.returncode == 0, (state, proc.stderr)
        keys = [e["key"] for e in as_json(proc)]
        assert keys == [f"s:{state}"] * (state != "tampered"), (state, keys)


def test_ls_that_matches_nothing_does_not_call_the_store_empty(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    finish(store, "job:1", 1)
    finish(store, "job:2", 2)
    finish(store, "old:1", 3, ttl=0.01)
    poll(lambda: store.get("old:1") is None, "old:1 to expire")
    proc = idemfn_cli("ls", "--status", "abandoned", env=env)
    line = one_line(proc.stderr)
    assert proc.stdout == b""
    assert "no records match --status abandoned" in line, line
    assert "which holds 2 records" in line and "1 expired record" in line, line
    assert "no records in" not in line, line
    line = one_line(idemfn_cli("ls", "-S", "halted", "-p", "job:", env=env).stderr)
    assert "no records match --status halted" in line and "2 records starting with 'job:'" in line
    # Only expired records: not "empty" either, and the way to see them.
    line = one_line(idemfn_cli("ls", "--prefix", "old:", env=env).stderr)
    assert "but 1 expired record" in line and "--all" in line, line
    # A store that has nothing is said to be empty.
    with DiskStore(store_dir.parent / "empty") as empty:
        finish(empty, "x", 1)
        assert empty.delete("x")
    line = one_line(idemfn_cli("ls", "-S", "ok", env=cli_env(store_dir.parent / "empty")).stderr)
    assert line.startswith("no records in DiskStore("), line


def test_ls_shortens_a_long_key_instead_of_padding_every_row(
    store: DiskStore, env: dict[str, str]
) -> None:
    long_key = "big:" + "x" * 100_000 + ":tail"
    finish(store, long_key, 1)
    finish(store, "small:1", 2)
    proc = idemfn_cli("ls", env=env)
    lines = proc.stdout.decode().splitlines()
    assert max(map(len, lines)) < 200, [len(line) for line in lines]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    [shortened] = [key for key in rows if "…" in key]
    assert shortened.startswith("big:xxx") and shortened.endswith("xxx:tail")
    assert rows["small:1"] == "ok" and rows[shortened] == "ok"
    assert "--wide" in one_line(proc.stderr)  # says how to see it whole
    # Whole with --wide and --json; `show` takes the whole key.
    wide = idemfn_cli("ls", "--wide", env=env)
    assert long_key in wide.stdout.decode().split() and wide.stderr == b""
    [listed] = [e["key"] for e in as_json(idemfn_cli("ls", "--json", env=env)) if len(e["key"]) > 9]
    assert listed == long_key
    assert shown_fields(idemfn_cli("show", long_key, env=env).stdout)["status"] == "ok"


def test_ls_on_a_terminal_fits_its_width(store: DiskStore, env: dict[str, str]) -> None:
    import pty

    finish(store, "big:" + "y" * 5000, 1)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            argv_of(["ls"]),
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            env={**env, "COLUMNS": "100"},
            timeout=TIMEOUT,
            check=False,
        )  # 2 short lines: they fit in the terminal's buffer until read
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    checked(subprocess.CompletedProcess(proc.args, proc.returncode, out, proc.stderr), 0)
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all(len(line) <= 100 for line in lines), lines
    assert "…" in lines[1]


# -- show ------------------------------------------------------------------------------------


def test_show_ok_python_record(store: DiskStore, env: dict[str, str]) -> None:
    @idempotent(key="order:{order_id}", name="shop.charge", store=store, ttl=3600)
    def charge(order_id: str, amount: int) -> dict[str, object]:
        return {"order": order_id, "amount": amount, "tags": ("a", b"\xff")}

    value = charge("o-1", 250)
    key = charge.key_for("o-1", 250)
    record = charge.status("o-1", 250)
    assert record is not None
    text, raw = idemfn_many([["show", key], ["show", key, "--json"]], env=env)
    assert (text.returncode, raw.returncode) == (0, 0)
    fields = as_json(raw)
    _check_record_json(fields, record)
    assert fields["state"] == "ok" and fields["ttl"] == 3600.0
    assert fields["value_repr"] == repr(value)
    assert "command" not in fields
    shown = shown_fields(text.stdout)
    assert shown["key"] == key
    assert shown["status"] == "ok"
    assert shown["attempt"] == "1"
    assert shown["value"] == repr(value)
    assert shown["fingerprint"] == record.fingerprint
    assert shown["token"] == record.token
    assert shown["owner"] == record.owner
    assert shown["ttl"] == "3600s"
    assert shown["started"].startswith(f"{iso(record.started_at)} (")
    assert shown["expires"].startswith(f"{iso(record.expires_at)} (in ")


def test_show_http_response_record(store: DiskStore, env: dict[str, str]) -> None:
    # A response the HTTP middlewares recorded is shown as one, not as a value that "cannot
    # load" (it is stored with their own serializer, never a pickle).
    from idemfn.wsgi import IdempotencyMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain"), ("X-Order", "7")])
        return [b"created"]

    middleware = IdempotencyMiddleware(app, store=store)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "HTTP_IDEMPOTENCY_KEY": "k-1",
        "wsgi.input": io.BytesIO(b""),
    }
    assert list(middleware(environ, lambda status, headers, exc_info=None: None)) == [b"created"]
    text, raw = idemfn_many([["show", "http::k-1"], ["show", "http::k-1", "--json"]], env=env)
    assert (text.returncode, raw.returncode) == (0, 0)
    expected = "HTTP 201 response, 2 headers, body b'created'"
    assert shown_fields(text.stdout)["value"] == expected
    assert as_json(raw)["value_repr"] == expected


def test_show_halted_python_record(store: DiskStore, env: dict[str, str]) -> None:
    @idempotent(key="refund:{order_id}", name="shop.refund", store=store)
    def refund(order_id: str) -> None:
        raise ValueError(f"the provider refused {order_id}")

    with pytest.raises(ValueError, match="refused"):
        refund("o-7")
    key = refund.key_for("o-7")
    record = refund.status("o-7")
    assert record is not None and record.status is Status.HALTED
    text, raw = idemfn_many([["show", key], ["show", key, "--json"]], env=env)
    fields = as_json(raw)
    _check_record_json(fields, record)
    assert fields["exc_type"] == "ValueError"
    assert fields["message"] == "the provider refused o-7"
    assert "value_repr" not in fields
    assert fields["traceback"].startswith("Traceback (most recent call last):")
    assert "in refund" in fields["traceback"]
    assert fields["traceback"].endswith("ValueError: the provider refused o-7\n")
    out = text.stdout.decode()
    assert text.returncode == 0 and text.stderr == b""
    assert re.search(r"^status:\s+halted$", out, re.MULTILINE)
    assert re.search(r"^exception:\s+ValueError: the provider refused o-7$", out, re.MULTILINE)
    # The original traceback, indented, line for line.
    block = out[out.index("\ntraceback:\n") + len("\ntraceback:\n") :]
    assert block.splitlines() == ["  " + line for line in record.traceback.splitlines()]  # type: ignore[union-attr]


THING = """\
class Thing:
    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Thing({self.n})"
"""

MAKE_THING = """\
import sys
import idemfn
import thing_for_idemfn_cli

@idemfn.idempotent(key="thing", name="t", store=idemfn.DiskStore(sys.argv[1]))
def make():
    return thing_for_idemfn_cli.Thing(7)

make()
"""


def test_show_value_whose_class_does_not_import_here(tmp_path: Path, store_dir: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "thing_for_idemfn_cli.py").write_text(THING)
    with_module = cli_env(store_dir, PYTHONPATH=str(modules))
    subprocess.run(
        [sys.executable, "-c", MAKE_THING, str(store_dir)],
        env=with_module,
        stdin=subprocess.DEVNULL,
        check=True,
        timeout=TIMEOUT,
    )
    without = cli_env(store_dir, PYTHONPATH=None)
    raw, text = idemfn_many([["show", "t:thing", "--json"], ["show", "t:thing"]], env=without)
    assert (raw.returncode, text.returncode) == (0, 0)
    fields = as_json(raw)
    assert "value_repr" not in fields
    assert "thing_for_idemfn_cli" in fields["value_error"]
    assert "ModuleNotFoundError" in fields["value_error"]
    assert re.search(r"^value:.*ModuleNotFoundError", text.stdout.decode(), re.MULTILINE)
    assert text.stderr == b""
    fields = as_json(idemfn_cli("show", "t:thing", "--json", env=with_module))
    assert fields["value_repr"] == "Thing(7)"


def test_show_abandoned_and_live_processing_records(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    abandon(store_dir, "stuck")
    live = idemfn.begin("live", store=store, fingerprint="fp")
    assert isinstance(live, idemfn.Claim)
    try:
        results = idemfn_many(
            [["show", "stuck", "--json"], ["show", "stuck"], ["show", "live", "--json"]], env=env
        )
    finally:
        live.release()
    stuck, stuck_text, running = results
    fields = as_json(stuck)
    assert (fields["status"], fields["state"]) == ("processing", "abandoned")
    pid = fields["owner"].split("/")[2]
    assert pid in fields["owner_gone"]
    assert fields["finished_at"] is None and fields["lease_expires_at"] is not None
    out = stuck_text.stdout.decode()
    assert re.search(r"^status:\s+processing \(abandoned\)$", out, re.MULTILINE)
    assert re.search(r"^lease until:", out, re.MULTILINE)
    fields = as_json(running)
    assert (fields["state"], fields["owner_gone"]) == ("processing", None)
    assert fields["owner"] == idemfn._owner.current()


def test_show_unknown_key_is_66_and_names_similar_keys(
    store: DiskStore, env: dict[str, str]
) -> None:
    finish(store, "app.mod.charge:charge:order-1")
    proc = idemfn_cli("show", "charge:order-1", env=env, status=Exit.NO_RECORD)
    assert proc.stdout == b""
    line = one_line(proc.stderr)
    assert "'charge:order-1'" in line and "app.mod.charge:charge:order-1" in line
    proc = idemfn_cli("show", "zzz", "--json", env=env, status=Exit.NO_RECORD)
    assert proc.stdout == b""
    assert "'zzz'" in one_line(proc.stderr)
    # A key that is a prefix of another is not that other key.
    proc = idemfn_cli("show", "app.mod.charge:charge:order", env=env, status=Exit.NO_RECORD)


def test_show_of_a_key_that_looks_like_an_option(store: DiskStore, env: dict[str, str]) -> None:
    finish(store, "--weird key\twith\u00e9", "v")
    fields = as_json(idemfn_cli("show", "--json", "--", "--weird key\twith\u00e9", env=env))
    assert fields["key"] == "--weird key\twith\u00e9"
    assert fields["value_repr"] == "'v'"


# -- forget ----------------------------------------------------------------------------------


def test_forget_removes_records_and_says_which(store: DiskStore, env: dict[str, str]) -> None:
    finish(store, "a", 1)
    finish(store, "b", error=OSError("disk"))
    finish(store, "c", 3)
    proc = idemfn_cli("forget", "a", "b", "a", env=env)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2
    assert "a" in lines[0].split() and "ok" in lines[0]
    assert "b" in lines[1].split() and "halted" in lines[1]
    assert proc.stderr == b""
    assert store.get("a") is None and store.get("b") is None and store.get("c") is not None
    # --json lists every field of what it removed.
    finish(store, "d", 4)
    record = store.get("d")
    assert record is not None
    proc = idemfn_cli("forget", "d", "--json", env=env)
    out = as_json(proc)
    assert out["not_removed"] == []
    [removed] = out["removed"]
    _check_record_json(removed, record.record())
    assert store.get("d") is None


def test_forget_unknown_key_is_66_and_still_removes_the_others(
    store: DiskStore, env: dict[str, str]
) -> None:
    finish(store, "here", 1)
    proc = idemfn_cli("forget", "missing", "here", env=env, status=Exit.NO_RECORD)
    assert "here" in proc.stdout.decode()
    assert "'missing'" in one_line(proc.stderr)
    assert store.get("here") is None
    finish(store, "here", 1)
    proc = idemfn_cli("forget", "--json", "here", "missing", env=env, status=Exit.NO_RECORD)
    out = as_json(proc)
    assert [r["key"] for r in out["removed"]] == ["here"]
    assert [p["exit_status"] for p in out["not_removed"]] == [Exit.NO_RECORD]
    assert "'missing'" in out["not_removed"][0]["error"]


def test_forget_removes_an_expired_record_that_ls_all_lists(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    fn = idempotent(key="{x}", name="exp", ttl=0.05, store=store)(lambda x: x)
    fn(1)
    poll(lambda: store.get("exp:1") is None, "exp:1 to expire")
    env = cli_env(tmp_path / "s")
    assert [e["state"] for e in as_json(idemfn_cli("ls", "--all", "--json", env=env))] == [
        "expired"
    ]
    idemfn_cli("forget", "exp:1", "--status", "halted", env=env, status=Exit.NO_RECORD)
    proc = idemfn_cli("forget", "exp:1", env=env)
    assert proc.stdout.decode() == "forgot exp:1 (was expired)\n"
    assert as_json(idemfn_cli("ls", "--all", "--json", env=env)) == []


def test_forget_status_halted_leaves_an_ok_record_alone(
    store: DiskStore, env: dict[str, str]
) -> None:
    finish(store, "good", 1)
    finish(store, "bad", error=RuntimeError("boom"))
    proc = idemfn_cli("forget", "--status", "halted", "good", "bad", env=env, status=Exit.NO_RECORD)
    assert "bad" in proc.stdout.decode() and "good" not in proc.stdout.decode()
    assert "'good'" in one_line(proc.stderr)
    assert store.get("good") is not None
    assert store.get("bad") is None
    idemfn_cli("forget", "--status", "ok", "good", env=env)
    assert store.get("good") is None


def test_forget_refuses_a_live_processing_record_unless_force(
    store: DiskStore, env: dict[str, str]
) -> None:
    live = idemfn.begin("live", store=store, fingerprint="fp")
    assert isinstance(live, idemfn.Claim)
    try:
        for args in (["forget", "live"], ["forget", "--status", "processing", "live"]):
            proc = idemfn_cli(*args, env=env, status=Exit.RUNNING)
            assert proc.stdout == b""
            assert "'live'" in one_line(proc.stderr)
            entry = store.get("live")
            assert entry is not None and entry.token == live.token
        proc = idemfn_cli("forget", "--force", "live", env=env)
        assert "live" in proc.stdout.decode()
        assert store.get("live") is None
    finally:
        # The forgotten owner finds out when it finishes: its outcome is not recorded.
        with pytest.raises(idemfn.OwnershipLost):
            live.complete("late")
    assert store.get("live") is None


def test_forget_an_abandoned_record_needs_no_force(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    abandon(store_dir, "stuck")
    proc = idemfn_cli("forget", "stuck", env=env)
    assert "stuck" in proc.stdout.decode() and "abandoned" in proc.stdout.decode()
    assert store.get("stuck") is None
    # And the next call runs.
    claim = idemfn.begin("stuck", store=store, fingerprint="fp:stuck")
    assert isinstance(claim, idemfn.Claim) and claim.attempt == 1
    claim.complete(None)


# -- prune and stats -------------------------------------------------------------------------


def test_prune_removes_expired_records_and_stale_claims(
    store: DiskStore, store_dir: Path, env: dict[str, str]
) -> None:
    finish(store, "old:1", 1, ttl=0.01)
    finish(store, "old:2", error=ValueError("x"), ttl=0.01)
    finish(store, "kept", 3)
    finish(store, "kept:forever", 4, ttl=None)
    abandon(store_dir, "stale", lease=0.05, ttl="0.05")  # prunable 0.1 s after its claim
    abandon(store_dir, "stuck")  # abandoned, but its lease and ttl have not run out
    stale = store.get("stale")
    assert stale is not None and stale.lease_until is not None and stale.ttl is not None
    poll(  # (prunable: prune's own rule, on the clocks it reads)
        lambda: (
            store.get("old:1") is None
            and store.get("old:2") is None
            and prunable(stale, store.time())
        ),
        "records to expire",
    )
    proc = idemfn_cli("prune", env=env)
    assert re.search(r"\b3\b", proc.stdout.decode()), proc.stdout
    assert proc.stderr == b""
    assert sorted(e.key for e in store.scan()) == ["kept", "kept:forever", "stuck"]
    assert as_json(idemfn_cli("prune", "--json", env=env)) == {"removed": 0}


def test_stats_counts_each_state(store: DiskStore, store_dir: Path, env: dict[str, str]) -> None:
    finish(store, "first", 1)
    finish(store, "ok:2", 2, ttl=None)
    finish(store, "halted", error=ValueError("x"))
    finish(store, "expired", 3, ttl=0.01)
    abandon(store_dir, "abandoned")
    live = idemfn.begin("zz:live", store=store, fingerprint="fp")
    assert isinstance(live, idemfn.Claim)
    poll(lambda: store.get("expired") is None, "a record to expire")
    try:
        raw, text = idemfn_many([["stats", "--json"], ["stats"]], env=env)
    finally:
        live.release()
    first = store.get("first")
    summary = as_json(raw)
    assert summary["by_state"] == {
        "ok": 2,
        "halted": 1,
        "processing": 1,
        "abandoned": 1,
        "expired": 1,
        "corrupt": 0,
        "tampered": 0,
    }
    assert summary["records"] == 5
    assert summary["store"] == repr(store)
    assert isinstance(summary["bytes"], int) and summary["bytes"] > 0
    assert summary["oldest"]["key"] == "first"
    assert first is not None
    assert summary["oldest"]["started_at"] == iso(first.record().started_at)
    assert summary["newest"]["key"] == "zz:live"
    out = text.stdout.decode()
    assert text.returncode == 0 and text.stderr == b""
    states = r"\(ok 2, halted 1, processing 1, abandoned 1, expired 1, corrupt 0, tampered 0\)"
    assert re.search(rf"^records:\s+5 {states}$", out, re.MULTILINE), out
    assert re.search(r"^size:\s+[\d.]+ (B|KiB|MiB)$", out, re.MULTILINE), out
    assert re.search(r"^oldest:\s+first ", out, re.MULTILINE), out


def test_stats_of_an_empty_store(store: DiskStore, env: dict[str, str]) -> None:
    finish(store, "k", 1)
    assert store.delete("k")
    summary = as_json(idemfn_cli("stats", "--json", env=env))
    assert summary["records"] == 0
    assert set(summary["by_state"].values()) == {0}
    assert summary["oldest"] is None and summary["newest"] is None
    assert idemfn_cli("ls", "--json", env=env).stdout == b"[]\n"


# -- the console script ----------------------------------------------------------------------


@needs_script
def test_console_script_is_the_same_command(store: DiskStore, env: dict[str, str]) -> None:
    finish(store, "k", 1)
    module = idemfn_cli("ls", "--json", env=env)
    script = idemfn_cli("ls", "--json", env=env, script=True)
    assert script.stdout == module.stdout
    assert as_json(idemfn_cli("show", "k", "--json", env=env, script=True))["value_repr"] == "1"
    proc = idemfn_cli("show", "nope", env=env, script=True, status=Exit.NO_RECORD)
    assert "'nope'" in one_line(proc.stderr)
    proc = idemfn_cli("--store", "ftp://h", "ls", env=env, script=True, status=Exit.BAD_STORE)
    one_line(proc.stderr)
    proc = idemfn_cli(env=env, script=True, status=Exit.USAGE)
    one_line(proc.stderr)
    help_text = idemfn_cli("--help", env=env, script=True).stdout.decode()
    assert help_text.startswith("usage: idemfn") and EXIT_CODES in help_text
