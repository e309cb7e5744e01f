"""What a store keeps beside the checksummed record (issue 14, review).

The record's CRC covers the record. Each store also keeps a few columns or fields beside it for
its own SQL or Lua to act on: when the record expires (DiskStore's ``expire_time``, Redis's
``x``, PostgreSQL's ``expires_at`` and ``drop_at``) and the token of a live claim, the fence
(DiskStore's ``tag``, Redis's ``t``, PostgreSQL's ``live``). A single flipped bit in one of
those must never remove or replace a live record (its body would run again) and never leave a
caller looping on a claim it can neither halt nor take over: at worst the record stays a
little longer, or a caller gets ``StoreError`` naming the key and the way out.
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from idemfn import DiskStore, RedisStore, Store, StoreError, idempotent
from idemfn._stores.postgres import PostgresStore
from idemfn.testing import _processing

# The conftest's store fixture, on the stores that keep columns beside the record.
beside_the_record = pytest.mark.parametrize("store", ["disk", "redis", "postgres"], indirect=True)


# The columns or fields beside the record: (expiry ones, the fence).
EXPIRY = {DiskStore: ["expire_time"], RedisStore: ["x"], PostgresStore: ["expires_at", "drop_at"]}
FENCE = {DiskStore: "tag", RedisStore: "t", PostgresStore: "live"}


def _read(store: Store, key: str, column: str) -> Any:
    if isinstance(store, DiskStore):
        with contextlib.closing(sqlite3.connect(store.directory / "cache.db")) as db:
            (value,) = db.execute(f"SELECT {column} FROM Cache WHERE key = ?", (key,)).fetchone()
        return value
    if isinstance(store, RedisStore):
        field = store.client.hget(store.prefix + key, column)
        assert isinstance(field, bytes)
        return float(field) if column == "x" else field.decode()
    assert isinstance(store, PostgresStore)
    query = f'SELECT {column} FROM "{store.table}" WHERE key = %s'
    return store._run("read", key, query, (key,))[0][0]


def _write(store: Store, key: str, column: str, value: Any) -> None:
    if isinstance(store, DiskStore):
        with contextlib.closing(sqlite3.connect(store.directory / "cache.db")) as db, db:
            query = f"UPDATE Cache SET {column} = ? WHERE key = ?"
            assert db.execute(query, (value, key)).rowcount == 1
    elif isinstance(store, RedisStore):
        assert store.client.exists(store.prefix + key)
        text = repr(int(value)) if column == "x" else value
        store.client.hset(store.prefix + key, column, text)
    else:
        assert isinstance(store, PostgresStore)
        query = f'UPDATE "{store.table}" SET {column} = %s WHERE key = %s'
        store._run("overwrite", key, query, (value, key))


def _float_flips(value: float) -> Iterator[float]:
    """``value`` with each of its 64 bits flipped in turn."""
    bits = int.from_bytes(struct.pack(">d", value), "big")
    for bit in range(64):
        yield struct.unpack(">d", (bits ^ 1 << bit).to_bytes(8, "big"))[0]


def _text_flips(value: str) -> Iterator[str]:
    """``value`` with each of the low seven bits of each character flipped in turn (a text
    column holds no NUL, and these stay one-byte characters)."""
    for at, char in enumerate(value):
        for bit in range(7):
            other = chr(ord(char) ^ 1 << bit)
            if other != "\0":
                yield value[:at] + other + value[at + 1 :]


@beside_the_record
def test_a_flipped_expiry_beside_the_record_never_removes_or_replaces_it(store: Store) -> None:
    runs: list[int] = []

    @idempotent(key="17", name="pay", store=store, ttl=3600)
    def pay() -> int:
        runs.append(1)
        return 125000

    assert pay() == 125000
    key = "pay:17"
    ran_again: list[tuple[str, float]] = []
    for column in EXPIRY[type(store)]:
        good = _read(store, key, column)
        flips = (
            [float(int(v)) for v in _float_flips(good) if 0 <= v < 2**53]
            if isinstance(store, RedisStore)  # whole milliseconds, written as digits
            else list(_float_flips(good))
        )
        for flipped in flips:
            _write(store, key, column, flipped)
            # Everything that acts on the column: a prune, a claim racing a caller that found
            # no record (the claim itself, not a read first), and the replay.
            store.prune()
            racing = _processing(store, key, "racing")
            found = store.claim(racing)
            if found is None or pay() != 125000 or runs != [1]:
                ran_again.append((column, flipped))
                if found is None:
                    store.delete(key)
                pay.forget()
                del runs[:]
                assert pay() == 125000
            else:
                _write(store, key, column, good)
    assert not ran_again, f"{len(ran_again)} flips removed or replaced the record: {ran_again}"


def _looping(store: Store, limit: int) -> Callable[[], None]:
    """Make ``store.get`` raise after ``limit`` calls: a caller that loops on a claim it can
    neither halt nor take over fails instead of spinning forever."""
    real = store.get
    calls = [0]

    def get(key: str) -> Any:
        calls[0] += 1
        if calls[0] > limit:
            raise AssertionError(f"looped: {calls[0]} reads of {key!r}")
        return real(key)

    store.get = get  # type: ignore[method-assign]
    return lambda: calls.__setitem__(0, 0)


@beside_the_record
@pytest.mark.parametrize("on_abandoned", ["halt", "retry"])
def test_a_flipped_fence_beside_a_claim_is_a_store_error_not_a_loop(
    store: Store, on_abandoned: Literal["halt", "retry"]
) -> None:
    runs: list[int] = []

    @idempotent(key="17", name="pay", store=store, on_abandoned=on_abandoned)
    def pay() -> int:
        runs.append(1)
        return 125000

    key = "pay:17"
    token = "3f6a0c9e2b7d41d8"
    # A remote owner's claim, its lease run out a minute ago (kept an hour after that).
    abandoned = _processing(store, key, token, lease=-60)._replace(ttl=3600.0)
    reset = _looping(store, 50)
    column = FENCE[type(store)]
    looped = []
    for flipped in _text_flips(token):
        assert store.claim(abandoned) is None
        _write(store, key, column, flipped)
        reset()
        try:
            pay()
        except StoreError as exc:  # naming the key, and the way out
            if exc.key != key or "forget --force" not in str(exc):
                looped.append((flipped, str(exc)))
        except AssertionError as exc:
            looped.append((flipped, str(exc)))
        else:
            looped.append((flipped, "ran"))
        assert runs == []
        store.delete(key)
    assert not looped, f"{len(looped)} of the fence's flips: {looped[:3]}"


def _payer(store: Store, runs: list[int]) -> Callable[[], int]:
    @idempotent(key="17", name="pay", store=store, ttl=3600)
    def pay() -> int:
        runs.append(17)
        return 125000

    return pay


def test_a_flipped_bit_in_either_copy_of_a_rows_expiry_in_the_file_never_removes_it(
    tmp_path: Path,
) -> None:
    # DiskStore keeps expire_time twice in the file: in the row, and in the index that the cull
    # and prune walk. Each bit of each copy, flipped in the database file itself.
    original = DiskStore(tmp_path / "original")

    @idempotent(key="17", name="pay", store=original, ttl=3600)
    def pay() -> int:
        return 125000

    pay()
    (expire_time,) = original._sql("SELECT expire_time FROM Cache WHERE key = 'pay:17'").fetchone()
    original.close()
    db = (tmp_path / "original" / "cache.db").read_bytes()
    page_size = int.from_bytes(db[16:18], "big")
    packed = struct.pack(">d", expire_time)
    places = [at for at in range(len(db)) if db.startswith(packed, at)]
    kinds = sorted(db[at // page_size * page_size] for at in places)
    assert kinds == [0x0A, 0x0D], kinds  # one in an index leaf page, one in a table leaf page

    removed = []
    for at in places:
        for bit in range(64):
            damaged = bytearray(db)
            damaged[at + bit // 8] ^= 0x80 >> bit % 8
            trial = tmp_path / f"trial-{at}-{bit}"
            trial.mkdir(mode=0o700)
            (trial / "cache.db").write_bytes(damaged)
            (trial / "cache.db").chmod(0o600)
            store = DiskStore(trial)
            runs: list[int] = []
            again = _payer(store, runs)
            store.prune()
            store._cull(time.time())
            assert store.claim(_processing(store, "pay:17", "racing")) is not None
            if again() != 125000 or runs:
                removed.append((at, bit))
            store.close()
    assert not removed, f"{len(removed)} flips removed the record: {removed}"
