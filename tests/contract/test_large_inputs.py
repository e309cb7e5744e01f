"""Large and pathological inputs (hardening issue): 100 MB results on every store, deeply nested
and self-referencing arguments and results, huge keys.

Limits of the backends a record must fit in: SQLite values up to 1 GB (SQLITE_MAX_LENGTH),
Redis bulk strings up to 512 MB (proto-max-bulk-len), PostgreSQL bytea up to 1 GB. A 100 MB
result is a fifth of the smallest of them: every store must record and replay it.

Arguments that are nested too deeply or contain themselves have no canonical encoding within
Python's recursion limit: the call must fail with a ``ValueError`` naming the argument, before
the body runs and before anything is stored, never with a ``RecursionError``. A result that
cannot be pickled for the same reason halts the key with the reason; it never stays
``processing``.
"""

from __future__ import annotations

import dataclasses
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from idemfn import FingerprintMismatch, Halted, Status, Store, idempotent
from idemfn._fingerprint import fingerprint_arguments
from idemfn._stores.postgres import PostgresStore
from tests.support.stores import Make

MB = 2**20
BIG = 100 * MB
# A replay (or a first call) may hold a few copies of a value at once: the pickle, the encoded
# record, the bytes the backend hands over, the unpickled value. Measured (tracemalloc): 2-4.
# More than this many would mean a copy per layer too many.
MAX_COPIES = 5

SERVER_STORES = ["disk", "redis", "postgres"]


@pytest.fixture(scope="module")
def big_bytes() -> bytes:
    """100 MiB of incompressible bytes (made once: it takes ~0.4 s)."""
    return random.Random(0).randbytes(BIG)


def _traced(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()`` and the peak of what it allocated meanwhile (Python allocations)."""
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


# --------------------------------------------------------------------------------------------
# Very large values


@pytest.mark.slow
@pytest.mark.parametrize("store", SERVER_STORES, indirect=True)
def test_a_100_mb_result_is_recorded_and_replayed(store: Store, big_bytes: bytes) -> None:
    runs: list[int] = []

    @idempotent(key="big", store=store, name="test.large.bytes")
    def produce() -> bytes:
        runs.append(1)
        return big_bytes

    first, first_peak = _traced(produce)
    assert first is big_bytes
    # (No status() here: on PostgreSQL it reads the 100 MB again. A replay that returns the
    # value without running the body shows the record is ok.)
    replayed, replay_peak = _traced(produce)
    assert runs == [1]
    assert type(replayed) is bytes and len(replayed) == BIG
    assert replayed == big_bytes and replayed is not big_bytes
    # Memory stays proportionate: a handful of copies, not one per layer per call.
    assert first_peak < MAX_COPIES * BIG, f"first call allocated {first_peak / MB:.0f} MiB"
    assert replay_peak < MAX_COPIES * BIG, f"replay allocated {replay_peak / MB:.0f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("store", ["disk"], indirect=True)
def test_a_100_mb_list_result_is_recorded_and_replayed(store: Store) -> None:
    # A million objects, ~100 MB pickled: the object count, not only the size, is large.
    runs: list[int] = []

    @idempotent(key="big", store=store, name="test.large.list")
    def produce() -> list[bytes]:
        runs.append(1)
        return [i.to_bytes(4, "little") * 25 for i in range(1_000_000)]

    first = produce()
    replayed = produce()
    assert runs == [1]
    assert replayed == first and replayed is not first
    assert replayed[999_999] == (999_999).to_bytes(4, "little") * 25


# --------------------------------------------------------------------------------------------
# Deeply nested and self-referencing arguments


@dataclasses.dataclass(eq=False)  # no generated __eq__: comparing a cycle would recurse
class Node:
    next: Any = None


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


def nested_tuple(depth: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = ()
    for _ in range(depth):
        value = (value,)
    return value


def node_chain(depth: int) -> Node:
    value = Node()
    for _ in range(depth):
        value = Node(value)
    return value


def list_containing_itself() -> list[Any]:
    value: list[Any] = [1, "two"]
    value.append(value)
    return value


def dict_containing_itself() -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    value["self"] = value
    return value


def dataclass_cycle() -> Node:
    first = Node()
    first.next = Node(Node(first))
    return first


def cycle_through_a_tuple() -> list[Any]:
    value: list[Any] = []
    value.append(({"x": value},))
    return value


UNENCODABLE: dict[str, Callable[[], object]] = {
    "list nested 10,000 deep": lambda: nested_list(10_000),
    "dict nested 100,000 deep": lambda: nested_dict(100_000),
    "tuple nested 100,000 deep": lambda: nested_tuple(100_000),
    "dataclass chain 10,000 deep": lambda: node_chain(10_000),
    "list containing itself": list_containing_itself,
    "dict containing itself": dict_containing_itself,
    "dataclass cycle": dataclass_cycle,
    "cycle through a tuple and a dict": cycle_through_a_tuple,
}

TOO_DEEP = r"argument 'x': it is nested too deeply or refers to itself"


@pytest.mark.parametrize("key", [None, "k:{y}", "k:{x}"], ids=["memo", "template", "template-x"])
@pytest.mark.parametrize("make_value", UNENCODABLE.values(), ids=UNENCODABLE.keys())
@pytest.mark.parametrize("store", ["memory", "disk"], indirect=True)
def test_an_argument_nested_too_deeply_or_containing_itself_is_a_clear_error(
    store: Store, make_value: Callable[[], object], key: str | None
) -> None:
    value = make_value()
    runs: list[int] = []

    @idempotent(key=key, store=store, name="test.large.deep")
    def body(x: object, y: int = 1) -> str:
        runs.append(1)
        return "ran"

    for _ in range(2):  # the same error every time: nothing was left behind by the first
        with pytest.raises(ValueError, match=TOO_DEEP) as raised:
            body(value)
        assert raised.value.__suppress_context__  # no RecursionError chained in tracebacks
    assert runs == []
    assert list(store.scan()) == []


@pytest.mark.parametrize("make_value", UNENCODABLE.values(), ids=UNENCODABLE.keys())
def test_a_fingerprint_callable_returning_an_unencodable_value_is_a_clear_error(
    make_value: Callable[[], object],
) -> None:
    value = make_value()
    runs: list[int] = []

    @idempotent(key="k:{y}", store="memory://", name="test.large.fp", fingerprint=lambda x, y: x)
    def body(x: object, y: int) -> None:
        runs.append(1)

    with pytest.raises(ValueError, match="fingerprint=: it is nested too deeply or refers"):
        body(value, 1)
    assert runs == []


def test_deep_values_within_the_limit_fingerprint_deterministically() -> None:
    # Built twice, separately: equal values, equal fingerprints; one level more differs.
    for make in (nested_list, nested_dict, nested_tuple):
        a, b = make(150), make(150)
        assert fingerprint_arguments(["x"], {"x": a}) == fingerprint_arguments(["x"], {"x": b})
        deeper = fingerprint_arguments(["x"], {"x": make(151)})
        assert fingerprint_arguments(["x"], {"x": a}) != deeper
    # Shared (not cyclic) references are fine: a value referenced twice is encoded twice.
    shared = [1, 2, 3]
    twice = fingerprint_arguments(["x"], {"x": [shared, shared]})
    assert twice == fingerprint_arguments(["x"], {"x": [[1, 2, 3], [1, 2, 3]]})


@pytest.mark.parametrize("store", ["memory", "disk"], indirect=True)
def test_a_deep_argument_within_the_limit_is_recorded_and_replayed(store: Store) -> None:
    runs: list[int] = []

    @idempotent(key="k", store=store, name="test.large.deep_ok")
    def body(x: object) -> int:
        runs.append(1)
        return 7

    assert body(nested_list(150)) == 7
    assert body(nested_list(150)) == 7  # same fingerprint from a separately built value
    assert runs == [1]


@pytest.mark.parametrize("fingerprint", [False, ["y"]], ids=["off", "other-argument"])
def test_a_key_template_over_a_too_deep_unfingerprinted_argument_is_a_clear_error(
    fingerprint: Any,
) -> None:
    runs: list[int] = []

    @idempotent(key="k:{x}", store="memory://", name="test.large.key", fingerprint=fingerprint)
    def body(x: object, y: int = 1) -> None:
        runs.append(1)

    try:
        with pytest.raises(ValueError, match=r"key='k:\{x\}'"):
            body(nested_list(10_000))
    finally:
        assert runs == []


def test_a_key_template_over_a_self_referencing_unfingerprinted_argument_works() -> None:
    # repr() marks the cycle ([...]): the key is deterministic, so the call works.
    runs: list[int] = []

    @idempotent(key="k:{x}", store="memory://", name="test.large.key_cycle", fingerprint=False)
    def body(x: object) -> int:
        runs.append(1)
        return 1

    assert body.key_for(list_containing_itself()) == "test.large.key_cycle:k:[1, 'two', [...]]"
    assert body(list_containing_itself()) == body(list_containing_itself()) == 1
    assert runs == [1]


# --------------------------------------------------------------------------------------------
# Deeply nested and self-referencing results


UNPICKLABLE: dict[str, Callable[[], object]] = {
    "list nested 10,000 deep": lambda: nested_list(10_000),
    "dict nested 100,000 deep": lambda: nested_dict(100_000),
    "dataclass chain 10,000 deep": lambda: node_chain(10_000),
}


@pytest.mark.parametrize("make_value", UNPICKLABLE.values(), ids=UNPICKLABLE.keys())
def test_a_result_nested_too_deeply_to_store_halts_the_key(
    make: Make, make_value: Callable[[], object]
) -> None:
    runs: list[int] = []

    def body() -> object:
        runs.append(1)
        return make_value()

    fn = make(body, key="k")
    with pytest.raises(Halted, match="could not be stored") as first:
        fn()
    assert not isinstance(first.value, RecursionError)
    record = fn.status()
    assert record is not None and record.status is Status.HALTED  # never left processing
    assert record.reason is not None and "could not be stored" in record.reason
    assert "recursion" in record.reason
    with pytest.raises(Halted, match="could not be stored"):
        fn()
    assert runs == [1]


@pytest.mark.parametrize("store", ["memory", "disk"], indirect=True)
def test_an_exception_carrying_a_too_deep_value_halts_and_replays_as_halted(
    store: Store,
) -> None:
    runs: list[int] = []

    @idempotent(key="k", store=store, name="test.large.deep_exc")
    def body() -> None:
        runs.append(1)
        raise ValueError(nested_list(10_000))

    with pytest.raises(ValueError):  # the owner gets its own exception
        body()
    record = body.status()
    assert record is not None and record.status is Status.HALTED
    with pytest.raises(Halted, match="ValueError"):  # it could not be pickled: Halted
        body()
    assert runs == [1]


def test_self_referencing_results_replay_with_their_cycles(make: Make) -> None:
    runs: list[int] = []

    def body(which: str) -> object:
        runs.append(1)
        return {
            "list": list_containing_itself,
            "dict": dict_containing_itself,
            "dataclass": dataclass_cycle,
        }[which]()

    fn = make(body, key="k:{which}")
    for which in ("list", "dict", "dataclass"):
        fn(which)
        replayed = fn(which)
        if which == "list":
            assert replayed[:2] == [1, "two"] and replayed[2] is replayed
        elif which == "dict":
            assert replayed["a"] == 1 and replayed["self"] is replayed
        else:
            assert isinstance(replayed, Node) and replayed.next.next.next is replayed
    assert len(runs) == 3


# --------------------------------------------------------------------------------------------
# Huge keys and huge key arguments


def _works_or_is_refused_clearly(store: Store, body: Any, arg: str, runs: list[int]) -> None:
    """Memory, disk and Redis hold any key; PostgreSQL's btree index may refuse a long one,
    but then with a short ValueError saying so, the body not run and nothing recorded."""
    try:
        first = body(arg)
    except ValueError as exc:
        if not isinstance(store, PostgresStore):
            raise
        message = str(exc)
        assert "key" in message
        assert len(message) < 1000, "the error message holds the whole key"
        assert runs == []
        assert body.status(arg) is None
        return
    assert body(arg) == first == len(arg)
    assert runs == [1]
    record = body.status(arg)
    assert record is not None and record.status is Status.OK
    assert record.key == body.key_for(arg)
    assert body.forget(arg)
    assert body.status(arg) is None


def test_a_100_kb_key_works_or_is_refused_clearly(
    request: pytest.FixtureRequest, store: Store
) -> None:
    # Random text: incompressible, so PostgreSQL cannot squeeze it into an index row either.
    text = "".join(random.Random(1).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=100_000))
    runs: list[int] = []

    @idempotent(key="doc:{text}", store=store, name="test.large.key100k")
    def body(text: str) -> int:
        runs.append(1)
        return len(text)

    assert len(body.key_for(text)) > 100_000
    _works_or_is_refused_clearly(store, body, text, runs)


@pytest.mark.slow
def test_a_key_template_over_a_10_mb_string_works_or_is_refused_clearly(
    request: pytest.FixtureRequest, store: Store
) -> None:
    text = "".join(random.Random(2).choices("abcdef", k=1000)) * 10_000  # a 10 MB key
    runs: list[int] = []

    @idempotent(key="doc:{text}", store=store, name="test.large.key10m")
    def body(text: str) -> int:
        runs.append(1)
        return len(text)

    _works_or_is_refused_clearly(store, body, text, runs)


@pytest.mark.slow
def test_a_100_mb_string_argument_is_fingerprinted_on_every_store(store: Store) -> None:
    text = "é" + "x" * (BIG - 1)  # not ASCII: the fast path encodes it to UTF-8
    runs: list[int] = []

    @idempotent(key="doc:{doc_id}", store=store, name="test.large.arg")
    def body(doc_id: int, text: str) -> int:
        runs.append(1)
        return len(text)

    assert body(1, text) == body(1, text) == BIG
    assert runs == [1]
    with pytest.raises(FingerprintMismatch):
        body(1, text[:-1] + "y")  # one character differs, 100 MB in
    assert runs == [1]
