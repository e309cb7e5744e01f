"""The wrapper keeps the function's shape; stores are chosen as the contract says."""

from __future__ import annotations

import asyncio
import inspect
import os
import stat
from pathlib import Path
from typing import Any, ClassVar

import pytest

import idemfn
from idemfn import DiskStore, MemoryStore, Store, idempotent, open_store


def test_wrapper_keeps_metadata_and_signature() -> None:
    def charge(order_id: str, amount: int = 0) -> str:
        """Charge an order."""
        return order_id

    wrapped = idempotent(store=MemoryStore())(charge)
    assert wrapped.__name__ == "charge"
    assert wrapped.__doc__ == "Charge an order."
    assert wrapped.__wrapped__ is charge  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(charge)


def test_async_wrapper_is_a_coroutine_function() -> None:
    @idempotent(store=MemoryStore())
    async def fetch(x: int) -> int:
        return x

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch(2)) == 2


def test_wrapper_attributes() -> None:
    store = MemoryStore()

    @idempotent(key="k:{x}", store=store)
    def fn(x: int) -> int:
        return x

    assert fn.store is store
    assert fn.status(1) is None
    fn(1)
    record = fn.status(1)
    assert record is not None and record.key == fn.key_for(1)
    assert fn.forget(1) is True and fn.status(1) is None


@pytest.mark.parametrize("order", ["outside", "inside"])
def test_classmethod_and_staticmethod_either_order(order: str) -> None:
    store = MemoryStore()
    runs: list[str] = []

    if order == "outside":

        class Billing:
            @idempotent(key="c:{x}", store=store)
            @classmethod
            def by_class(cls, x: int) -> str:
                runs.append(f"c{x}")
                return f"{cls.__name__}{x}"

            @idempotent(key="s:{x}", store=store)
            @staticmethod
            def by_static(x: int) -> str:
                runs.append(f"s{x}")
                return f"s{x}"

    else:

        class Billing:  # type: ignore[no-redef]
            @classmethod
            @idempotent(key="c:{x}", store=store)
            def by_class(cls, x: int) -> str:
                runs.append(f"c{x}")
                return f"{cls.__name__}{x}"

            @staticmethod
            @idempotent(key="s:{x}", store=store)
            def by_static(x: int) -> str:
                runs.append(f"s{x}")
                return f"s{x}"

    for _ in range(2):
        assert Billing.by_class(1) == "Billing1"
        assert Billing().by_class(1) == "Billing1"
        assert Billing.by_static(2) == "s2"
        assert Billing().by_static(2) == "s2"
    assert runs == ["c1", "s2"]


def test_bound_method_of_another_instance_replays() -> None:
    store = MemoryStore()

    class Mailer:
        sent: ClassVar[list[str]] = []

        @idempotent(key="welcome:{user}", store=store)
        def welcome(self, user: str) -> str:
            Mailer.sent.append(user)
            return f"sent to {user}"

    assert Mailer().welcome("ada") == Mailer().welcome("ada") == "sent to ada"
    assert Mailer.sent == ["ada"]


# -- stores -----------------------------------------------------------------------------------


def test_default_store_follows_idemfn_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDEMFN_STORE", str(tmp_path / "from-env"))

    @idempotent(key="k")
    def fn() -> int:
        return 1

    assert isinstance(fn.store, DiskStore)
    assert fn.store.directory == (tmp_path / "from-env").resolve()
    fn()
    assert (tmp_path / "from-env").is_dir()


def test_default_store_without_env_is_in_the_state_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IDEMFN_STORE")
    store = idemfn.default_store()
    assert isinstance(store, DiskStore)
    assert store.directory == idemfn.default_directory().resolve()
    assert "state" in str(idemfn.default_directory()).lower()
    assert "cache" not in str(idemfn.default_directory()).lower()


def test_idemfn_store_with_a_bad_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMFN_STORE", "mysql://somewhere/db")
    with pytest.raises(ValueError, match=r"IDEMFN_STORE='mysql://somewhere/db'.*unknown"):
        idempotent(key="k")
    monkeypatch.setenv("IDEMFN_STORE", "gopher://somewhere")
    with pytest.raises(ValueError, match=r"IDEMFN_STORE='gopher://somewhere'.*redis://"):
        idempotent(key="k")


def test_open_store_shares_one_store_per_directory(tmp_path: Path) -> None:
    a = open_store(tmp_path / "s")
    b = open_store(str(tmp_path / "s"))
    c = open_store(f"file://{tmp_path / 's'}")
    assert a is b is c
    assert isinstance(a, DiskStore)
    assert open_store("memory://") is open_store("memory://")
    assert isinstance(open_store("memory://"), MemoryStore)
    mine = MemoryStore()
    assert open_store(mine) is mine


def test_disk_store_directory_is_private_and_never_evicts(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = DiskStore(tmp_path / "deep" / "store")
        assert not (tmp_path / "deep").exists()  # nothing touches the disk before first use
        store.get("k")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "deep" / "store").stat().st_mode)
    assert mode == 0o700
    assert store.cache.eviction_policy == "none"


def test_disk_store_is_shared_by_separate_instances(tmp_path: Path) -> None:
    runs = []

    def body(x: int) -> int:
        runs.append(x)
        return x

    first = idempotent(key="k:{x}", store=DiskStore(tmp_path / "s"), name="n")(body)
    second = idempotent(key="k:{x}", store=DiskStore(tmp_path / "s"), name="n")(body)
    assert first(1) == second(1) == 1
    assert runs == [1]


def test_disk_store_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="DiskStore"):
        DiskStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        DiskStore(tmp_path, timeout=0)


def test_disk_store_that_cannot_be_created_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = DiskStore(blocker / "store")
    with pytest.raises(idemfn.StoreError, match=r"DiskStore\(.*could not create the directory"):
        store.get("k")


def test_reprs_are_helpful(tmp_path: Path) -> None:
    assert repr(DiskStore(tmp_path)) == f"DiskStore({str(tmp_path)!r})"
    assert "MemoryStore" in repr(MemoryStore())
    assert repr(idemfn.Status.OK) == "Status.OK"
    assert idemfn.Halted.__module__ == "idemfn"
    claim = idemfn.begin("k", store=MemoryStore())
    assert isinstance(claim, idemfn.Claim)
    assert "'k'" in repr(claim) and "live" in repr(claim)
    claim.complete(1)
    assert "settled" in repr(claim)


def _stores(tmp_path: Path) -> list[Store]:
    return [MemoryStore(), DiskStore(tmp_path / "d")]


def test_low_level_api(tmp_path: Path) -> None:
    for store in _stores(tmp_path):
        outcome = idemfn.begin("emails:1", store=store, fingerprint="abc")
        assert isinstance(outcome, idemfn.Claim)
        with outcome:
            outcome.complete({"sent": True})
        again = idemfn.begin("emails:1", store=store, fingerprint="abc")
        assert isinstance(again, idemfn.Finished)
        assert again.replay() == {"sent": True}
        assert again.record.status is idemfn.Status.OK
        with pytest.raises(idemfn.FingerprintMismatch):
            idemfn.begin("emails:1", store=store, fingerprint="other")


def test_low_level_claim_block_that_raises_halts(tmp_path: Path) -> None:
    store = MemoryStore()
    claim = idemfn.begin("k", store=store)
    assert isinstance(claim, idemfn.Claim)
    with pytest.raises(ZeroDivisionError), claim:
        1 / 0  # noqa: B018
    finished = idemfn.begin("k", store=store)
    assert isinstance(finished, idemfn.Finished)
    with pytest.raises(ZeroDivisionError):
        finished.replay()


def test_low_level_claim_block_without_complete_halts(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    claim = idemfn.begin("k", store=store)
    assert isinstance(claim, idemfn.Claim)
    with claim:
        pass
    assert "without complete()" in caplog.text
    finished = idemfn.begin("k", store=store)
    assert isinstance(finished, idemfn.Finished)
    assert finished.record.status is idemfn.Status.HALTED
    with pytest.raises(RuntimeError, match="already settled"):
        claim.complete(1)


def test_low_level_abegin_and_policy(tmp_path: Path) -> None:
    store = MemoryStore()
    policy = idemfn.Policy(ttl=60, lease=5, wait=0, on_abandoned="retry", retry_on=KeyError)
    assert "retry" in repr(policy)

    async def main() -> Any:
        outcome = await idemfn.abegin("a", store=store, policy=policy)
        assert isinstance(outcome, idemfn.Claim)
        outcome.fail(KeyError("x"))  # in retry_on: released
        assert store.get("a") is None
        outcome = await idemfn.abegin("a", store=store, policy=policy)
        assert isinstance(outcome, idemfn.Claim)
        outcome.complete(5)
        done = await idemfn.abegin("a", store=store, policy=policy)
        assert isinstance(done, idemfn.Finished)
        return done.replay()

    assert asyncio.run(main()) == 5
    with pytest.raises(TypeError, match="policy must be"):
        idemfn.begin("a", store=store, policy={"ttl": 1})  # type: ignore[arg-type]


def test_callable_object_with_async_call_gets_the_async_wrapper() -> None:
    class Fetcher:
        async def __call__(self, url: str) -> str:
            return url.upper()

    fetch = idempotent(key="{url}", name="fetch", store=MemoryStore())(Fetcher())
    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch("a")) == "A"
    assert asyncio.run(fetch("a")) == "A"


@pytest.mark.parametrize(("key", "error"), [("", ValueError), (None, TypeError), (42, TypeError)])
def test_begin_refuses_bad_keys(key: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"begin\(key=...\)"):
        idemfn.begin(key, store=MemoryStore())  # type: ignore[arg-type]


def test_a_recorded_value_that_no_longer_loads_is_a_store_error() -> None:
    store = MemoryStore()
    claim = idemfn.begin("k", store=store)
    assert isinstance(claim, idemfn.Claim)
    claim.complete(1)
    entry = store.get("k")
    assert entry is not None
    # As if the value's class had been renamed since: pickle can no longer find it.
    store._entries["k"] = entry._replace(
        payload=b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00"
        b"\x8c\x04gone\x94\x8c\x03Cls\x94\x93\x94."
    )
    finished = idemfn.begin("k", store=store)
    assert isinstance(finished, idemfn.Finished)
    with pytest.raises(idemfn.StoreError, match="recorded value of key 'k' could not be loaded"):
        finished.replay()


def test_a_recorded_exception_that_no_longer_loads_replays_as_halted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    claim = idemfn.begin("k", store=store)
    assert isinstance(claim, idemfn.Claim)
    claim.halt(ValueError("boom"))
    entry = store.get("k")
    assert entry is not None and entry.payload is not None
    store._entries["k"] = entry._replace(
        payload=b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00"
        b"\x8c\x04gone\x94\x8c\x03Cls\x94\x93\x94."
    )
    finished = idemfn.begin("k", store=store)
    assert isinstance(finished, idemfn.Finished)
    with pytest.raises(idemfn.Halted, match="ValueError: boom") as info:
        finished.replay()
    assert info.value.exc_type == "ValueError"
    assert "no longer loads" in caplog.text


def test_begin_takes_a_deadline_as_datetime_or_timestamp() -> None:
    from datetime import datetime, timedelta, timezone

    store = MemoryStore()
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    for deadline in (past, past.timestamp()):
        with pytest.raises(idemfn.DeadlineExceeded):
            idemfn.begin("late", store=store, deadline=deadline)
    assert store.get("late") is None
    with pytest.raises(ValueError, match="timezone-aware"):
        idemfn.begin("late", store=store, deadline=datetime(2030, 1, 1))


# -- key_for, status and forget bind like the method (issue 13, D) ------------------------------


class Account:
    """At module level, so that its bound methods pickle by reference."""

    def __init__(self, id: int) -> None:
        self.id = id

    @idempotent(key="close:{self.id}:{reason}", store="memory://")
    def close(self, reason: str) -> str:
        """Close the account."""
        return f"closed {self.id}: {reason}"


def test_key_helpers_on_an_instance_bind_like_the_method() -> None:
    """`obj.method.key_for(7)` said "missing a required argument" although 7 was passed."""
    account = Account(7)
    bound = account.close
    assert bound.key_for("fraud") == Account.close.key_for(account, "fraud")
    assert bound.key_for("fraud").endswith(":close:7:fraud")
    assert bound.status("fraud") is None
    assert bound("fraud") == "closed 7: fraud"
    record = bound.status("fraud")
    assert record is not None and record.status is idemfn.Status.OK
    assert bound.forget("fraud") is True and bound.forget("fraud") is False
    assert bound.store is Account.close.store
    # The rest of what a bound method gives.
    assert inspect.signature(bound) == inspect.signature(lambda reason: None).replace(
        parameters=[
            inspect.Parameter("reason", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str")
        ],
        return_annotation="str",
    )
    assert bound.__name__ == "close" and bound.__doc__ == "Close the account."
    assert bound.__self__ is account and bound.__func__ is Account.close
    assert bound == account.close and hash(bound) == hash(account.close)
    assert bound != Account(7).close
    assert "close" in repr(bound)
    import pickle

    again = pickle.loads(pickle.dumps(bound))
    assert again.key_for("x") == Account(7).close.key_for("x")


def test_key_helpers_bind_through_super_and_subclasses() -> None:
    store = MemoryStore()

    class Base:
        @idempotent(key="{self.tag}:{n}", store=store)
        def run(self, n: int) -> str:
            return f"{self.tag}{n}"

        tag = "base"

    class Child(Base):
        tag = "child"

        def run(self, n: int) -> str:
            return "via super " + super().run(n)

        def key(self, n: int) -> str:
            return super().run.key_for(n)

    child = Child()
    assert child.run(1) == "via super child1"
    assert child.key(1).endswith(":child:1")
    assert Base().run.key_for(1).endswith(":base:1")


@pytest.mark.parametrize("order", ["outside", "inside"])
def test_key_helpers_of_classmethods_and_staticmethods_bind_like_the_call(order: str) -> None:
    store = MemoryStore()

    if order == "outside":

        class Billing:
            @idempotent(key="c:{cls.__name__}:{x}", store=store)
            @classmethod
            def by_class(cls, x: int) -> str:
                return f"{cls.__name__}{x}"

            @idempotent(key="s:{x}", store=store)
            @staticmethod
            def by_static(x: int) -> str:
                return f"s{x}"

    else:

        class Billing:  # type: ignore[no-redef]
            @classmethod
            @idempotent(key="c:{cls.__name__}:{x}", store=store)
            def by_class(cls, x: int) -> str:
                return f"{cls.__name__}{x}"

            @staticmethod
            @idempotent(key="s:{x}", store=store)
            def by_static(x: int) -> str:
                return f"s{x}"

    class Sub(Billing):
        pass

    for owner in (Billing, Billing(), Sub, Sub()):
        name = "Sub" if isinstance(owner, Sub) or owner is Sub else "Billing"
        assert owner.by_class.key_for(1).endswith(f":c:{name}:1")
        assert owner.by_class(1) == f"{name}1"
        record = owner.by_class.status(1)
        assert record is not None and record.status is idemfn.Status.OK
        assert owner.by_static.key_for(2).endswith(":s:2")
        assert owner.by_static(2) == "s2"
        assert owner.by_static.status(2) is not None
    assert Billing().by_class.forget(1) is True and Sub.by_class.forget(1) is True
    assert Billing.by_static.forget(2) is True


def test_async_methods_stay_coroutine_functions_when_bound() -> None:
    store = MemoryStore()

    class Fetcher:
        @idempotent(key="f:{url}", store=store)
        async def fetch(self, url: str) -> str:
            return url.upper()

        @staticmethod
        @idempotent(key="g:{url}", store=store)
        async def fetch_static(url: str) -> str:
            return url.upper()

        @idempotent(key="h:{url}", store=store)
        @classmethod
        async def fetch_class(cls, url: str) -> str:
            return url.upper()

    fetcher = Fetcher()
    for fn in (Fetcher.fetch, fetcher.fetch, Fetcher.fetch_static, fetcher.fetch_class):
        assert inspect.iscoroutinefunction(fn), fn
    assert asyncio.run(fetcher.fetch("a")) == "A"
    assert fetcher.fetch.key_for("a").endswith(":f:a")
    assert asyncio.run(Fetcher.fetch_static("b")) == "B"
    assert asyncio.run(fetcher.fetch_class("c")) == "C"
    assert fetcher.fetch_class.key_for("c").endswith(":h:c")


def test_decorators_above_a_method_can_mark_it() -> None:
    """@abstractmethod (or @deprecated, a pytest mark) over @idempotent sets an attribute on what
    the class body holds: it must take it, and give it back, as the function did."""
    import abc

    store = MemoryStore()

    class Base(abc.ABC):
        @abc.abstractmethod
        @idempotent(key="{self.name}:{x}", store=store)
        def send(self, x: int) -> str:
            return f"{self.name}:{x}"

    class Mailer(Base):
        name = "m"

        @idempotent(key="{self.name}:{x}", name="mailer.send", store=store)
        def send(self, x: int) -> str:
            return f"{self.name}:{x}"

    assert Base.__abstractmethods__ == frozenset({"send"})
    with pytest.raises(TypeError, match="abstract"):
        Base()  # type: ignore[abstract]
    assert Mailer().send(1) == "m:1" and Mailer().send.key_for(1) == "mailer.send:m:1"
    holder = vars(Base)["send"]
    holder.marked = True
    assert holder.marked is Base.send.marked is True  # type: ignore[attr-defined]
    del holder.marked
    assert not hasattr(Base.send, "marked")


def test_a_method_is_a_method_to_what_inspects_the_class() -> None:
    """pydantic's models refuse a class attribute that is not a function, property, classmethod
    or staticmethod (its inspect_namespace): "A non-annotated attribute was detected" for every
    model with an idempotent method. unittest.mock's autospec must check the call as on the
    instance."""
    import types
    from unittest import mock

    methods = (types.FunctionType, property, classmethod, staticmethod)

    class LikePydantic(type):
        def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> Any:
            for attribute, value in namespace.items():
                if not attribute.startswith("__") and not isinstance(value, methods):
                    raise TypeError(f"A non-annotated attribute was detected: {attribute}")
            return super().__new__(mcs, name, bases, namespace)

    class Order(metaclass=LikePydantic):
        def __init__(self, id: int) -> None:
            self.id = id

        @idempotent(key="{self.id}:{x}", store=MemoryStore())
        def charge(self, x: int) -> str:
            return f"{self.id}:{x}"

    order = Order(3)
    assert order.charge(1) == "3:1" and order.charge.key_for(1).endswith(":3:1")
    with mock.patch.object(Order, "charge", autospec=True) as charge:
        Order(4).charge(2)
        with pytest.raises(TypeError, match="missing a required argument: 'x'"):
            Order(4).charge()
    charge.assert_called_once_with(2)


# -- keys no store can hold, in the low-level API (issue 13, B4) -----------------------------------


@pytest.mark.parametrize(
    ("bad", "why"),
    [("a\x00b", "NUL character"), ("a\udc80b", "lone surrogate"), ("\udfff", "lone surrogate")],
)
def test_begin_refuses_unstorable_keys_on_every_store(store: Store, bad: str, why: str) -> None:
    """PostgreSQL raised StoreError for NUL, the others a bare UnicodeEncodeError or nothing."""
    refused = rf"^begin\(key=...\) cannot be stored: it holds a {why}"
    with pytest.raises(ValueError, match=refused):
        idemfn.begin(bad, store=store)
    with pytest.raises(ValueError, match=refused):
        asyncio.run(idemfn.abegin(bad, store=store))
    assert list(store.scan()) == []
    claim = idemfn.begin("café-日本", store=store)  # non-ASCII text is fine
    assert isinstance(claim, idemfn.Claim)
    claim.complete(1)
