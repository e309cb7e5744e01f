"""The store primitives, held to one behaviour on every store.

The conformance suite itself is ``idemfn.testing.StoreContract`` (shipped for third-party
stores too); here it runs on every store of conftest's ``store`` fixture, beside tests of what
only one store has.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from idemfn import DiskStore, Store, StoreError
from idemfn._record import Entry, decode, encode
from idemfn.testing import StoreContract
from tests.support.records import finished, processing
from tests.support.stores import WITH_CLUSTER


@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
class TestStoreContract(StoreContract):
    """Memory, disk, Redis (a server, and a Redis Cluster) and PostgreSQL: the ``store``
    fixture of conftest.py."""


# prune removes only the entry it looked at (fenced on its token)
@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_prune_leaves_a_record_claimed_again_since_it_looked(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = finished("k", "old")._replace(expires_at=time.time() - 60)  # what prune's scan saw
    assert store.claim(processing("k", "new")) is None  # then the key was claimed again
    monkeypatch.setattr(store, "scan", lambda prefix="", corrupt=None: iter([stale]))
    store.prune()
    entry = store.get("k")
    assert entry is not None and entry.token == "new"


def test_record_codec_round_trips_every_field() -> None:
    entry = Entry(
        "k",
        "halted",
        "f" * 64,
        "h/m/1/2",
        "tok",
        3,
        1.5,
        lease_until=None,
        ttl=None,
        finished_at=2.5,
        expires_at=None,
        payload=b"\x00\xff",
        reason="why",
        exc_type="E",
        message="msg",
        traceback="tb",
    )
    assert decode(encode(entry)) == entry
    record = entry.record()
    assert record.status.value == "halted" and record.attempt == 3
    assert record.lease_expires_at is None and record.expires_at is None


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", encode(finished("k"))[:-3], b"\xe9" + encode(finished("k"))[1:]],
    # Ids of their own: the records hold the time, and every xdist worker must collect one id.
    ids=["empty", "garbage", "truncated", "not-a-tuple"],
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

    from idemfn._stores.disk import _gate

    busy = DiskStore(tmp_path / "busy", timeout=600)
    free = DiskStore(tmp_path / "free")
    busy.get("k")
    free.claim(finished("k"))
    holder = sqlite3.connect(tmp_path / "busy" / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the busy store's write lock
    waiting = threading.Thread(target=lambda: busy.claim(processing("x")))
    results: list[object] = []

    def use_the_free_store() -> None:
        results.append(free.get("k") is not None)
        results.append(free.swap("k", "t1", finished("k")))

    user = threading.Thread(target=use_the_free_store)
    try:
        waiting.start()
        give_up = time.monotonic() + 60
        while waiting.ident not in _gate._busy:  # inside the store: waiting on SQLite
            assert time.monotonic() < give_up, "the claim never started"
            time.sleep(0.001)
        user.start()
        # The free store answers while the busy claim still waits (it would for 10 minutes):
        # a lock held across the wait would keep the user here until then.
        user.join(60)
        assert not user.is_alive(), "a busy store blocked another"
        assert waiting.is_alive()
        assert results == [True, False]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        waiting.join(60)
        user.join(60)


def test_claims_cull_expired_rows_as_they_go(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    for i in range(50):
        store.claim(finished(f"old{i}", expires_in=-60.0))  # expired a minute ago
    for i in range(130):  # at least two culls' worth of claims
        store.claim(processing(f"new{i}"))
    left = {row[0] for row in store.cache._sql("SELECT key FROM Cache")}
    assert not any(key.startswith("old") for key in left)
    assert len(left) == 130
    assert len(store.cache) == 130  # diskcache's own count stayed right


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("redis://nowhere.invalid:1/0", "redis", "idemfn[redis]"),
        ("postgresql://nowhere.invalid/db", "psycopg", "idemfn[postgres]"),
    ],
)
def test_a_url_whose_extra_is_missing_names_the_extra(
    url: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import idemfn

    monkeypatch.setitem(sys.modules, module, None)  # `import redis` now raises ImportError
    with pytest.raises(ValueError, match=re.escape(f"pip install '{extra}'")):
        idemfn.open_store(url)
    with pytest.raises(ValueError, match=re.escape(extra)):
        idemfn.idempotent(key="k", store=url)
