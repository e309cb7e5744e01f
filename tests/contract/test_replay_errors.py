"""What a replay gets when the outcome is awkward to store (issue 13).

- Exceptions whose ``__init__`` takes other arguments than their ``args`` replay as themselves,
  rebuilt without ``__init__`` (B2), raised or inside a returned value.
- A value that pickles but does not load back halts the key instead of being recorded ``ok``;
  the caller still gets it (A8).
- idemfn's own error escaping a body (an inner call's key busy elsewhere) replays as ``Halted``
  naming it, not as itself (B1).
"""

from __future__ import annotations

import pickle
import re
from datetime import datetime, timezone
from typing import Any

import pytest

import idemfn
from idemfn import AlreadyRunning, FingerprintMismatch, Halted, Status, Store, idempotent
from idemfn._outcome import JSON, PICKLE, NotLoadable, describe_exception
from tests.support.stores import Make

# Serialisation does not depend on the store: two kinds are enough, one keeping real bytes.
two_stores = pytest.mark.parametrize("store", ["memory", "disk"], indirect=True)


class ApiError(Exception):
    """Its __init__ takes two arguments and passes one message on: ``cls(*args)`` fails."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Reworded(Exception):
    """``cls(*args)`` succeeds, but rewords the message again: ``[0] [7] boom``."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


class KeywordOnly(Exception):
    def __init__(self, *, order: str) -> None:
        super().__init__(f"order {order} refused")
        self.order = order


class MissingKey(KeyError):
    """A builtin base that keeps nothing outside args (KeyError) is rebuilt the same way."""

    def __init__(self, key: str, hint: str) -> None:
        super().__init__(key)
        self.hint = hint


RAISED = {
    "ApiError": lambda: ApiError(402, "card declined"),
    "Reworded": lambda: Reworded("boom", 7),
    "KeywordOnly": lambda: KeywordOnly(order="o-1"),
    "MissingKey": lambda: MissingKey("sku", "check the catalogue"),
}


def same_exception(replayed: BaseException, raised: BaseException) -> None:
    assert type(replayed) is type(raised)
    assert replayed is not raised
    assert replayed.args == raised.args and str(replayed) == str(raised)
    own = {k: v for k, v in vars(replayed).items() if k != "__notes__"}
    assert own == vars(raised)


@two_stores
@pytest.mark.parametrize("build", RAISED.values(), ids=RAISED.keys())
def test_an_exception_whose_init_takes_other_arguments_replays_as_itself(
    make: Make, build: Any
) -> None:
    runs: list[int] = []

    def body(n: int) -> None:
        runs.append(n)
        raise build()

    fn = make(body)
    with pytest.raises(Exception) as first:
        fn(1)
    for _ in range(2):
        with pytest.raises(type(first.value)) as replayed:
            fn(1)
        same_exception(replayed.value, first.value)
        assert "replayed from the record" in vars(replayed.value)["__notes__"][-1]
    assert runs == [1]


def test_a_rebuilt_exception_loads_without_idemfn() -> None:
    payload = describe_exception(ApiError(402, "x")).payload
    assert payload is not None and b"idemfn" not in payload  # plain NEWOBJ: any reader loads it
    assert pickle.loads(payload).detail == "x"


@two_stores
def test_exceptions_inside_a_returned_value_replay_as_themselves(make: Make) -> None:
    runs: list[int] = []
    errors = [ApiError(500, "upstream"), Reworded("late", 3)]

    def body(n: int) -> object:
        runs.append(n)
        return {"errors": errors, "n": n}

    fn = make(body)
    assert fn(1)["errors"] is errors
    replayed = fn(1)  # used to be recorded ok, then StoreError on every replay
    for got, raised in zip(replayed["errors"], errors, strict=True):
        same_exception(got, raised)
    record = fn.status(1)
    assert record is not None and record.status is Status.OK and runs == [1]


class BadState:
    """Pickles, but its __setstate__ refuses what it is given back."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise ValueError("BadState lost its schema")


class Fussy:
    """A user's serializer whose loads() cannot read what its dumps() wrote."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return repr(value).encode()

    @staticmethod
    def loads(data: bytes) -> Any:
        raise ValueError("not JSON")


@two_stores
@pytest.mark.parametrize(
    ("value", "serializer", "says"),
    [
        (
            [BadState(1)],
            "pickle",
            r"list, which pickles but does not load back \(ValueError:"
            r" BadState lost its schema, raised in BadState.__setstate__ at ",
        ),
        (BadState(2), "pickle", r"BadState, which pickles but does not load back"),
        ({"a": 1}, Fussy, r"Fussy.loads\(\) cannot read back from what Fussy.dumps\(\) wrote"),
    ],
    ids=["setstate in a list", "setstate", "user serializer"],
)
def test_a_value_that_does_not_load_back_halts_the_key_and_is_returned(
    make: Make, value: object, serializer: Any, says: str
) -> None:
    runs: list[int] = []

    def body(n: int) -> object:
        runs.append(n)
        return value

    fn = make(body, serializer=serializer)
    assert fn(1) is value  # the body ran: its caller gets its value
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED  # not ok: it cannot replay
    assert record.reason is not None
    for _ in range(2):
        with pytest.raises(Halted, match=says) as replayed:
            fn(1)
        assert replayed.value.reason == record.reason
    assert runs == [1]


def test_not_loadable_names_the_type_and_the_way_out() -> None:
    with pytest.raises(NotLoadable, match="BadState lost its schema"):
        PICKLE.dump_value([i / 7 for i in range(100_000)] + [BadState(0)])  # a large payload
    with pytest.raises(NotLoadable) as info:
        PICKLE.dump_value({"items": [BadState(1)]})
    reason = str(info.value)
    assert "the call returned a dict, which pickles but does not load back" in reason
    assert "BadState.__setstate__" in reason and "BadState lost its schema" in reason
    assert "__reduce__" in reason and "__setstate__" in reason and "serializer=" in reason
    assert not isinstance(info.value, idemfn.IdempotencyError)  # private: the engine's to catch


# Results of builtin containers and scalars: their pickles refer to no class or function.
BUILTIN_ONLY = [
    None,
    0,
    2.5,
    "plain text",
    [1, (2, 3)],
    {"a": {1, 2}},
    frozenset({"x"}),
    bytearray(b"ab"),
    10**40,
    {"id": 7, "lines": [{"sku": "a", "qty": 2}]},
]


def test_a_value_of_builtin_containers_and_scalars_is_not_loaded_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Loading back is skipped when the pickle refers to no class or function: that keeps a
    # first call's cost for the common results. Anything else is loaded back once.
    loaded: list[bytes] = []
    real = pickle.loads

    def counting(data: bytes, **kw: Any) -> Any:
        loaded.append(data)
        return real(data, **kw)

    monkeypatch.setattr(pickle, "loads", counting)
    # A long list of floats: its bytes look like references; it is checked exactly instead.
    floats = [i / 7 for i in range(100_000)]
    payloads = [PICKLE.dump_value(value) for value in [*BUILTIN_ONLY, floats]]
    assert loaded == []
    assert [real(p) for p in payloads] == [*BUILTIN_ONLY, floats]
    # The check looks for the opcodes' bytes anywhere: inside data it loads back for nothing.
    for value in (b"\x93", "en dash \u2013", datetime(2024, 1, 1, tzinfo=timezone.utc)):
        loaded.clear()
        assert real(PICKLE.dump_value(value)) == value
        assert len(loaded) == 1


def held_elsewhere(store: Store, key: str) -> idemfn.Claim:
    """A live claim on ``key`` (this process, its lease renewed), as if another caller ran it."""
    claim = idemfn.begin(key, store=store)
    assert isinstance(claim, idemfn.Claim)
    return claim


@two_stores
def test_an_inner_call_already_running_replays_as_halted_not_as_itself(
    make: Make, store: Store
) -> None:
    inner = idempotent(key="{n}", name="test.inner", store=store)(lambda n: n)
    runs: list[int] = []

    def outer(n: int) -> object:
        runs.append(n)
        return inner(n)

    fn = make(outer)
    held = held_elsewhere(store, inner.key_for(1))
    try:
        with pytest.raises(AlreadyRunning):
            fn(1)  # the first caller gets the inner call's error as it was raised
        with pytest.raises(Halted) as replayed:
            fn(1)  # never AlreadyRunning: retrying this key can only replay it
    finally:
        held.release()
    halted = replayed.value
    assert halted.key == fn.key_for(1) and halted.exc_type == "idemfn.AlreadyRunning"
    assert f"its body raised idemfn's AlreadyRunning about key {inner.key_for(1)!r}" in (
        halted.reason
    )
    assert "retry_on=idemfn.AlreadyRunning" in halted.reason
    with pytest.raises(Halted):
        fn(1)  # the inner key is free now; the outer record stands until forgotten
    assert fn.forget(1)
    assert fn(1) == 1
    assert runs == [1, 1]


@two_stores
def test_retry_on_an_idemfn_error_releases_the_key(make: Make, store: Store) -> None:
    inner = idempotent(key="{n}", name="test.inner", store=store)(lambda n: n)
    fn = make(lambda n: inner(n), retry_on=AlreadyRunning)
    held = held_elsewhere(store, inner.key_for(1))
    try:
        with pytest.raises(AlreadyRunning):
            fn(1)
        assert fn.status(1) is None  # released, as retry_on says
    finally:
        held.release()
    assert fn(1) == 1


@two_stores
def test_any_idemfn_error_from_a_body_replays_as_halted(make: Make, store: Store) -> None:
    inner = idempotent(key="same", name="test.inner", store=store)(lambda n: n)
    inner(1)
    fn = make(lambda n: inner(n))
    with pytest.raises(FingerprintMismatch):
        fn(2)
    inner_key = re.escape(repr(inner.key_for(2)))
    with pytest.raises(Halted, match=rf"idemfn.FingerprintMismatch: key {inner_key}") as h:
        fn(2)
    assert h.value.key == fn.key_for(2)


def test_json_replays_an_idemfn_error_as_halted_with_the_same_reason() -> None:
    failure = describe_exception(AlreadyRunning("busy", key="k"), JSON)
    assert failure.payload is None and "idemfn's AlreadyRunning about key 'k'" in failure.reason


class Slotted(Exception):
    """Keeps its fields in ``__slots__`` (private ones too); ``__init__`` takes one argument,
    so ``cls(*args)`` succeeds: rebuilt that way, ``code`` silently became the message."""

    __slots__ = ("__secret", "code")

    def __init__(self, code: int) -> None:
        super().__init__(f"failed with {code}")
        self.code = code
        self.__secret = code * 2

    @property
    def secret(self) -> int:
        return self.__secret


@two_stores
def test_an_exception_with_slots_replays_with_its_slots(make: Make) -> None:
    def body(n: int) -> None:
        raise Slotted(n)

    fn = make(body)
    with pytest.raises(Slotted) as first:
        fn(3)
    with pytest.raises(Slotted) as replayed:
        fn(3)
    same_exception(replayed.value, first.value)
    # Before the fix: code == "failed with 3" (its __init__ rerun with the message).
    assert (replayed.value.code, replayed.value.secret) == (3, 6)


class RewordingOSError(OSError):
    """Rebuilt by OSError's own pickling, which calls __init__ with the stored args: the
    message comes back reworded ("[Errno 5] 5 1 2" for "[Errno 5] 1 2")."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(5, f"{a} {b}")


def test_an_exception_rebuilt_with_another_message_replays_as_halted(make: Make) -> None:
    def body(x: int) -> None:
        raise RewordingOSError(1, 2)

    fn = make(body, key="k:{x}")
    with pytest.raises(RewordingOSError, match=re.escape("[Errno 5] 1 2")):
        fn(1)
    # Before the fix: a RewordingOSError whose message was "[Errno 5] 5 1 2", silently.
    with pytest.raises(
        Halted, match=re.escape("(tests.contract.test_replay_errors.RewordingOSError:")
    ) as e:
        fn(1)
    assert "[Errno 5] 1 2" in str(e.value) and "came back with the message" in str(e.value)
