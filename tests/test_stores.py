"""The store primitives (contract section 6), held to one behaviour on every store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from idemfn import DiskStore, Store, StoreError
from idemfn._record import Entry, decode, encode


def processing(key: str, token: str = "t1", **fields: object) -> Entry:
    return Entry(
        key, "processing", "fp", "me/m/1/1", token, 1, time.time(),
        lease_until=time.time() + 30, ttl=60.0, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


def finished(key: str, token: str = "t1", *, expires_in: float | None = 60.0) -> Entry:
    now = time.time()
    return Entry(
        key, "ok", "fp", "me/m/1/1", token, 1, now - 1, ttl=expires_in, finished_at=now,
        expires_at=None if expires_in is None else now + expires_in, payload=b"v",
    )  # fmt: skip


def test_claim_inserts_once_and_returns_the_live_entry(store: Store) -> None:
    first = processing("k", "a")
    assert store.claim(first) is None
    found = store.claim(processing("k", "b"))
    assert found == first
    assert store.get("k") == first


def test_claim_replaces_an_expired_entry(store: Store) -> None:
    store.claim(finished("k", "old", expires_in=0.05))
    time.sleep(0.1)
    assert store.get("k") is None
    assert store.claim(processing("k", "new")) is None
    entry = store.get("k")
    assert entry is not None and entry.token == "new"


def test_claim_race_between_threads_has_one_winner(store: Store) -> None:
    barrier = threading.Barrier(16)
    wins: list[str] = []

    def racer(i: int) -> None:
        barrier.wait()
        if store.claim(processing("race", f"t{i}")) is None:
            wins.append(f"t{i}")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    entry = store.get("race")
    assert entry is not None and entry.token == wins[0]


def test_swap_is_fenced_on_the_token(store: Store) -> None:
    store.claim(processing("k", "a"))
    assert store.swap("k", "wrong", finished("k", "x")) is False
    entry = store.get("k")
    assert entry is not None and entry.status == "processing"
    assert store.swap("k", "a", finished("k", "a")) is True
    entry = store.get("k")
    assert entry is not None and entry.status == "ok"


def test_swap_never_replaces_a_finished_entry(store: Store) -> None:
    store.claim(finished("k", "a"))
    assert store.swap("k", "a", processing("k", "a")) is False
    entry = store.get("k")
    assert entry is not None and entry.status == "ok"


def test_swap_on_a_missing_key_writes_nothing(store: Store) -> None:
    assert store.swap("ghost", "a", finished("ghost", "a")) is False
    assert store.get("ghost") is None


def test_delete_with_and_without_token(store: Store) -> None:
    store.claim(processing("k", "a"))
    assert store.delete("k", "b") is False
    assert store.get("k") is not None
    assert store.delete("k", "a") is True
    assert store.delete("k") is False
    store.claim(processing("k", "c"))
    assert store.delete("k") is True
    assert store.get("k") is None


def test_scan_by_prefix(store: Store) -> None:
    for key in ("app.a:1", "app.a:2", "app.b:1"):
        store.claim(finished(key))
    assert sorted(e.key for e in store.scan("app.a:")) == ["app.a:1", "app.a:2"]
    assert len(list(store.scan())) == 3


def test_time_is_unix_seconds(store: Store) -> None:
    assert abs(store.time() - time.time()) < 5


def test_record_codec_round_trips_every_field() -> None:
    entry = Entry(
        "k", "halted", "f" * 64, "h/m/1/2", "tok", 3, 1.5, lease_until=None, ttl=None,
        finished_at=2.5, expires_at=None, payload=b"\x00\xff", reason="why", exc_type="E",
        message="msg", traceback="tb",
    )  # fmt: skip
    assert decode(encode(entry)) == entry
    record = entry.record()
    assert record.status.value == "halted" and record.attempt == 3
    assert record.lease_expires_at is None and record.expires_at is None


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", encode(finished("k"))[:-3], b"\xe9" + encode(finished("k"))[1:]],
)
def test_codec_refuses_bytes_that_are_not_a_record(data: bytes) -> None:
    with pytest.raises(ValueError, match="record"):
        decode(data)


def test_codec_refuses_another_format_version() -> None:
    import marshal

    fields = list(marshal.loads(encode(finished("k"))))
    fields[0] = 99
    with pytest.raises(ValueError, match="version 99"):
        decode(marshal.dumps(tuple(fields)))


def test_corrupt_disk_record_is_a_store_error_that_names_the_key(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    store.claim(finished("good"))
    store.cache.set("bad", b"\x00garbage")
    store.cache.set("alien", {"not": "bytes"})
    for key in ("bad", "alien"):
        with pytest.raises(StoreError, match=f"'{key}'") as info:
            store.get(key)
        assert info.value.key == key
    assert store.get("good") is not None  # other keys keep working
    assert store.delete("bad") is True  # and a corrupt record can be removed


def test_disk_store_reopens_after_close(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    store.claim(finished("k"))
    store.close()
    assert store.get("k") is not None
    with store as s:
        assert s is store


def test_release_is_fenced_on_a_live_claim(store: Store) -> None:
    store.claim(processing("k", "a"))
    assert store.release("k", "b") is False
    assert store.release("k", "a") is True
    assert store.get("k") is None
    # A finished (e.g. halted-as-abandoned) record keeps its claim's token: a late owner's
    # release must not remove it.
    store.claim(finished("done", "a"))
    assert store.release("done", "a") is False
    assert store.get("done") is not None
    assert store.release("ghost", "a") is False


# -- found in review (2026-11-22) ---------------------------------------------------------------


def test_disk_store_paths_are_expanded_and_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DiskStore("~/records").directory == tmp_path / "home" / "records"
    monkeypatch.chdir(tmp_path)
    store = DiskStore("relative")
    monkeypatch.chdir("/")
    store.get("k")  # opened after the working directory changed: still the same place
    assert (tmp_path / "relative" / "cache.db").exists()


def test_disk_store_files_are_private(tmp_path: Path) -> None:
    import os
    import stat

    store = DiskStore(tmp_path / "s")
    store.claim(finished("k"))
    for name in os.listdir(tmp_path / "s"):
        if name.startswith("cache.db"):
            mode = stat.S_IMODE((tmp_path / "s" / name).stat().st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))


def test_a_busy_store_does_not_block_another(tmp_path: Path) -> None:
    import sqlite3

    busy = DiskStore(tmp_path / "busy", timeout=5)
    free = DiskStore(tmp_path / "free")
    busy.get("k")
    free.claim(finished("k"))
    holder = sqlite3.connect(tmp_path / "busy" / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the busy store's write lock
    waiting = threading.Thread(target=lambda: busy.claim(processing("x")))
    try:
        waiting.start()
        time.sleep(0.2)  # the claim is now waiting on SQLite
        t0 = time.monotonic()
        assert free.get("k") is not None
        assert free.swap("k", "t1", finished("k")) is False
        assert time.monotonic() - t0 < 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        waiting.join(10)


def test_claims_cull_expired_rows_as_they_go(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    for i in range(50):
        store.claim(finished(f"old{i}", expires_in=0.01))
    time.sleep(0.05)
    for i in range(130):  # at least two culls' worth of claims
        store.claim(processing(f"new{i}"))
    left = {row[0] for row in store.cache._sql("SELECT key FROM Cache")}
    assert not any(key.startswith("old") for key in left)
    assert len(left) == 130
    assert len(store.cache) == 130  # diskcache's own count stayed right
