"""The way to a DiskStore is part of its security boundary (issue 14, item 7).

Records are pickles, so another local user who can change *which directory* a process opens
can make it unpickle a record they forged. diskcache opens a new SQLite connection by path in
every new thread, so a path checked once but opened again later is not enough: the store
resolves its path once, checks every component of what it resolves to, and opens that.

The attacks run as two real users when the suite runs as root (as in CI): the victim and the
attacker are accounts the suite creates, each in processes of its own.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.queues
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idemfn import DiskStore, Store, StoreError, idempotent, open_store
from tests.support.cli import cli_env, idemfn_cli

TIMEOUT = 60.0
as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: the test makes two users and files they own (CI runs as root)",
)
# The tests that make the two users run on one xdist worker, one after the other: two useradd
# at once contend for /etc/passwd's lock (see tests/conftest.py).
makes_users = pytest.mark.xdist_group("system-users")


# -- two real users ------------------------------------------------------------------------------


def _account(name: str) -> tuple[int, int]:
    """The uid and gid of ``name``, a system account made for these tests if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            pytest.skip("useradd is missing: cannot make the test's second user")
        # Another test process may add it meanwhile: its status is checked by getpwnam below.
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            check=False,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


# Each user's Python runs in a forked child that drops to the user's uid: the interpreter may
# live where other users cannot run it (a root-only pyenv). Their shell steps run as them too.
FORK = multiprocessing.get_context("fork")


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


class _Evil:
    """The attacker's value: unpickling it runs code, which leaves a file named after the uid
    that ran it."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def __reduce__(self) -> tuple[object, ...]:
        code = f"import os; open({str(self.marks)!r} + '/ran-as-%d' % os.getuid(), 'w').close()"
        return (exec, (code, {}))


def _forge(uid: int, gid: int, forged: Path, marks: Path) -> None:
    """As the attacker: a record with the victim's name, key and (no) arguments, and a value
    whose unpickling runs the attacker's code; left open to all, so that any victim can read
    it through SQLite (which writes its -shm file)."""
    _become(uid, gid)
    store = DiskStore(forged)
    idempotent(key="k", name="attack", store=store)(lambda: _Evil(marks))()
    store.close()
    for name in os.listdir(forged):
        os.chmod(forged / name, 0o666)
    os.chmod(forged, 0o777)


def _victim(uid: int, gid: int, path: Path, go: Any, out: Any) -> None:
    """As the victim: use the store through ``path`` once (the check happens then), wait
    while the attacker acts, then read the key again from a new thread, which opens a new
    SQLite connection."""
    _become(uid, gid)
    charge = idempotent(key="k", name="attack", store=DiskStore(path))(lambda: "the victim's own")

    def call() -> str:
        try:
            return f"value {charge()!r}"
        except StoreError as exc:
            return f"refused {exc}"

    out.send(call())
    go.wait(TIMEOUT)
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(call()))
    thread.start()
    thread.join(TIMEOUT)
    out.send(seen[0])


def _in_child(target: Callable[..., None], *args: object) -> None:
    child = FORK.Process(target=target, args=args)
    child.start()
    child.join(TIMEOUT)
    assert child.exitcode == 0


def _shell_as(uid: int, gid: int, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script],
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _attacked(
    uid: int,
    gid: int,
    path: Path,
    attack: str,
    attacker: int,
    before: Callable[[], object] = lambda: None,
) -> tuple[str, str, subprocess.CompletedProcess[str]]:
    """What the victim's two uses of ``path`` give, and how ``attack`` went, run as
    ``attacker`` between them (after ``before``, run as root)."""
    go = FORK.Event()
    answers, out = FORK.Pipe(duplex=False)
    victim = FORK.Process(target=_victim, args=(uid, gid, path, go, out))
    victim.start()
    try:
        assert answers.poll(TIMEOUT)
        first = answers.recv()
        before()
        done = _shell_as(attacker, attacker, attack)
        go.set()
        assert answers.poll(TIMEOUT)
        second = answers.recv()
    finally:
        go.set()
        victim.join(TIMEOUT)
    assert victim.exitcode == 0
    return first, second, done


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory both test users can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="idemfn-users-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _owned(path: Path, uid: int, gid: int, mode: int = 0o700) -> Path:
    path.mkdir()
    path.chmod(mode)
    os.chown(path, uid, gid)
    return path


@as_root
@makes_users
@pytest.mark.parametrize(
    "layout",
    [
        "the attacker's symlink in a sticky directory",
        "the victim's directory in one anyone may rename entries of",
    ],
)
def test_another_user_cannot_swap_the_store_under_a_running_process(
    shared: Path, layout: str
) -> None:
    victim, victim_gid = _account("idemfn-victim")
    attacker, attacker_gid = _account("idemfn-attacker")
    home = _owned(shared / "victim", victim, victim_gid)
    marks = _owned(shared / "marks", 0, 0, 0o1777)  # where the forged value's code leaves a mark
    lair = _owned(shared / "attacker", attacker, attacker_gid, 0o755)
    forged = _owned(lair / "forged", attacker, attacker_gid)
    _in_child(_forge, attacker, attacker_gid, forged, marks)

    if layout == "the attacker's symlink in a sticky directory":
        sticky = _owned(shared / "sticky", 0, 0, 0o1777)
        path = sticky / "link"
        own = _owned(home / "store", victim, victim_gid)  # where the link points first
        made = _shell_as(attacker, attacker_gid, f"ln -s {own} {path}")
        assert made.returncode == 0, made.stderr
        # The attack: a new link renamed over the first (its owner may, in a sticky directory).
        attack = f"ln -s {forged} {sticky}/new && mv -T {sticky}/new {path}"
    else:
        open_ = _owned(shared / "open", 0, 0, 0o777)  # no sticky bit
        path = _owned(open_ / "store", victim, victim_gid)
        # The attack: the victim's directory moved aside, the forged one moved into its place.
        attack = f"mv -T {path} {open_}/aside && mv -T {forged} {path}"

    first, second, done = _attacked(victim, victim_gid, path, attack, attacker)
    assert done.returncode == 0, done.stderr  # the attacker could do it

    # The forged record was never unpickled by the victim.
    assert not (marks / f"ran-as-{victim}").exists(), (first, second)
    # Refused from the first use, naming what another user can change and the way out.
    assert first.startswith("refused "), first
    if layout == "the attacker's symlink in a sticky directory":
        assert f"{path} is owned by uid {attacker}, in {sticky}" in first
    else:
        assert f"{open_} is writable by its group or others (mode 0777)" in first
    assert "trust_directory=True" in first and "IDEMFN_TRUST_DIRECTORY=1" in first
    assert second.startswith("refused "), second


@as_root
@makes_users
def test_a_path_only_its_user_and_root_can_change_is_used(shared: Path) -> None:
    """No false alarm on the usual ways to a store: root's sticky directories (as /tmp), and
    the user's own link in one, which another user cannot re-point."""
    victim, victim_gid = _account("idemfn-victim")
    attacker, _ = _account("idemfn-attacker")
    home = _owned(shared / "victim", victim, victim_gid)
    own = _owned(home / "store", victim, victim_gid)
    sticky = _owned(shared / "sticky", 0, 0, 0o1777)
    path = sticky / "link"
    made = _shell_as(victim, victim_gid, f"ln -s {own} {path}")
    assert made.returncode == 0, made.stderr

    attack = f"ln -s {shared} {sticky}/new && mv -T {sticky}/new {path}"
    first, second, done = _attacked(victim, victim_gid, path, attack, attacker)
    assert done.returncode != 0, "the sticky bit: only the link's owner may replace it"
    assert first == second == 'value "the victim\'s own"'


@as_root
@makes_users
def test_a_store_removed_under_a_running_process_is_not_replaced_by_another_users(
    shared: Path,
) -> None:
    """Root's tmp cleaner removes an idle store from a sticky directory while a process still
    uses it; another user makes a directory of theirs in its place. A new thread of that
    process opens a new connection by the same path: the way is checked again then, and
    the directory that is there now refused, as a new store would refuse it."""
    victim, victim_gid = _account("idemfn-victim")
    attacker, attacker_gid = _account("idemfn-attacker")
    marks = _owned(shared / "marks", 0, 0, 0o1777)
    lair = _owned(shared / "attacker", attacker, attacker_gid, 0o755)
    forged = _owned(lair / "forged", attacker, attacker_gid)
    _in_child(_forge, attacker, attacker_gid, forged, marks)
    sticky = _owned(shared / "sticky", 0, 0, 0o1777)
    path = sticky / "store"  # made by the victim's first use

    def cleaner() -> None:
        shutil.rmtree(path)

    attack = f"mv -T {forged} {path}"
    first, second, done = _attacked(victim, victim_gid, path, attack, attacker, cleaner)
    assert done.returncode == 0, done.stderr  # the attacker could do it
    assert first == 'value "the victim\'s own"'
    assert not (marks / f"ran-as-{victim}").exists(), second
    assert second.startswith("refused "), second
    assert f"{path} is owned by uid {attacker}, in {sticky}" in second


def test_a_new_thread_opens_the_store_only_where_it_was_checked(tmp_path: Path) -> None:
    """Each new thread's connection checks the way again: a store directory removed since
    is not made again behind the store's back, and one that is no longer private is refused."""
    store = DiskStore(tmp_path / "store")
    read = idempotent(key="k", name="pinned", store=store)(lambda: "ran")
    assert read() == "ran"

    def in_thread() -> str:
        seen: list[str] = []

        def call() -> None:
            try:
                seen.append(f"value {read()!r}")
            except StoreError as exc:
                seen.append(f"refused {exc}")

        thread = threading.Thread(target=call)
        thread.start()
        thread.join(TIMEOUT)
        return seen[0]

    (tmp_path / "store").chmod(0o777)
    assert re.search(r"store is writable by its group or others \(mode 0777\)", in_thread())
    (tmp_path / "store").chmod(0o700)
    assert in_thread() == "value 'ran'"
    shutil.rmtree(tmp_path / "store")
    assert f"{tmp_path}/store was removed since the store opened" in in_thread()
    assert not (tmp_path / "store").exists()
    store.close()  # the way out: opened again, and made again
    assert read() == "ran"


# -- the path is resolved once --------------------------------------------------------------------


def _record(directory: Path, value: str) -> None:
    idempotent(key="k", name="pinned", store=DiskStore(directory))(lambda: value)()


def _read_in_fork(store: DiskStore, answer: multiprocessing.queues.SimpleQueue[str]) -> None:
    answer.put(idempotent(key="k", name="pinned", store=store)(lambda: "ran")())


def test_the_store_opens_the_directory_its_path_led_to_when_first_used(tmp_path: Path) -> None:
    """A link re-pointed later (a deploy flipping `current`) changes nothing for a store
    already in use: each new thread's connection, and a forked child's, open the directory
    that was checked."""
    _record(tmp_path / "first", "first")
    _record(tmp_path / "second", "second")
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "first")
    store = DiskStore(link)
    read = idempotent(key="k", name="pinned", store=store)(lambda: "ran")
    assert read() == "first"

    (tmp_path / "next").symlink_to(tmp_path / "second")
    (tmp_path / "next").replace(link)
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(read()))
    thread.start()
    thread.join(TIMEOUT)
    assert seen == ["first"]

    fork = multiprocessing.get_context("fork")
    answer: multiprocessing.queues.SimpleQueue[str] = fork.SimpleQueue()
    child = fork.Process(target=_read_in_fork, args=(store, answer))
    child.start()
    child.join(TIMEOUT)
    assert child.exitcode == 0 and answer.get() == "first"

    store.close()  # closed and used again: still the same directory
    assert read() == "first"
    fresh = idempotent(key="k", name="pinned", store=DiskStore(link))(lambda: "ran")
    assert fresh() == "second"  # a new store follows the link as it is now


# -- what the check covers ----------------------------------------------------------------------


NOBODY = 65534


def _layout(tmp_path: Path, layout: str) -> tuple[Path, str | None]:
    """The path to a store in ``layout``, and the refusal expected (None: accepted)."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    if layout == "in a directory others may write to, not sticky":
        open_ = tmp_path / "open"
        open_.mkdir()
        open_.chmod(0o777)
        return open_ / "store", rf"{open_} is writable by its group or others \(mode 0777\)"
    if layout == "in a directory its group may write to, not sticky":
        open_ = tmp_path / "open"
        open_.mkdir()
        open_.chmod(0o775)
        return open_ / "store", rf"{open_} is writable by its group or others \(mode 0775\)"
    if layout == "in a sticky directory":
        return sticky / "store", None
    if layout == "through our own link in a sticky directory":
        (sticky / "link").symlink_to(tmp_path / "store")
        return sticky / "link", None
    if layout == "under a relative link":
        (tmp_path / "real").mkdir()
        (tmp_path / "rel").symlink_to("real/../real")
        return tmp_path / "rel" / ".." / "rel" / "store", None
    if os.geteuid() != 0:
        pytest.skip("files owned by another user need root (CI is root)")
    if layout == "through another user's link in a sticky directory":
        (sticky / "link").symlink_to(tmp_path / "store")
        os.chown(sticky / "link", NOBODY, NOBODY, follow_symlinks=False)
        return sticky / "link", rf"{sticky}/link is owned by uid {NOBODY}, in {sticky}"
    if layout == "through another user's link in a directory only we can write":
        (tmp_path / "link").symlink_to(tmp_path / "store")
        os.chown(tmp_path / "link", NOBODY, NOBODY, follow_symlinks=False)
        return tmp_path / "link", None  # its owner can neither change nor remove it
    if layout == "under a directory another user owns":
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, NOBODY, NOBODY)
        return theirs / "store", rf"{theirs} is owned by uid {NOBODY}"
    raise AssertionError(layout)


LAYOUTS = [
    "in a directory others may write to, not sticky",
    "in a directory its group may write to, not sticky",
    "in a sticky directory",
    "through our own link in a sticky directory",
    "under a relative link",
    "through another user's link in a sticky directory",
    "through another user's link in a directory only we can write",
    "under a directory another user owns",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_directory_on_the_way_is_checked(tmp_path: Path, layout: str) -> None:
    path, refusal = _layout(tmp_path, layout)
    store = DiskStore(path)
    runs: list[int] = []
    fn = idempotent(key="k", name="layout", store=store)(lambda: runs.append(1))
    if refusal is None:
        fn()
        assert runs == [1]
        assert stat.S_IMODE(Path(os.path.realpath(path)).stat().st_mode) == 0o700
        return
    with pytest.raises(StoreError, match=refusal) as caught:
        fn()
    message = str(caught.value)
    assert repr(store) in message  # which store, and the way out
    assert "trust_directory=True" in message and "IDEMFN_TRUST_DIRECTORY=1" in message
    assert runs == [] and not path.exists()  # nothing ran, nothing was made

    # Trusted on purpose: opened as it is.
    trusted = idempotent(key="k", name="layout", store=DiskStore(path, trust_directory=True))
    trusted(lambda: runs.append(2))()
    assert runs == [2]


def test_a_symbolic_link_inside_the_store_is_refused(tmp_path: Path) -> None:
    """SQLite would follow it out of the directory that was checked."""
    _record(tmp_path / "elsewhere", "elsewhere")
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    (store / "cache.db").symlink_to(tmp_path / "elsewhere" / "cache.db")
    with pytest.raises(StoreError, match=r"cache\.db is a symbolic link"):
        _record(store, "ran")


@pytest.mark.parametrize("given", ["store=", "IDEMFN_STORE", "open_store", "the command"])
def test_the_way_is_checked_however_the_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """A path given as text is not resolved before the store checks it: resolved first, the
    link another user owns would go unseen."""
    path, refusal = _layout(tmp_path, "through another user's link in a sticky directory")
    assert refusal is not None
    _record(tmp_path / "store", "ours")  # where the link leads: a store of ours
    if given == "the command":
        refused = idemfn_cli("ls", env=cli_env(path), status=74)
        assert re.search(refusal.encode(), refused.stderr), refused.stderr
        return
    use: Callable[[], object]
    if given == "store=":
        use = idempotent(key="k", name="pinned", store=str(path))(lambda: "ran")
    elif given == "IDEMFN_STORE":
        monkeypatch.setenv("IDEMFN_STORE", str(path))
        use = idempotent(key="k", name="pinned")(lambda: "ran")
    else:
        use = functools.partial(open_store(path).get, "pinned:k")
    with pytest.raises(StoreError, match=refusal):
        use()


def test_dot_dot_means_what_it_means_to_the_system(tmp_path: Path) -> None:
    """After a link, ".." leads to the parent of where the link points; after a name that
    does not exist, it just cancels that name, which is not made."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    makers: list[Callable[[str], Store]] = [DiskStore, open_store]
    for name, given in enumerate(makers):
        fn = idempotent(key="k", name="dots", store=given(f"{tmp_path}/link/../s{name}"))
        fn(lambda: 1)()
        assert (tmp_path / "real" / f"s{name}" / "cache.db").is_file()
        fn = idempotent(key="k", name="dots", store=given(f"{tmp_path}/no/../t{name}"))
        fn(lambda: 1)()
        assert (tmp_path / f"t{name}" / "cache.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "t0", "t1"]


# -- the directory opened is the directory checked ------------------------------------------------


def _victim_once(uid: int, gid: int, path: str, env: dict[str, str], out: Any) -> None:
    """As the victim, with ``env`` in its environment: one call through ``path``."""
    _become(uid, gid)
    os.environ.update(env)
    charge = idempotent(key="k", name="attack", store=DiskStore(path))(lambda: "the victim's own")
    try:
        out.send(f"value {charge()!r}")
    except StoreError as exc:
        out.send(f"refused {exc}")


@as_root
@makes_users
def test_a_dollar_in_the_path_does_not_open_another_users_directory(shared: Path) -> None:
    """diskcache expands ``$NAME`` in the directory it is given (os.path.expandvars): a store
    named ``/tmp/idemfn-$USER`` was checked as that literal directory (made 0700, ours) and
    then opened as ``/tmp/idemfn-<user>``, which another user had made, holding their record."""
    victim, victim_gid = _account("idemfn-victim")
    attacker, attacker_gid = _account("idemfn-attacker")
    marks = _owned(shared / "marks", 0, 0, 0o1777)
    sticky = _owned(shared / "sticky", 0, 0, 0o1777)
    forged = _owned(sticky / "idemfn-idemfn-victim", attacker, attacker_gid)
    _in_child(_forge, attacker, attacker_gid, forged, marks)

    answers, out = FORK.Pipe(duplex=False)
    path = f"{sticky}/idemfn-$USER"
    _in_child(_victim_once, victim, victim_gid, path, {"USER": "idemfn-victim"}, out)
    assert answers.poll(TIMEOUT)
    answer = answers.recv()
    assert not (marks / f"ran-as-{victim}").exists(), answer
    assert answer.startswith("refused "), answer
    assert f"{path} holds $USER" in answer, answer
    assert not Path(path).exists()  # refused before anything was made


def test_the_store_opens_no_directory_but_the_one_it_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``$NAME`` (or ``${NAME}``) of a set environment variable, in the path given or in a
    link on the way, would make diskcache open (and, under umask 000, make others-writable)
    directories that were never checked: refused, naming the variable and the way out. One
    that names no set variable is a name like any other."""
    monkeypatch.setenv("IDEMFN_TEST_ELSEWHERE", "made/by/diskcache")
    monkeypatch.delenv("IDEMFN_TEST_UNSET", raising=False)
    (tmp_path / "link").symlink_to(tmp_path / "${IDEMFN_TEST_ELSEWHERE}")
    for given, named in [
        (f"{tmp_path}/$IDEMFN_TEST_ELSEWHERE", "$IDEMFN_TEST_ELSEWHERE"),
        (f"{tmp_path}/link", "${IDEMFN_TEST_ELSEWHERE}"),
    ]:
        for trusted in (False, True):
            store = DiskStore(given, trust_directory=trusted)
            old = os.umask(0)
            try:
                with pytest.raises(StoreError, match=re.escape(named)) as caught:
                    _record_in(store)
            finally:
                os.umask(old)
            assert repr(store) in str(caught.value) and "os.path.expandvars" in str(caught.value)
            assert not (tmp_path / "made").exists()  # nothing made where it was not checked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]

    literal = tmp_path / "$IDEMFN_TEST_UNSET"
    _record_in(DiskStore(literal))
    assert (literal / "cache.db").is_file()


def _record_in(store: DiskStore) -> None:
    idempotent(key="k", name="dollar", store=store)(lambda: 1)()
