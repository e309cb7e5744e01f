"""Corrupt records: a clear ``StoreError`` naming the key, the other keys unharmed, and the
``idemfn`` command able to list, show and forget them.

Records are corrupted in each backend behind the store's back: garbage bytes, a truncated
record, and a record written by a future format version.
"""

from __future__ import annotations

import json
import marshal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from idemfn import DiskStore, RedisStore, Store, StoreError, idempotent
from idemfn._record import FORMAT_VERSION, encode

from .cli import cli_env, idemfn_cli
from .conftest import age, make_store, overwrite

BROKEN: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda good: b"\x00not a record\xff",
    "truncated": lambda good: good[: len(good) // 2],
    "future version": lambda good: marshal.dumps(
        (FORMAT_VERSION + 1, *marshal.loads(good)[1:]), 4
    ),
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
    assert b"'job:1'" in shown.stderr and b"forget --force job:1" in shown.stderr
    idemfn_cli("forget", "job:1", env=env, status=74)  # unread: only with --force
    idemfn_cli("forget", "--force", "job:1", env=env)
    assert [r["key"] for r in json.loads(idemfn_cli("ls", "--json", env=env).stdout)] == ["job:2"]
    idemfn_cli("prune", env=env)


@pytest.mark.parametrize(
    "data", [b"(\xff\xff\xff\x3f", b"[\xff\xff\xff\x3f", b"\xa8\xff\xff\xff\x3f\x00"]
)
def test_a_record_claiming_a_huge_size_fails_without_allocating_it(data: bytes) -> None:
    # Five bytes made marshal build a tuple of a billion slots (8 GB) before it found them
    # short: every read of such a record stalled. Under a 1 GB address-space limit it must be
    # a plain "not an idemfn record", never a MemoryError. (A huge size claimed by a field
    # inside the record still reaches marshal: the record checksum of issue 14 stops those.)
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
    assert done.stdout.startswith("refused not an idemfn record"), done.stdout
