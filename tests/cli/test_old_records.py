"""Records written by earlier versions of ``idemfn run`` still replay.

A halted run's record holds a pickled ``CommandFailed``, and pickle names a class by its module.
Until the CLI became the package ``idemfn._cli`` (issue 15), ``idemfn run`` lived in
``idemfn/_run.py``, so every such record names ``idemfn._run.CommandFailed``. The record below
was written by that code (``idemfn run -k old:failed -- sh -c 'echo out; echo err >&2; exit 3'``),
its fields captured as they were stored; it must replay as it did then.
"""

from __future__ import annotations

import json
import pickle
import pickletools
from pathlib import Path

from idemfn import DiskStore, Status
from idemfn._record import Entry
from tests.support.cli import cli_env, idemfn_cli

COMMAND = ["sh", "-c", "echo out; echo err >&2; exit 3"]

# Captured from the record of the command above, as idemfn wrote it before issue 15.
OLD_HALTED_RUN = Entry(
    "old:failed",
    "halted",
    "bc8925b3fb23f3350149e7d9bb71de25cc1704ead78084a1c972b8d2ada2a9b1",
    "elsewhere/0/14169/1807906",  # (its owner, made remote: the record is finished anyway)
    "06696461b1ba01a5-1",
    1,
    1795782351.3526685,
    finished_at=1795782351.3903015,
    payload=(
        b"\x80\x05\x95\xc7\x00\x00\x00\x00\x00\x00\x00\x8c\x0bidemfn._run\x94\x8c\rCommandFailed"
        b"\x94\x93\x94}\x94(\x8c\x06format\x94\x8c\x0cidemfn.run/1\x94\x8c\x04argv\x94]\x94(\x8c"
        b"\x02sh\x94\x8c\x02-c\x94\x8c\x1eecho out; echo err >&2; exit 3\x94e\x8c\nreturncode\x94"
        b"K\x03\x8c\x06output\x94]\x94(K\x01C\x04out\n\x94\x86\x94K\x02C\x04err\n\x94\x86\x94e\x8c"
        b"\x07dropped\x94K\x00\x8c\x0einterrupted_by\x94Nu\x85\x94R\x94."
    ),
    reason="the call raised idemfn._run.CommandFailed",
    exc_type="idemfn._run.CommandFailed",
    message="command `sh -c 'echo out; echo err >&2; exit 3'` exited with code 3",
    traceback=(
        "idemfn._run.CommandFailed: command `sh -c 'echo out; echo err >&2; exit 3'` exited"
        " with code 3\n"
    ),
)


def _globals(payload: bytes) -> list[str]:
    """The module and name of each class or function a pickle refers to."""
    strings: list[str] = []
    found: list[str] = []
    for opcode, arg, _ in pickletools.genops(payload):
        if opcode.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_a_halted_run_recorded_before_the_cli_package_replays(tmp_path: Path) -> None:
    assert _globals(OLD_HALTED_RUN.payload or b"") == ["idemfn._run.CommandFailed"]
    store = DiskStore(tmp_path / "store")
    assert store.claim(OLD_HALTED_RUN) is None
    env = cli_env(tmp_path / "store")
    replay = idemfn_cli("run", "--key", "old:failed", "--", *COMMAND, env=env, status=3)
    assert (replay.stdout, replay.stderr) == (b"out\n", b"err\n")  # replayed: not "no longer loads"
    shown = json.loads(idemfn_cli("show", "old:failed", "--json", env=env).stdout)
    assert (shown["status"], shown["command"]["exit_status"]) == (Status.HALTED, 3)
    assert shown["command"]["stdout"] == "out\n"


def test_new_halted_runs_name_the_class_where_older_versions_find_it(tmp_path: Path) -> None:
    # Written as idemfn._run.CommandFailed, a record replays in the versions before issue 15
    # too (a rollback), which know no idemfn._cli.
    env = cli_env(tmp_path / "store")
    idemfn_cli("run", "--key", "new:failed", "--", *COMMAND, env=env, status=3)
    entry = DiskStore(tmp_path / "store").get("new:failed")
    assert entry is not None and entry.payload is not None
    assert entry.exc_type == "idemfn._run.CommandFailed"
    assert _globals(entry.payload) == ["idemfn._run.CommandFailed"]
    assert pickle.loads(entry.payload).outcome["returncode"] == 3


def test_cloudpickle_stores_command_failed_by_reference_in_a_fresh_process() -> None:
    # cloudpickle stores a class by value when the module its __module__ names is not imported:
    # the record would then hold a copy of CommandFailed instead of naming idemfn._run's.
    import subprocess
    import sys

    script = (
        "import cloudpickle, pickletools, sys\n"
        "from idemfn._cli.command_outcome import CommandFailed\n"
        "outcome = {'argv': ['false'], 'returncode': 1, 'interrupted_by': None}\n"
        "data = cloudpickle.dumps(CommandFailed(outcome))\n"
        "strings = [arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)]\n"
        "print('idemfn._run' in strings and 'CommandFailed' in strings,"
        " '_make_skeleton_class' in strings)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["True", "False"], out
