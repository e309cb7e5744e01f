"""A DiskStore's directory is private: created 0700 with 0600 files, and a directory that
another user owns or others may write to is refused (records are pickles: whoever writes them
runs code in the processes that replay them), unless the store is trusted on purpose."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from idemfn import DiskStore, StoreError, idempotent
from tests.support.cli import cli_env, idemfn_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _used(directory: Path, **options: bool) -> DiskStore:
    store = DiskStore(directory, **options)  # type: ignore[arg-type]

    @idempotent(key="k", store=store)
    def body() -> int:
        return 1

    assert body() == 1
    return store


@pytest.mark.parametrize("umask", [0o000, 0o277], ids=["umask 000", "umask 277"])
def test_a_new_store_is_private(tmp_path: Path, umask: int) -> None:
    """Whatever the umask: every directory idemfn makes on the way is 0700 (pathlib's
    mkdir(parents=True) made the missing parents 0777 under umask 000: issue 14), and every
    database file 0600 (a umask can also take the owner's bits away)."""
    old = os.umask(umask)
    try:
        store = _used(tmp_path / "state" / "idemfn" / "store")
    finally:
        os.umask(old)
    made = [tmp_path / "state", tmp_path / "state" / "idemfn", store.directory]
    assert {str(d): _mode(d) for d in made} == {str(d): 0o700 for d in made}
    files = sorted(store.directory.glob("cache.db*"))
    assert [f.name for f in files][:1] == ["cache.db"] and len(files) == 3  # -shm, -wal
    assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    assert [p.name for p in store.directory.iterdir() if p.is_dir()] == []  # no side files


def test_a_trusted_store_made_by_idemfn_is_private_too(tmp_path: Path) -> None:
    """Trusted, its modes are its owner's to set; the directories idemfn makes are 0700."""
    old = os.umask(0)
    try:
        store = _used(tmp_path / "state" / "store", trust_directory=True)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "state") == _mode(store.directory) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    runs: list[int] = []

    @idempotent(key="k", store=DiskStore(directory))
    def body() -> None:
        runs.append(1)

    with pytest.raises(StoreError, match=r"writable by its group or others") as caught:
        body()
    message = str(caught.value)
    assert str(directory) in message and f"{mode:04o}" in message
    assert "trust_directory=True" in message and "IDEMFN_TRUST_DIRECTORY=1" in message
    assert runs == [] and list(directory.iterdir()) == []  # nothing ran, nothing was created


def test_a_database_file_others_may_write_is_refused(tmp_path: Path) -> None:
    store = _used(tmp_path / "store")
    store.close()
    (store.directory / "cache.db").chmod(0o666)
    with pytest.raises(StoreError, match=r"cache\.db is writable by its group or others"):
        _used(store.directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI is root)")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)  # nobody
    with pytest.raises(StoreError, match=r"is owned by uid 65534, not this process's uid 0"):
        _used(directory)


def test_a_trusted_directory_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o775)
    _used(directory, trust_directory=True)
    assert _mode(directory) == 0o775  # left as it was: sharing it was the point

    monkeypatch.setenv("IDEMFN_TRUST_DIRECTORY", "1")
    _used(directory)
    with pytest.raises(StoreError, match="writable"):
        _used(directory, trust_directory=False)  # the keyword wins over the environment
    with pytest.raises(TypeError, match=r"trust_directory=\.\.\.\) must be True or False"):
        DiskStore(directory, trust_directory="yes")  # type: ignore[arg-type]


def test_the_command_refuses_and_trusts_the_same_way(tmp_path: Path) -> None:
    store = _used(tmp_path / "store")
    store.close()
    store.directory.chmod(0o777)
    env = cli_env(store.directory)

    refused = idemfn_cli("ls", env=env, status=74)
    assert b"writable by its group or others" in refused.stderr
    trusted = idemfn_cli("ls", env={**env, "IDEMFN_TRUST_DIRECTORY": "1"})
    assert b":k  ok" in trusted.stdout


def test_a_second_store_on_an_open_directory_leaves_the_first_ones_locks_alone(
    tmp_path: Path,
) -> None:
    """Closing any descriptor of an open SQLite file drops every POSIX lock the process holds
    on it: creating cache.db 0600 must never open a database that already exists. Without
    the locks, another process's close deletes the WAL under the first store (found by the
    crash-storm harness: "database disk image is malformed")."""
    import subprocess
    import sys

    directory = tmp_path / "store"

    @idempotent(key="{n}", store=DiskStore(directory))
    def charge(n: int) -> int:
        return n

    @idempotent(key="{n}", store=str(directory))  # another DiskStore object, same directory
    def refund(n: int) -> int:
        return n

    for n in range(100):
        charge(n)
    refund(1)  # its store opens now, beside charge's open connection
    code = (
        "import sys, idemfn\n"
        "s = idemfn.DiskStore(sys.argv[1])\n"
        "other = idemfn.idempotent(key='{n}', name='other', store=s)(lambda n: n)\n"
        "for n in range(100): other(n)\n"
        "s.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(directory)], check=True, timeout=60)
    assert charge(1) == 1 and refund(1) == 1 and charge(200) == 200
