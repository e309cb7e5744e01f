"""Corrupt records: a clear ``StoreError`` naming the key, the other keys unharmed, and the
``idemfn`` command able to list, show and forget them.

Records are corrupted in each backend behind the store's back: garbage bytes, a truncated
record, and a record written by a future format version. Every single flipped bit of a record,
and of the SQLite page that holds it, is refused, never replayed as another value (issue 14).
"""

from __future__ import annotations

import contextlib
import json
import marshal
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from idemfn import DiskStore, RedisStore, Store, StoreError, idempotent
from idemfn._record import FORMAT_VERSION, Entry, decode, encode
from tests.support.cli import cli_env, idemfn_cli
from tests.support.stores import age, make_store, overwrite, stored_bytes

BROKEN: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda good: b"\x00not a record\xff",
    "truncated": lambda good: good[: len(good) // 2],
    "future version": lambda good: marshal.dumps((FORMAT_VERSION + 1, *marshal.loads(good)[1:]), 4),
}


def corrupt(store: Store, key: str, how: str) -> None:
    """Replace ``key``'s stored bytes as ``how`` says, behind the store's back."""
    entry = store.get(key)
    assert entry is not None
    overwrite(store, key, BROKEN[how](encode(entry)))


@pytest.fixture(params=["disk", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path, request)
    yield s
    s.close()


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_corrupt_record_is_a_store_error_naming_its_key(store: Store, how: str) -> None:
    runs: list[str] = []

    @idempotent(key="{order}", name="shop", store=store)
    def charge(order: str) -> str:
        runs.append(order)
        return f"charged {order}"

    charge("bad"), charge("good")
    corrupt(store, "shop:bad", how)

    with pytest.raises(StoreError, match=r"'shop:bad'.*corrupt") as caught:
        charge("bad")
    assert caught.value.key == "shop:bad"
    assert "(`idemfn forget --force shop:bad`)" in str(caught.value)  # the way out
    assert runs == ["bad", "good"]  # nothing ran again
    assert charge("good") == "charged good" and charge("new") == "charged new"
    with pytest.raises(StoreError, match="'shop:bad'"):
        store.get("shop:bad")


def test_scan_reports_corrupt_records_and_goes_on(store: Store) -> None:
    @idempotent(key="{n}", name="app", store=store, ttl=60)
    def short(n: int) -> int:
        return n

    @idempotent(key="{n}", name="keep", store=store)
    def kept(n: int) -> int:
        return n

    for n in range(3):
        kept(n)
    short(1)
    age(store, "app:1", 120)  # expired a minute ago (Redis drops it itself, at once)
    corrupt(store, "keep:1", "garbage")
    expired = [] if isinstance(store, RedisStore) else ["app:1"]

    with pytest.raises(StoreError, match="'keep:1'"):
        list(store.scan())
    seen: list[str] = []
    keys = [e.key for e in store.scan(corrupt=lambda key, error: seen.append(key))]
    assert sorted(keys) == [*expired, "keep:0", "keep:2"] and seen == ["keep:1"]

    # The expired record goes; the corrupt one is left for an operator.
    assert store.prune() == len(expired)
    assert store.delete("keep:1") is True  # and it can be forgotten
    assert sorted(e.key for e in store.scan()) == ["keep:0", "keep:2"]


def test_the_command_lists_shows_counts_and_forgets_a_corrupt_record(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")

    @idempotent(key="{n}", name="job", store=store)
    def job(n: int) -> int:
        return n

    job(1), job(2)
    corrupt(store, "job:1", "truncated")
    env = cli_env(tmp_path / "store")

    listing = idemfn_cli("ls", env=env)
    rows = [line.split() for line in listing.stdout.decode().splitlines()[1:]]
    assert ["job:1", "corrupt", "-", "-", "-"] in rows and rows[0][:2] == ["job:2", "ok"]
    assert b"1 record cannot be read" in listing.stderr

    as_json = json.loads(idemfn_cli("ls", "--json", env=env).stdout)
    assert {r["key"]: r["status"] for r in as_json} == {"job:1": "corrupt", "job:2": "ok"}
    assert "corrupt" in next(r["error"] for r in as_json if r["key"] == "job:1")
    only = json.loads(idemfn_cli("ls", "--status", "corrupt", "--json", env=env).stdout)
    assert [r["key"] for r in only] == ["job:1"]

    stats = json.loads(idemfn_cli("stats", "--json", env=env).stdout)
    assert stats["by_state"]["corrupt"] == 1 and stats["by_state"]["ok"] == 1

    shown = idemfn_cli("show", "job:1", env=env, status=74)
    assert b"'job:1'" in shown.stderr and shown.stderr.count(b"forget --force job:1") == 1
    idemfn_cli("forget", "job:1", env=env, status=74)  # unread: only with --force
    idemfn_cli("forget", "--force", "job:1", env=env)
    assert [r["key"] for r in json.loads(idemfn_cli("ls", "--json", env=env).stdout)] == ["job:2"]
    idemfn_cli("prune", env=env)


# A record's first bytes as idemfn wrote them: a tuple of 18 fields, the first the version.
_V2_HEAD = b")\x12\xe9\x02\x00\x00\x00"
_V3_HEAD = b")\x12\xe9\x03\x00\x00\x00"


@pytest.mark.parametrize(
    "data",
    [
        b"(\xff\xff\xff\x3f",
        b"[\xff\xff\xff\x3f",
        b"\xa8\xff\xff\xff\x3f\x00",
        # A field inside the record claiming a list of a billion slots (issue 14): refused by
        # the checksum, or in a record from before the checksum, by its layout.
        _V3_HEAD + b"[\xff\xff\xff\x3f" + bytes(8),
        _V2_HEAD + b"[\xff\xff\xff\x3f",
        _V2_HEAD + b"\xda\x01k" + b"[\xff\xff\xff\x3f",
    ],
)
def test_a_record_claiming_a_huge_size_fails_without_allocating_it(data: bytes) -> None:
    # Five bytes made marshal build a tuple of a billion slots (8 GB) before it found them
    # short: every read of such a record stalled. Under a 1 GB address-space limit it must be
    # a plain "not an idemfn record", never a MemoryError.
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from idemfn._record import decode\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        f"try:\n    decode({data!r})\nexcept ValueError as e:\n    print('refused', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused "), done.stdout
    assert "not an idemfn record" in done.stdout or "checksum" in done.stdout, done.stdout


# --------------------------------------------------------------------------------------------
# Flipped bits (issue 14): of 2,336 single-bit flips of a stored record, 302 replayed another
# value with no error (an amount of 125000 cents became 125001), others ran the body again.


@dataclass(frozen=True)
class Invoice:
    number: int
    cents: int


class Declined(Exception):
    """Recorded halted, replayed as itself."""


def _declined() -> NoReturn:
    raise Declined("card declined", 125000)


# What a call records, and with which serializer.
RECORDED: dict[str, tuple[str, Callable[[], object]]] = {
    "an int amount": ("pickle", lambda: 125000),
    "a str": ("pickle", lambda: "charged order 17: 1250.00 EUR"),
    "a pickled object": ("pickle", lambda: Invoice(17, 125000)),
    "a halted exception": ("pickle", _declined),
    "a JSON value": ("json", lambda: {"cents": 125000, "currency": "EUR"}),
}


def _recorder(store: Store, what: str, runs: list[str]) -> Callable[[], object]:
    """A decorated function recording ``RECORDED[what]`` under key ``17``, as a call that
    returns its outcome: ("value", v), ("raised", type, args), or StoreError."""
    serializer, body = RECORDED[what]

    @idempotent(key="17", name=what.replace(" ", "-"), store=store, serializer=serializer)
    def call() -> object:
        runs.append(what)
        return body()

    def outcome() -> object:
        try:
            return ("value", call())
        except StoreError:
            return StoreError
        except Exception as exc:
            return ("raised", type(exc), exc.args)

    return outcome


def _recorders(store: Store, runs: list[str]) -> dict[str, Callable[[], object]]:
    return {what: _recorder(store, what, runs) for what in RECORDED}


@pytest.mark.parametrize(
    ("what", "signed"), [(what, False) for what in RECORDED] + [("an int amount", True)]
)
def test_every_single_bit_flip_of_a_record_is_refused(
    tmp_path: Path, what: str, signed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path / "store", signing_key="k" * 32 if signed else None)
    runs: list[str] = []
    outcome = _recorder(store, what, runs)
    recorded = outcome()
    assert recorded == outcome() != StoreError and runs == [what]  # recorded, and replayed
    key = f"{what.replace(' ', '-')}:17"
    good = stored_bytes(store, key)

    # Nothing of a flipped record may reach marshal or pickle: the check comes first.
    loaded: list[bytes] = []
    real_marshal, real_pickle = marshal.loads, pickle.loads

    def marshal_loads(data: Any, /) -> Any:
        if bytes(data[:1]) in (b")", b"\xa9"):  # a record (importlib loads code: "\xe3")
            loaded.append(bytes(data))
        return real_marshal(data)

    def pickle_loads(data: Any, /, **options: Any) -> Any:
        loaded.append(bytes(data))
        return real_pickle(data, **options)

    monkeypatch.setattr(marshal, "loads", marshal_loads)
    monkeypatch.setattr(pickle, "loads", pickle_loads)
    not_refused: dict[str, list[tuple[int, object]]] = {"ran again": [], "other": [], "same": []}
    for bit in range(len(good) * 8):
        damaged = bytearray(good)
        damaged[bit // 8] ^= 1 << bit % 8
        store.cache.set(key, bytes(damaged))
        got = outcome()
        if runs != [what]:
            not_refused["ran again"].append((bit, got))
            del runs[1:]
        elif got is not StoreError:
            not_refused["same" if got == recorded else "other"].append((bit, got))
    monkeypatch.undo()
    assert not any(not_refused.values()), (
        f"of {len(good) * 8} flips, {len(not_refused['ran again'])} ran the body again,"
        f" {len(not_refused['other'])} replayed another outcome, and"
        f" {len(not_refused['same'])} the recorded one, unchecked; (bit, outcome):"
        f" {not_refused['ran again'][:3]} {not_refused['other'][:5]}"
    )
    assert loaded == []
    store.cache.set(key, good)
    assert outcome() == recorded and runs == [what]  # the record itself still replays


def test_a_record_from_before_the_checksum_is_still_read(tmp_path: Path) -> None:
    # Keys recorded before an upgrade keep replaying (refusing them would leave forget, which
    # runs the side effect again, as the only way on); version 1 is in test_clock.py.
    store = DiskStore(tmp_path / "store")
    runs: list[str] = []
    outcomes = _recorders(store, runs)
    recorded = {what: outcome() for what, outcome in outcomes.items()}
    for what in RECORDED:
        key = f"{what.replace(' ', '-')}:17"
        fields = marshal.loads(stored_bytes(store, key))  # marshal stops before the checksum
        assert fields[0] == FORMAT_VERSION == 3
        version_2 = marshal.dumps((2, *fields[1:]), 4)  # as idemfn wrote it before issue 14
        assert decode(version_2) == decode(stored_bytes(store, key))
        store.cache.set(key, version_2)
        assert outcomes[what]() == recorded[what]
    assert runs == list(RECORDED)  # each ran once, before its record was rewritten


def test_a_damaged_record_never_passes_for_one_from_before_the_checksum() -> None:
    entry = Entry("k", "ok", "f", "o", "t", 1, 1.5, finished_at=2.5, payload=b"\x80\x05K\x05.")
    data = encode(entry)
    assert data[:7] == _V3_HEAD
    for old in (1, 2):  # one flipped bit turns 3 into 1 or 2: the checksum still follows
        damaged = data[:3] + bytes([old]) + data[4:]
        with pytest.raises(ValueError, match="wrong layout"):
            decode(damaged)
    # A record that says version 2 but holds a field no record has (a list) is refused before
    # marshal reads it, as is one with bytes after its fields.
    with pytest.raises(ValueError, match="wrong type"):
        decode(_V2_HEAD + b"[\x00\x00\x00\x00" + b"N" * 16)
    fields = marshal.loads(data)
    version_2 = marshal.dumps((2, *fields[1:]), 4)
    assert decode(version_2) == entry
    with pytest.raises(ValueError, match="wrong layout"):
        decode(version_2 + b"\x00")


def _page_of(db: bytes, records: list[bytes]) -> tuple[range, range]:
    """The bytes of the SQLite b-tree page that holds ``records``: its header and cell pointer
    array, and its cells (the free space between them holds nothing)."""
    page_size = int.from_bytes(db[16:18], "big")
    start = db.index(records[0]) // page_size * page_size
    assert all(start <= db.index(r) < start + page_size for r in records)
    assert start > 0 and db[start] == 0x0D  # a table leaf page, not the file's first
    cells = int.from_bytes(db[start + 3 : start + 5], "big")
    content = int.from_bytes(db[start + 5 : start + 7], "big")
    return range(start, start + 8 + 2 * cells), range(start + content, start + page_size)


@pytest.mark.slow
def test_a_flipped_bit_in_the_sqlite_page_of_the_records_never_replays_a_wrong_value(
    tmp_path: Path,
) -> None:
    # The page that holds the records' rows: every flip there is refused or harmless. (A flip
    # in the key index, another page, can hide a row: the key then looks unrecorded and runs
    # again, a lost record, which no check inside the record can see.)
    original = DiskStore(tmp_path / "original")
    runs: list[str] = []
    recorded = {what: outcome() for what, outcome in _recorders(original, runs).items()}
    records = [stored_bytes(original, f"{what.replace(' ', '-')}:17") for what in RECORDED]
    original.close()
    db = (tmp_path / "original" / "cache.db").read_bytes()
    head, cells = _page_of(db, records)

    wrong = []
    refused = 0
    # One bit of every byte of the header, and of every third byte of the cells (a stride
    # prime to 8, so every bit position comes round; every byte takes half a minute).
    for at in [*head, *cells[::3]]:
        damaged = bytearray(db)
        damaged[at] ^= 1 << at % 8
        store = _opened(tmp_path / "trial", damaged)
        del runs[:]
        for what, outcome in _recorders(store, runs).items():
            got = outcome()
            refused += got is StoreError
            if got not in (recorded[what], StoreError) or runs:
                wrong.append((at, what, got, list(runs)))
                break
        store.close()
    assert not wrong, f"{len(wrong)} flips replayed another value or ran a body: {wrong[:8]}"
    assert refused > 100  # the flips inside the records, at least


def _opened(directory: Path, db: bytearray) -> DiskStore:
    """A fresh DiskStore in ``directory`` whose ``cache.db`` is ``db``."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    (directory / "cache.db").write_bytes(db)
    (directory / "cache.db").chmod(0o600)
    return DiskStore(directory)


def _btree_used(db: bytes, page: int) -> list[int]:
    """The offsets of the used bytes of b-tree page ``page`` (1-based): its header and cell
    pointer array, and its cells."""
    page_size = int.from_bytes(db[16:18], "big")
    start = (page - 1) * page_size
    header = start + (100 if page == 1 else 0)
    assert db[header] in (0x02, 0x05, 0x0A, 0x0D), (page, db[header])
    cells = int.from_bytes(db[header + 3 : header + 5], "big")
    content = int.from_bytes(db[header + 5 : header + 7], "big") or 65536
    size = 12 if db[header] in (0x02, 0x05) else 8
    return [*range(header, header + size + 2 * cells), *range(start + content, start + page_size)]


def _runner(store: Store, runs: list[int]) -> Callable[[], int]:
    @idempotent(key="17", name="pay", store=store)
    def pay() -> int:
        runs.append(1)
        return 0

    return pay


@pytest.mark.slow
def test_a_flipped_bit_in_the_schema_or_settings_of_the_database_is_a_store_error(
    tmp_path: Path,
) -> None:
    # The first page of cache.db holds its schema (which table and index lives where), another
    # page diskcache's Settings. A flip there raised diskcache's own UnicodeDecodeError, or
    # hid the Cache table, which diskcache then made again, empty, so that every key ran its
    # body again; or pointed the key index at another page, so that a key looked unrecorded
    # (issue 14, review). Each bit of both pages' used bytes: the recorded value or
    # StoreError, naming the store and the way out.
    original = DiskStore(tmp_path / "original")

    @idempotent(key="17", name="pay", store=original)
    def pay() -> int:
        return 125000

    pay()
    (settings,) = original._sql(
        "SELECT rootpage FROM sqlite_master WHERE name = 'Settings'"
    ).fetchone()
    original.close()
    db = (tmp_path / "original" / "cache.db").read_bytes()

    # Every bit of the pages' structure (headers, cell pointers, varints, root page numbers);
    # of their text (SQL, setting names) one bit per byte, a different one from byte to byte,
    # which is enough to show every kind of damage a text byte can take, in an eighth the time.
    trials = [
        (at, bit)
        for at in [*_btree_used(db, 1), *_btree_used(db, settings)]
        for bit in (range(8) if not 0x20 <= db[at] < 0x7F else (at % 8,))
    ]
    wrong: list[tuple[int, int, object]] = []
    trial = tmp_path / "trial"
    for at, bit in trials:
        damaged = bytearray(db)
        damaged[at] ^= 1 << bit
        store = _opened(trial, damaged)
        runs: list[int] = []
        try:
            got: object = _runner(store, runs)()
        except StoreError as exc:  # naming the store
            got = StoreError if str(trial) in str(exc) else str(exc)
        except Exception as exc:  # what the test looks for
            got = f"{type(exc).__name__}: {exc}"
        if got not in (125000, StoreError) or runs:
            wrong.append((at, bit, got))
        with contextlib.suppress(Exception):
            store.close()
    assert not wrong, f"{len(wrong)} flips: (byte, bit, outcome) {wrong[:6]}"


def test_what_two_flipped_bits_can_pass_off_as_an_old_record_is_junk_in_its_last_text() -> None:
    # The limit of reading records from before the checksum (README, Limits): the version
    # turned from 3 to 2 and the length of the traceback, the last text, grown by four
    # swallow the checksum when its last byte reads as None. All the rest is as recorded.
    passed = 0
    for n in range(2000):
        entry = Entry(
            "shop:17",
            "halted",
            "f" * 64,
            "o",
            "t",
            1,
            1.5,
            ttl=60.0,
            finished_at=2.5,
            expires_at=62.5,
            payload=pickle.dumps(ValueError("card declined")),
            reason="the call raised ValueError",
            exc_type="ValueError",
            message="card declined",
            traceback=f"Traceback {n}\nValueError: card declined\n",
        )
        data = encode(entry)
        text = entry.traceback.encode()  # type: ignore[union-attr]
        at = len(data) - 4 - 1 - len(text) - 1  # its one-byte length, before it and None
        assert data[at + 1 : at + 1 + len(text)] == text and data[-5] & 0x7F == ord("N")
        if data[at] & 4:
            continue
        damaged = bytearray(data)
        damaged[3] ^= 1  # version 3 -> 2
        damaged[at] |= 4  # four bytes longer
        try:
            got = decode(bytes(damaged))
        except ValueError:
            assert data[-1] & 0x7F != ord("N")  # refused unless the last byte reads as None
            continue
        passed += 1
        assert got._replace(traceback=entry.traceback) == entry
        assert got.traceback == entry.traceback + "N" + data[-4:-1].decode("latin-1")
    assert 0 < passed < 60  # about one in 128
