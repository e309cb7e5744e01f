"""The hot paths' shortcuts must never change an answer: the key memo and pickle-first values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from idemfn import FingerprintMismatch, MemoryStore, idempotent
from idemfn._keys import _MEMO_SIZE, _memoised


def counting_resolve() -> tuple[list[tuple[Any, ...]], Any]:
    seen: list[tuple[Any, ...]] = []

    def resolve(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        seen.append(args)
        return f"key{args!r}{sorted(kwargs.items())}", f"fp{len(seen)}"

    return seen, _memoised(resolve)


def test_memo_answers_repeated_scalar_calls() -> None:
    seen, resolve = counting_resolve()
    first = resolve(("a", 1), {})
    assert resolve(("a", 1), {}) == first
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("one", "other"),
    [((1,), (True,)), ((0,), (False,)), ((b"a",), ("a",)), ((None,), (0,))],
)
def test_memo_tells_equal_values_of_other_types_apart(
    one: tuple[Any, ...], other: tuple[Any, ...]
) -> None:
    seen, resolve = counting_resolve()
    assert resolve(one, {}) != resolve(other, {})
    assert len(seen) == 2


@pytest.mark.parametrize("args", [(0.0,), (-0.0,), ([1],), ((1, 2),), (object(),), ("a", 1.5)])
def test_memo_is_bypassed_for_other_types(args: tuple[Any, ...]) -> None:
    seen, resolve = counting_resolve()
    resolve(args, {})
    resolve(args, {})
    assert len(seen) == 2


def test_memo_is_bypassed_for_keyword_calls() -> None:
    seen, resolve = counting_resolve()
    resolve((), {"a": 1})
    resolve((), {"a": 1})
    assert len(seen) == 2


def test_memo_is_bounded() -> None:
    seen, resolve = counting_resolve()
    for i in range(_MEMO_SIZE + 10):
        resolve((i,), {})
    calls = len(seen)
    resolve((_MEMO_SIZE + 9,), {})  # recent: still remembered
    resolve((10,), {})  # the oldest still remembered
    assert len(seen) == calls
    resolve((0,), {})  # the oldest ten were dropped
    resolve((9,), {})
    assert len(seen) == calls + 2


def test_one_and_true_are_a_mismatch_under_one_key() -> None:
    @idempotent(key="constant", store=MemoryStore())
    def fn(x: object) -> object:
        return x

    assert fn(1) == 1
    with pytest.raises(FingerprintMismatch):
        fn(True)
    assert fn(1) == 1


def test_mutable_defaults_are_fingerprinted_afresh_each_call() -> None:
    options: list[str] = []

    @idempotent(key="k:{x}", store=MemoryStore())
    def fn(x: int, opts: list[str] = options) -> int:
        return x

    fn(1)
    options.append("changed")  # the default's value changed: the same call means other arguments
    with pytest.raises(FingerprintMismatch):
        fn(1)


def test_callable_keys_are_called_every_time() -> None:
    calls = []

    def key(x: int) -> str:
        calls.append(x)
        return f"k{len(calls)}"

    @idempotent(key=key, store=MemoryStore())
    def fn(x: int) -> int:
        return x

    assert fn.key_for(1) != fn.key_for(1)
    assert len(calls) == 2


def test_callable_fingerprints_are_called_every_time() -> None:
    version = ["v1"]

    @idempotent(key="k:{x}", fingerprint=lambda x: version[0], store=MemoryStore())
    def fn(x: int) -> int:
        return x

    fn(1)
    version[0] = "v2"
    with pytest.raises(FingerprintMismatch):
        fn(1)


# -- values: pickle where it does as well as cloudpickle ---------------------------------------


def test_unpicklable_by_reference_values_still_round_trip(make: Any) -> None:
    class Local:
        def __init__(self, n: int) -> None:
            self.n = n

    fn = make(lambda x: (Local(x), lambda: x * 2), key="k:{x}")
    fn(3)
    obj, double = fn(3)
    assert obj.n == 3 and double() == 6


SCRIPT = """
import sys
from dataclasses import dataclass
from idemfn import DiskStore, idempotent

@dataclass
class Receipt:
    order: str
    cents: int

@idempotent(key="charge:{order}", store=DiskStore(sys.argv[1]), name="script.charge")
def charge(order: str) -> Receipt:
    print("ran")
    return Receipt(order, 250)

r = charge("o-1")
print(type(r).__name__, r.order, r.cents)
"""


def test_values_of_script_classes_replay_in_another_process(tmp_path: Path) -> None:
    script = tmp_path / "charge_script.py"
    script.write_text(SCRIPT)
    run = [sys.executable, str(script), str(tmp_path / "store")]
    first = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split("\n")
    assert first[:2] == ["ran", "Receipt o-1 250"]
    # A different script (another __main__) can still load the value: stored by value.
    other = tmp_path / "inspect_script.py"
    other.write_text(
        "import sys\nfrom idemfn import DiskStore, Finished, begin\n"
        "out = begin('script.charge:charge:o-1', store=DiskStore(sys.argv[1]))\n"
        "assert isinstance(out, Finished)\nr = out.replay()\nprint(type(r).__name__, r.cents)\n"
    )
    shown = subprocess.run(
        [sys.executable, str(other), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip() == "Receipt 250"
    again = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert again.strip() == "Receipt o-1 250"  # replayed: "ran" is not printed


def test_memo_does_not_keep_long_arguments() -> None:
    seen, resolve = counting_resolve()
    body = "x" * 10_000
    resolve(("id", body), {})
    resolve(("id", body), {})
    assert len(seen) == 2


def test_memo_survives_threads_racing_on_eviction() -> None:
    import sys
    import threading

    errors: list[BaseException] = []

    @idempotent(key="k:{i}", store=MemoryStore())
    def fn(i: int) -> int:
        return i

    def hammer(offset: int) -> None:
        try:
            for i in range(20_000):
                fn.key_for(offset + i)
        except BaseException as exc:
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(n * 7,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
