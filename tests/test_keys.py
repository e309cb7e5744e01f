"""Keys and options (contract section 3) and every way to hold the decorator wrong."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from idemfn import MemoryStore, idempotent

STORE = MemoryStore()


def deco(**options: Any) -> Any:
    options.setdefault("store", STORE)
    return idempotent(**options)


# -- keys ---------------------------------------------------------------------------------------


def test_template_over_bound_arguments_with_defaults() -> None:
    @deco(key="charge:{order_id}:{currency}")
    def charge(order_id: str, amount: int, currency: str = "EUR") -> None: ...

    assert charge.key_for("o1", 5).endswith(":charge:o1:EUR")
    assert charge.key_for(amount=5, order_id="o1", currency="USD").endswith(":charge:o1:USD")


def test_template_with_attributes_items_and_format_spec() -> None:
    @dataclass
    class Order:
        id: int
        lines: list[str]

    @deco(key="{order.id:05d}/{order.lines[0]}")
    def ship(order: Order) -> None: ...

    assert ship.key_for(Order(42, ["a", "b"])).endswith(":00042/a")


def test_default_name_is_module_and_qualname() -> None:
    @deco(key="x")
    def local() -> None: ...

    assert local.key_for() == (
        f"{__name__}.test_default_name_is_module_and_qualname.<locals>.local:x"
    )


def test_name_gives_a_stable_prefix() -> None:
    @deco(key="charge:{order_id}", name="payments.charge")
    def charge(order_id: str) -> None: ...

    assert charge.key_for("o1") == "payments.charge:charge:o1"


def test_callable_key_gets_the_arguments() -> None:
    @deco(key=lambda order_id, amount: f"c-{order_id}-{amount}")
    def charge(order_id: str, amount: int) -> None: ...

    assert charge.key_for("o1", amount=3).endswith(":c-o1-3")


def test_memoiser_mode_keys_on_all_arguments() -> None:
    runs = []

    @deco()
    def square(x: int) -> int:
        runs.append(x)
        return x * x

    assert square(3) == 9 and square(3) == 9 and square(4) == 16
    assert runs == [3, 4]
    key = square.key_for(3)
    assert len(key.rpartition(":")[2]) == 64
    assert square.key_for(x=3) == key


def test_methods_leave_self_out_of_the_fingerprint() -> None:
    class Charger:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        @deco(key="{self.tag}:{order_id}")
        def charge(self, order_id: str) -> str:
            return f"{self.tag}-{order_id}"

    a, b = Charger("t"), Charger("t")
    assert a.charge("o1") == "t-o1"
    assert b.charge("o1") == "t-o1"  # another instance, same key: replayed, no mismatch
    assert Charger.charge.key_for(a, "o1").endswith(":t:o1")


def test_script_functions_are_named_after_the_script(tmp_path: Path) -> None:
    script = tmp_path / "nightly_job.py"
    script.write_text(
        "from idemfn import idempotent, MemoryStore\n"
        "@idempotent(key='k', store=MemoryStore())\n"
        "def step(): ...\n"
        "print(step.key_for())\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "nightly_job.step:k"


# -- bad keys at decoration time -----------------------------------------------------------------


def test_template_field_naming_no_parameter() -> None:
    with pytest.raises(ValueError, match=r"field \{order\} names no parameter.*order_id"):

        @deco(key="charge:{order}")
        def charge(order_id: str) -> None: ...


def test_template_attribute_of_unknown_parameter() -> None:
    with pytest.raises(ValueError, match=r"field \{request.id\} names no parameter"):

        @deco(key="{request.id}")
        def task(self: Any) -> None: ...


@pytest.mark.parametrize("template", ["{}", "{0}", "x-{0.id}"])
def test_positional_template_fields_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="positional field"):

        @deco(key=template)
        def fn(a: int) -> None: ...


@pytest.mark.parametrize("template", ["{a", "a}", "{a!z}"])
def test_malformed_template(template: str) -> None:
    with pytest.raises(ValueError, match="key="):

        @deco(key=template)
        def fn(a: int) -> None: ...


def test_empty_template() -> None:
    with pytest.raises(ValueError, match="must not be empty"):

        @deco(key="")
        def fn(a: int) -> None: ...


@pytest.mark.parametrize("bad", [42, b"k", ["k"]])
def test_key_of_the_wrong_type(bad: object) -> None:
    with pytest.raises(TypeError, match="key="):

        @deco(key=bad)
        def fn(a: int) -> None: ...


# -- bad keys at call time: nothing runs, nothing is stored ---------------------------------------


def test_key_resolving_to_empty_is_refused() -> None:
    store = MemoryStore()
    runs = []

    @idempotent(key="{name}", store=store)
    def fn(name: str) -> None:
        runs.append(name)

    with pytest.raises(ValueError, match="empty key"):
        fn("")
    assert runs == [] and list(store.scan()) == []


@pytest.mark.parametrize(
    ("returned", "error"), [(None, TypeError), (7, TypeError), ("", ValueError)]
)
def test_callable_key_returning_a_bad_key(returned: object, error: type[Exception]) -> None:
    store = MemoryStore()
    runs = []

    @idempotent(key=lambda a: returned, store=store)
    def fn(a: int) -> None:
        runs.append(a)

    with pytest.raises(error, match=r"key\= callable"):
        fn(1)
    assert runs == [] and list(store.scan()) == []


def test_template_that_fails_for_this_call() -> None:
    @deco(key="{order.id}", fingerprint=False)
    def ship(order: object) -> None: ...

    with pytest.raises(ValueError, match=r"key='\{order.id\}' could not be formatted.*Attribute"):
        ship(object())


def test_wrong_arguments_raise_like_python_and_run_nothing() -> None:
    runs = []

    @deco(key="k:{a}")
    def fn(a: int, *, b: int = 0) -> None:
        runs.append(a)

    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        fn()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'c'"):
        fn(1, c=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="too many positional"):
        fn(1, 2)  # type: ignore[misc]
    assert runs == []


def test_unfingerprintable_argument_names_it_and_runs_nothing() -> None:
    store = MemoryStore()
    runs = []

    @idempotent(key="k:{a}", store=store)
    def fn(a: int, conn: object) -> None:
        runs.append(a)

    with pytest.raises(TypeError, match=r"argument 'conn'.*builtins.object.*fingerprint="):
        fn(1, object())
    assert runs == [] and list(store.scan()) == []


def test_unfingerprintable_argument_left_out_by_name() -> None:
    @deco(key="k:{a}", fingerprint=["a"])
    def fn(a: int, conn: object) -> int:
        return a

    assert fn(1, object()) == 1
    assert fn(1, object()) == 1


# -- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"ttl": 0}, ValueError, "ttl must be > 0"),
        ({"ttl": -1}, ValueError, "ttl must be > 0"),
        ({"ttl": "1h"}, TypeError, "ttl must be a number"),
        ({"ttl": float("nan")}, ValueError, "ttl must be a finite"),
        ({"lease": 0}, ValueError, "lease must be > 0"),
        ({"lease": True}, TypeError, "lease must be a number"),
        ({"wait": -0.1}, ValueError, "wait must be >= 0"),
        ({"wait": float("inf")}, ValueError, "wait must be a finite"),
        ({"on_abandoned": "ignore"}, ValueError, "on_abandoned must be 'halt' or 'retry'"),
        ({"retry_on": ValueError()}, TypeError, "retry_on must be an exception type"),
        ({"retry_on": [ValueError]}, TypeError, "retry_on must be an exception type"),
        ({"retry_on": (int,)}, TypeError, "retry_on must be an exception type"),
        ({"deadline": "tomorrow"}, TypeError, "deadline must be an aware datetime"),
        ({"store": 42}, TypeError, "store: open_store"),
        ({"store": "mysql://localhost/db"}, ValueError, "unknown store URL scheme"),
        ({"store": "ftp://x"}, ValueError, "unknown store URL scheme 'ftp'"),
        ({"store": ""}, ValueError, "empty path"),
        ({"name": ""}, ValueError, "name= .* must not be empty"),
        ({"name": 3}, TypeError, "name= .* must be a str"),
        ({"fingerprint": "a"}, TypeError, r"fingerprint='a'.*\['a'\]"),
        ({"fingerprint": ["nope"]}, ValueError, "fingerprint= .* names 'nope'"),
        ({"fingerprint": 3}, TypeError, "fingerprint= .* must be None, False"),
    ],
)
def test_bad_options_are_refused_naming_the_option(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):

        @idempotent(**{"store": STORE, **options})
        def fn(a: int) -> None: ...


def test_naive_deadline_is_refused() -> None:
    from datetime import datetime

    with pytest.raises(ValueError, match="deadline must be timezone-aware"):
        idempotent(deadline=datetime(2030, 1, 1), store=STORE)


def test_bare_decorator_is_refused_with_the_way_out() -> None:
    with pytest.raises(TypeError, match=r"write @idempotent\(\)"):

        @idempotent  # type: ignore[arg-type]
        def fn() -> None: ...


def test_generator_functions_are_refused() -> None:
    def gen() -> Any:
        yield 1

    async def agen() -> Any:
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match="generator function"):
            deco()(fn)


def test_non_callables_are_refused() -> None:
    with pytest.raises(TypeError, match="decorates functions"):
        deco()(42)


# -- found in review (2026-11-22) ---------------------------------------------------------------


def test_memoiser_mode_on_a_method_is_refused() -> None:
    with pytest.raises(ValueError, match=r"key= is needed for the method.*self.*key='\{self.id\}'"):

        class Account:
            @deco()
            def close(self) -> None: ...


def test_partials_and_callable_objects_need_a_name() -> None:
    import functools

    def send(to: str, subject: str) -> str:
        return to

    class Sender:
        def __call__(self, to: str) -> str:
            return to

    for fn in (functools.partial(send, subject="hi"), Sender()):
        with pytest.raises(TypeError, match="needs name="):
            deco(key="{to}")(fn)
        named = deco(key="{to}", name="mail.send")(fn)
        assert named.key_for("ada") == "mail.send:ada"


def test_memoiser_mode_error_points_to_key() -> None:
    @deco(fingerprint=["n"])
    def fn(n: int, conn: object) -> int:
        return n

    with pytest.raises(TypeError, match=r"argument 'conn'.*with key=None the key is made of every"):
        fn(1, object())
