"""Signed records: with a signing key, a record that fails its HMAC check is never unpickled.

Records are forged in each backend behind the store's back, the way someone who can write the
store (but has no key) would: a record with a payload that runs code when unpickled, a record
signed with another key, one flipped byte, and a good record copied to another key.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idemfn import DiskStore, MemoryStore, Store, StoreError, idempotent, open_store
from idemfn._record import Entry, encode
from idemfn._signing import MAGIC, Signer
from idemfn._stores.base import TamperedRecord
from tests.support.cli import cli_env, idemfn_cli
from tests.support.stores import make_store, overwrite, stored_bytes

KEY = "k" * 32
NEW_KEY = "n" * 32
OTHER_KEY = b"o" * 32


class Payload:
    """Creates a file when unpickled: proof that a forged record was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(params=["disk", "redis", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def signed(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store = make_store(kind, tmp_path, request, signing_key=KEY)
    yield store
    store.close()


def same_place(store: Store, **options: Any) -> Store:
    """Another store on ``store``'s records, made with ``options``."""
    if isinstance(store, DiskStore):
        return DiskStore(store.directory, **options)
    from idemfn import PostgresStore, RedisStore

    if isinstance(store, RedisStore):
        return RedisStore(store.client, prefix=store.prefix, **options)
    assert isinstance(store, PostgresStore)
    return PostgresStore(store._dsn or "", table=store.table, **options)


def charger(store: Store, runs: list[str]) -> Any:
    @idempotent(key="{order}", name="shop", store=store)
    def charge(order: str) -> str:
        runs.append(order)
        return f"charged {order}"

    return charge


def test_signed_records_replay_and_carry_their_signature(signed: Store) -> None:
    runs: list[str] = []
    charge = charger(signed, runs)
    assert charge("a") == charge("a") == "charged a" and runs == ["a"]
    data = stored_bytes(signed, "shop:a")
    assert data.startswith(MAGIC)
    assert Signer((KEY.encode(),)).verify(data) == encode(signed.get("shop:a"))  # type: ignore[arg-type]
    # A store without keys checks nothing, and reads signed records as they are.
    unkeyed = same_place(signed)
    assert charger(unkeyed, runs)("a") == "charged a" and runs == ["a"]


def forged(key: str, marker: Path) -> bytes:
    """An unsigned ``ok`` record whose payload runs code when it is unpickled."""
    payload = pickle.dumps(Payload(marker))
    return encode(Entry(key, "ok", "", "attacker", "t", 1, 0.0, finished_at=1.0, payload=payload))


def test_a_forged_record_is_never_unpickled(signed: Store, tmp_path: Path) -> None:
    runs: list[str] = []
    charge = charger(signed, runs)
    charge("a"), charge("b")
    marker = tmp_path / "pwned"
    for data in (
        forged("shop:a", marker),  # unsigned
        Signer((OTHER_KEY,)).sign(forged("shop:a", marker)),  # signed with another key
        MAGIC + b"\x00" * 32 + forged("shop:a", marker),  # a made-up signature
    ):
        overwrite(signed, "shop:a", data)
        with pytest.raises(TamperedRecord, match=r"record for 'shop:a' failed its signature"):
            charge("a")
        with pytest.raises(StoreError, match="'shop:a'") as caught:
            signed.get("shop:a")
        assert caught.value.key == "shop:a"
    assert not marker.exists() and runs == ["a", "b"]
    assert charge("b") == "charged b"  # other keys are unharmed
    # The same forged record in a store without keys is loaded: that is what signing prevents.
    charger(same_place(signed), runs)("a")
    assert marker.exists()


def test_one_flipped_byte_or_a_copied_record_fails_the_check(signed: Store) -> None:
    runs: list[str] = []
    charge = charger(signed, runs)
    charge("a"), charge("b")
    good = stored_bytes(signed, "shop:a")
    for at in (0, 1, 5, len(MAGIC) + 40, len(good) - 1):  # magic, mac, record, payload
        flipped = bytearray(good)
        flipped[at] ^= 0x01
        overwrite(signed, "shop:a", bytes(flipped))
        with pytest.raises(StoreError, match="'shop:a'"):
            charge("a")
    # A good record of another key: it verifies, but it is not this key's.
    overwrite(signed, "shop:a", stored_bytes(signed, "shop:b"))
    with pytest.raises(TamperedRecord, match="copy of 'shop:b'"):
        charge("a")
    assert runs == ["a", "b"]
    # Without keys a copied record is still refused: it is not this key's record.
    with pytest.raises(StoreError, match="corrupt: it is 'shop:b'"):
        same_place(signed).get("shop:a")


def test_a_signed_record_is_bound_to_its_key_and_signing_key_not_to_its_store(
    signed: Store, kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Decided in issue 14: a directory moved or restored from a backup, a Redis prefix or a
    # table renamed, must keep replaying its records, so a record does not name its store.
    # Stores that must not accept each other's records get a signing key each.
    runs: list[str] = []
    charger(signed, runs)("a")
    record = stored_bytes(signed, "shop:a")
    elsewhere = {
        "same key": make_store(kind, tmp_path / "moved", request, signing_key=KEY),
        "own key": make_store(kind, tmp_path / "apart", request, signing_key=OTHER_KEY),
    }
    for store in elsewhere.values():  # the copy goes where a record of the key already is
        now = store.time()
        store.claim(
            Entry(
                "shop:a",
                "processing",
                "",
                "elsewhere/0.0/1/1",
                "t",
                1,
                now,
                lease_until=now + 60,
                ttl=60.0,
            )
        )
        overwrite(store, "shop:a", record)
    assert charger(elsewhere["same key"], runs)("a") == "charged a"  # replayed, not run
    with pytest.raises(TamperedRecord, match="'shop:a' failed its signature check"):
        charger(elsewhere["own key"], runs)("a")
    assert runs == ["a"]
    for store in elsewhere.values():
        store.close()


def test_keys_rotate_the_first_signs_and_every_key_verifies(signed: Store, tmp_path: Path) -> None:
    runs: list[str] = []
    charger(signed, runs)("old")
    rotated = same_place(signed, signing_key=[NEW_KEY, KEY])
    charge = charger(rotated, runs)
    assert charge("old") == "charged old"  # signed by the old key: still verifies
    charge("new")
    assert runs == ["old", "new"]
    only_new = same_place(signed, signing_key=NEW_KEY.encode())
    assert only_new.get("shop:new") is not None  # signed by the new key
    with pytest.raises(TamperedRecord, match="'shop:old'"):
        only_new.get("shop:old")  # the old key is gone: its records are refused
    with pytest.raises(TamperedRecord, match="'shop:new'"):
        signed.get("shop:new")  # and a store with only the old key refuses the new one
    with pytest.raises(TamperedRecord, match="any of the 2 keys"):
        same_place(signed, signing_key=[NEW_KEY, "x" * 16]).get("shop:old")


def test_the_signing_key_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDEMFN_SIGNING_KEY", f" {NEW_KEY} ,{KEY}")
    store = DiskStore(tmp_path / "s")
    assert store.signer == Signer((NEW_KEY.encode(), KEY.encode()))
    assert DiskStore(tmp_path / "s", signing_key=KEY).signer == Signer((KEY.encode(),))
    monkeypatch.setenv("IDEMFN_SIGNING_KEY", "   ")
    assert DiskStore(tmp_path / "s").signer is None
    monkeypatch.setenv("IDEMFN_SIGNING_KEY", f"{KEY},")
    with pytest.raises(ValueError, match=r"IDEMFN_SIGNING_KEY has an empty entry \(a stray comma"):
        DiskStore(tmp_path / "s")
    assert KEY not in repr(Signer((KEY.encode(),)))


@pytest.mark.parametrize(
    ("signing_key", "error", "message"),
    [
        ("short", ValueError, r"DiskStore\(signing_key=...\) is 5 bytes long; .* at least 16"),
        ([], ValueError, r"DiskStore\(signing_key=...\) must name at least one key"),
        ([KEY, 42], TypeError, r"signing_key=...\): key 2 must be a str or bytes, not int"),
        ([KEY, b"tiny"], ValueError, r"key 2 is 4 bytes long"),
        (42, TypeError, r"signing_key=...\) must be a str, bytes, or a list of them"),
    ],
)
def test_bad_signing_keys_are_refused_naming_the_option(
    tmp_path: Path, signing_key: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        DiskStore(tmp_path, signing_key=signing_key)
    with pytest.raises(error):
        idempotent(store=tmp_path / "s", signing_key=signing_key)


def test_the_decorator_signs_the_store_it_opens(tmp_path: Path) -> None:
    runs: list[str] = []

    @idempotent(key="{x}", store=tmp_path / "s", signing_key=KEY)
    def signed(x: int) -> int:
        runs.append("signed")
        return x

    @idempotent(key="{x}", store=tmp_path / "s")
    def plain(x: int) -> int:
        return x

    assert signed.store.signer is not None and plain.store.signer is None
    assert signed.store is open_store(tmp_path / "s", signing_key=[KEY])  # one per key set
    signed(1)
    plain(2)
    with pytest.raises(TamperedRecord):
        signed.store.get(plain.key_for(2))
    # A store already made keeps its own keys: the decorator cannot change them.
    keyed = DiskStore(tmp_path / "s", signing_key=KEY)
    idempotent(store=keyed, signing_key=KEY)  # the same keys: fine
    with pytest.raises(ValueError, match="give signing_key= to the store itself"):
        idempotent(store=keyed, signing_key=NEW_KEY)
    with pytest.raises(ValueError, match="nothing to sign, drop signing_key="):
        idempotent(store=MemoryStore(), signing_key=KEY)
    with pytest.raises(ValueError, match="memory:// store keeps records in this process"):
        idempotent(store="memory://", signing_key=KEY)


def test_the_command_lists_tampered_records_and_reads_keys_from_a_file(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", signing_key=KEY)
    charge = charger(store, [])
    charge("a"), charge("b")
    overwrite(store, "shop:a", forged("shop:a", tmp_path / "pwned"))
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated 2026-11\n{NEW_KEY}\n\n{KEY}\n")
    env = cli_env(tmp_path / "store")
    with_keys = ["--signing-key-file", str(keys)]

    listing = json.loads(idemfn_cli("ls", "--json", *with_keys, env=env).stdout)
    assert {r["key"]: r["status"] for r in listing} == {"shop:a": "tampered", "shop:b": "ok"}
    assert "failed its signature check" in listing[1]["error"]
    ls_tampered = idemfn_cli("ls", "--status", "tampered", "--json", *with_keys, env=env)
    only = json.loads(ls_tampered.stdout)
    assert [r["key"] for r in only] == ["shop:a"]
    assert (
        json.loads(idemfn_cli("ls", "--status", "corrupt", "--json", *with_keys, env=env).stdout)
        == []
    )
    stats = json.loads(idemfn_cli("stats", "--json", *with_keys, env=env).stdout)
    assert stats["by_state"]["tampered"] == 1 and stats["by_state"]["corrupt"] == 0
    table = idemfn_cli("ls", env=cli_env(tmp_path / "store", IDEMFN_SIGNING_KEY=KEY))
    rows = [row.split() for row in table.stdout.decode().splitlines()]
    assert ["shop:a", "tampered", "-", "-", "-"] in rows
    shown = idemfn_cli("show", "shop:a", *with_keys, env=env, status=74)
    assert b"failed its signature check" in shown.stderr
    assert not (tmp_path / "pwned").exists()

    idemfn_cli("forget", "--force", "shop:a", *with_keys, env=env)
    listing = json.loads(idemfn_cli("ls", "--json", *with_keys, env=env).stdout)
    assert [r["key"] for r in listing] == ["shop:b"]

    (tmp_path / "empty").write_text("# no keys yet\n")
    for path, message in ((tmp_path / "nope", b"cannot read"), (tmp_path / "empty", b"no key")):
        done = idemfn_cli("ls", "--signing-key-file", str(path), env=env, status=64)
        assert b"--signing-key-file" in done.stderr and message in done.stderr
    short = tmp_path / "short"
    short.write_text("short\n")
    done = idemfn_cli("ls", "--signing-key-file", str(short), env=env, status=64)
    assert b"--signing-key-file " + str(short).encode() + b" is 5 bytes long" in done.stderr


def test_a_signed_store_in_another_process_replays(tmp_path: Path) -> None:
    """The key set is the same in every process: records written here replay in a child."""
    store = DiskStore(tmp_path / "s", signing_key=KEY)
    charger(store, [])("a")
    code = (
        "import sys; from idemfn import DiskStore, idempotent\n"
        f"store = DiskStore({str(tmp_path / 's')!r})\n"
        "@idempotent(key='{order}', name='shop', store=store)\n"
        "def charge(order): sys.exit('ran again')\n"
        "print(charge('a'))\n"
    )
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "IDEMFN_SIGNING_KEY": KEY},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "charged a"


def test_prune_never_deletes_a_file_a_forged_row_names(tmp_path: Path) -> None:
    """diskcache's own expire() removes the file a row's ``filename`` column names, which no
    signature covers: prune must never call it."""
    import sqlite3
    import time

    store = DiskStore(tmp_path / "store", signing_key=KEY)
    charger(store, [])("a")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    expired = time.time() - 10  # in both copies of the row's expiry (see disk._PASSED)
    with sqlite3.connect(store.directory / "cache.db") as db:
        db.execute(
            "UPDATE Cache SET expire_time = ?, access_time = ?, filename = ? WHERE key = 'shop:a'",
            (expired, expired + 1, str(victim)),
        )
    assert store.prune() == 1  # the expired row goes, the file it names stays
    assert victim.read_text() == "precious"


def test_a_key_read_from_a_file_with_its_newline_is_the_same_key(tmp_path: Path) -> None:
    assert DiskStore(tmp_path, signing_key=f"  {KEY}\n").signer == Signer((KEY.encode(),))
