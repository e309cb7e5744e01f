"""Keys and options (docs/keys.md) and every way to hold the decorator wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idemfn import MemoryStore, Store, idempotent
from tests.support.stores import Make

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


# Defaults applied on the slow binder path (*args/**kwargs signatures)
def test_defaults_are_applied_for_signatures_with_var_arguments(make: Make) -> None:
    def body(a: int, b: int = 2, *rest: int, **extra: int) -> int:
        return a + b

    fn = make(body, key="k:{a}:{b}")
    assert fn.key_for(1) == fn.key_for(1, 2) == fn.key_for(1, b=2)
    assert fn(1) == 3
    assert fn(1, b=2) == 3  # same fingerprint: a replay, not a mismatch


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


# Memoiser mode keys on ALL arguments whatever fingerprint= says
@pytest.mark.parametrize("fingerprint", [False, ["x"]])
def test_memoiser_mode_keys_on_all_arguments_whatever_the_fingerprint(
    make: Make, fingerprint: object
) -> None:
    runs: list[tuple[int, int]] = []

    def body(x: int, y: int = 0) -> int:
        runs.append((x, y))
        return x * 10 + y

    fn = make(body, fingerprint=fingerprint)
    assert fn(1, 1) == 11
    assert fn(2, 1) == 21
    assert fn(1, 2) == 12
    assert fn(1, 1) == 11
    assert runs == [(1, 1), (2, 1), (1, 2)]


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


# -- a script's default name (issue 13, A6) ------------------------------------------------------

SCRIPT = """\
import sys
from idemfn import idempotent

@idempotent(key="k", store=sys.argv[1])
def step() -> str:
    return __file__

print(step.key_for())
print(step())
"""


def _run_script(*argv: str, cwd: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_scripts_with_one_file_name_keep_apart_and_each_keeps_its_keys(tmp_path: Path) -> None:
    """Two deploy.py share a store but not keys; one script keeps its keys however it is run."""
    store = str(tmp_path / "store")
    for app in ("app1", "app2"):
        (tmp_path / app).mkdir()
        (tmp_path / app / "deploy.py").write_text(SCRIPT)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "deploy").symlink_to(tmp_path / "app1" / "deploy.py")
    first = os.path.realpath(tmp_path / "app1" / "deploy.py")
    second = os.path.realpath(tmp_path / "app2" / "deploy.py")

    assert _run_script("deploy.py", store, cwd=tmp_path / "app1") == [f"{first}/step:k", first]
    # The other script of the same name runs its own body, not a replay of the first's.
    assert _run_script("app2/deploy.py", store, cwd=tmp_path) == [f"{second}/step:k", second]
    # The first, run again from elsewhere, by absolute path, through a symlink or a runner
    # (whose own module is __main__), keeps its key and replays its record.
    for argv, cwd in [
        (["app1/deploy.py"], tmp_path),
        ([first], tmp_path / "app2"),
        (["bin/deploy"], tmp_path),
        (["-m", "cProfile", "-o", os.devnull, "app1/deploy.py"], tmp_path),
    ]:
        assert _run_script(*argv, store, cwd=cwd) == [f"{first}/step:k", first], argv


SPAWNS = """\
import multiprocessing, sys
from idemfn import idempotent

@idempotent(key="k", store=sys.argv[1])
def step() -> None: ...

def child(queue) -> None:
    queue.put(step.key_for())

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    print(step.key_for())
    print(queue.get(timeout=120))
    process.join(120)
"""


def test_a_spawned_child_keeps_the_scripts_keys(tmp_path: Path) -> None:
    """multiprocessing re-runs the script as __mp_main__ in a spawned child: same names."""
    (tmp_path / "job.py").write_text(SPAWNS)
    parent, child = _run_script("job.py", str(tmp_path / "store"), cwd=tmp_path)
    assert parent == child == f"{os.path.realpath(tmp_path / 'job.py')}/step:k"


def test_a_packages_main_module_keeps_apart_from_the_package(tmp_path: Path) -> None:
    """python -m shop runs shop/__main__.py: its step is not shop/__init__.py's step."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text(
        "import sys\n"
        "from idemfn import idempotent\n"
        "@idempotent(key='k', store=sys.argv[1])\n"
        "def step() -> str:\n"
        "    return 'package'\n"
    )
    (tmp_path / "shop" / "__main__.py").write_text(
        "import sys\n"
        "import shop\n"
        "from idemfn import idempotent\n"
        "@idempotent(key='k', store=sys.argv[1])\n"
        "def step() -> str:\n"
        "    return 'main'\n"
        "print(shop.step.key_for())\n"
        "print(step.key_for())\n"
        "print(shop.step(), step())\n"
    )
    store = str(tmp_path / "store")
    # As if imported: the module shop.__main__, not shop.
    assert _run_script("-m", "shop", store, cwd=tmp_path) == [
        "shop.step:k",
        "shop.__main__.step:k",
        "package main",
    ]


# `python -m pkg` and `python -m pkg.tool` name keys after the module
def test_module_run_with_dash_m_is_named_after_the_module(tmp_path: Path) -> None:
    pkg = tmp_path / "nightly"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    code = (
        "from idemfn import idempotent, MemoryStore\n"
        "@idempotent(key='k', store=MemoryStore())\n"
        "def step(): ...\n"
        "print(step.key_for())\n"
    )
    (pkg / "__main__.py").write_text(code)
    (pkg / "tool.py").write_text(code)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    for module, expected in [
        ("nightly", "nightly.__main__.step:k"),  # as when imported: not the package's
        ("nightly.tool", "nightly.tool.step:k"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", module], capture_output=True, text=True, check=True, env=env
        ).stdout
        assert out.strip() == expected


def test_runpy_run_path_names_functions_after_the_file(tmp_path: Path) -> None:
    """runpy.run_path runs a file as module '<run_path>': named after the file, as a script."""
    store = str(tmp_path / "store")
    for app in ("app1", "app2"):
        (tmp_path / app).mkdir()
        (tmp_path / app / "deploy.py").write_text(SCRIPT)
    first = os.path.realpath(tmp_path / "app1" / "deploy.py")
    second = os.path.realpath(tmp_path / "app2" / "deploy.py")
    runner = "import runpy, sys; runpy.run_path(sys.argv[2])"
    # (run_path leaves __file__ as given: the body returns the relative path.)
    assert _run_script("-c", runner, store, "app1/deploy.py", cwd=tmp_path) == [
        f"{first}/step:k",
        "app1/deploy.py",
    ]
    # Not a replay of app1's record, and the same name as when app2 runs as a script.
    assert _run_script("-c", runner, store, "app2/deploy.py", cwd=tmp_path) == [
        f"{second}/step:k",
        "app2/deploy.py",
    ]
    assert _run_script("app2/deploy.py", store, cwd=tmp_path) == [
        f"{second}/step:k",
        "app2/deploy.py",
    ]


def test_a_function_without_a_script_file_needs_a_name(tmp_path: Path) -> None:
    """python -c (like a REPL or a notebook) has no file: every session would share its keys."""
    code = (
        "import sys\n"
        "from idemfn import idempotent\n"
        "@idempotent(key='k', store=sys.argv[1])\n"
        "def step(): ...\n"
        "print(step.key_for())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "TypeError: @idempotent needs name= for step" in done.stderr
    assert "no script file" in done.stderr and "name='myapp.step'" in done.stderr
    # A MemoryStore is seen by no other process: no name needed.
    assert _run_script("-c", code, "memory://", cwd=tmp_path) == ["__main__.step:k"]
    # And name= gives a prefix that survives everything: moves, renames, sessions.
    named = code.replace("key='k',", "key='k', name='ops.step',")
    assert _run_script("-c", named, str(tmp_path / "store"), cwd=tmp_path) == ["ops.step:k"]


def test_a_script_path_with_the_separator_is_escaped(tmp_path: Path) -> None:
    """A default name never holds ':' (the separator): a path's ':' and '%' are escaped."""
    odd = tmp_path / "we:ird%dir"
    odd.mkdir()
    (odd / "deploy.py").write_text(SCRIPT)
    real = os.path.realpath(odd / "deploy.py")
    escaped = real.replace("%", "%25").replace(":", "%3A")
    key, _ = _run_script("deploy.py", str(tmp_path / "store"), cwd=odd)
    assert key == f"{escaped}/step:k"
    assert key.partition(":")[0] == f"{escaped}/step"


def test_a_default_name_that_would_hold_the_separator_asks_for_name() -> None:
    def step() -> None: ...

    step.__qualname__ = "odd:name"
    with pytest.raises(TypeError, match=r"needs name= for odd:name.*':'"):
        deco(key="k")(step)
    assert deco(key="k", name="ops.step")(step).key_for() == "ops.step:k"


# -- the stored key is unambiguous (issue 13, A7) -------------------------------------------------


def test_a_name_holding_the_separator_is_refused() -> None:
    """name='shop:orders', key='refund' and name='shop', key='orders:refund' would share."""

    @deco(name="shop", key="orders:refund")
    def refund_order() -> str:
        return "order refunded"

    refused = r"name='shop:orders'.*must not contain ':'.*'shop.orders'"
    with pytest.raises(ValueError, match=refused):

        @deco(name="shop:orders", key="refund")
        def refund_shop() -> str:
            return "shop refunded"

    assert refund_order.key_for() == "shop:orders:refund"


@given(name=st.text(min_size=1, max_size=12), key=st.text(min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_the_stored_key_gives_back_its_name_and_key(name: str, key: str) -> None:
    """name:key split at the first ':' is (name, key): no two pairs share a stored key."""
    try:
        fn = deco(key=lambda: key, name=name)(lambda: None)
    except ValueError:
        assert ":" in name or not name.strip() or "\x00" in name or not _encodes(name)
        return
    try:
        stored = fn.key_for()
    except ValueError:
        assert "\x00" in key or not _encodes(key)
        return
    assert stored.partition(":")[::2] == (name, key)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_a_default_name_holds_no_separator() -> None:
    class Outer:
        def method(self) -> None: ...

    def make() -> Any:
        def inner() -> None: ...

        return inner

    keys = [
        deco(key="k")(Outer.method).key_for(Outer()),
        deco(key="k")(make()).key_for(),
        deco(key="k")(lambda: None).key_for(),
    ]
    for key in keys:
        name = key.removesuffix(":k")
        assert ":" not in name and name.startswith(__name__ + "."), name


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

        @idempotent  # type: ignore[call-arg]
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


# -- keys no store can hold: ValueError on every store, before anything runs (issue 13, B4) -------

UNSTORABLE = [
    pytest.param("a\x00b", "NUL character", id="nul"),
    pytest.param("a\udc80b", "lone surrogate", id="surrogateescape"),
    pytest.param("\ud800", "lone surrogate", id="high-surrogate"),
]


@pytest.mark.parametrize(("bad", "why"), UNSTORABLE)
def test_unstorable_keys_are_refused_on_every_store(store: Store, bad: str, why: str) -> None:
    """PostgreSQL raised StoreError for NUL, the others a bare UnicodeEncodeError or nothing."""
    runs = []

    def body(x: str) -> str:
        runs.append(x)
        return x

    by_template = idempotent(key="{x}", name="bad.template", store=store)(body)
    by_callable = idempotent(key=lambda x: x, name="bad.callable", store=store)(body)
    for fn, source in [(by_template, r"key='\{x\}'"), (by_callable, "key= callable")]:
        for use in (fn, fn.key_for, fn.status, fn.forget):
            refused = rf"{source}.*cannot be stored: .*{why} .*at index"
            with pytest.raises(ValueError, match=refused):
                use(bad)
    assert runs == [] and list(store.scan()) == []


def test_non_ascii_keys_are_fine_on_every_store(store: Store) -> None:
    runs = []

    @idempotent(key="{x}", name="unicode", store=store)
    def fn(x: str) -> str:
        runs.append(x)
        return x

    text = "café-日本-😀"
    assert fn(text) == fn(text) == text
    assert runs == [text]
    record = fn.status(text)
    assert record is not None and record.key == f"unicode:{text}"


@pytest.mark.parametrize(("bad", "why"), UNSTORABLE)
def test_unstorable_names_are_refused_when_decorating(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=rf"name=.*cannot be stored: .*{why}"):
        deco(key="k", name=bad)(lambda: None)


# -- callable options that cannot take the arguments name the option (issue 13, D) ---------------


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (lambda order_id: order_id, "too many positional arguments"),
        (lambda order_id, amount, extra: order_id, "missing a required argument: 'extra'"),
        (lambda order_id, amount=0: order_id, "got an unexpected keyword argument 'currency'"),
        # Takes every argument, but not a call that leaves amount to its default.
        (lambda order_id, amount, *, currency: order_id, "missing a required argument: 'amount'"),
    ],
)
def test_a_key_callable_that_cannot_take_the_arguments_is_refused_when_decorating(
    key: Any, why: str
) -> None:
    """Was a raw TypeError from inside the lambda on the first call."""
    refused = rf"key=<lambda>\(.*\) for .*charge\(.*cannot take .*arguments \({why}\)"
    with pytest.raises(TypeError, match=refused):

        @deco(key=key)
        def charge(order_id: str, amount: int = 0, *, currency: str = "EUR") -> None: ...


@pytest.mark.parametrize(
    "key",
    [
        lambda order_id, amount=0, *, currency="EUR": order_id,
        lambda order_id, amount=0, currency="EUR": order_id,
        lambda *args, **kwargs: "k",
        lambda order_id, *_, **__: order_id,
        str.format,  # no signature: left to the call
    ],
)
def test_key_callables_that_can_take_the_arguments_are_accepted(key: Any) -> None:
    @deco(key=key, fingerprint=False)
    def charge(order_id: str, amount: int = 0, *, currency: str = "EUR") -> None: ...


def test_a_callable_option_failing_to_bind_at_call_time_names_the_option() -> None:
    runs = []

    # Accepted when decorating (the arguments bind by keyword), but called positionally.
    @deco(key=lambda *, order_id, **_: order_id, fingerprint=False)
    def charge(order_id: str, amount: int) -> None:
        runs.append(order_id)

    assert charge.key_for(order_id="o1", amount=5).endswith(":o1")
    with pytest.raises(TypeError, match=r"^key=<lambda> cannot take this call's arguments"):
        charge("o1", 5)

    @deco(key="k:{order_id}", fingerprint=lambda *, order_id, **_: order_id)
    def refund(order_id: str, amount: int) -> None:
        runs.append(order_id)

    with pytest.raises(TypeError, match=r"^fingerprint=<lambda> cannot take this call's"):
        refund("o1", 5)

    from datetime import datetime, timezone

    store = MemoryStore()
    later = datetime(2100, 1, 1, tzinfo=timezone.utc)

    @idempotent(key="s:{order_id}", deadline=lambda *, order_id, **_: later, store=store)
    def ship(order_id: str, amount: int) -> None:
        runs.append(order_id)

    with pytest.raises(TypeError, match=r"^deadline=<lambda> cannot take this call's"):
        ship("o1", 5)
    assert runs == [] and list(store.scan()) == []


def test_a_type_error_inside_the_key_callable_is_its_own() -> None:
    @deco(key=lambda n: "k" + n)
    def fn(n: int) -> None: ...

    with pytest.raises(TypeError, match=r'can only concatenate str \(not "int"\) to str'):
        fn(1)


def test_fingerprint_and_deadline_callables_are_checked_when_decorating() -> None:
    with pytest.raises(TypeError, match=r"fingerprint=<lambda>\(\) for .*\(a\) cannot take"):
        deco(key="k", fingerprint=lambda: 1)(lambda a: None)
    with pytest.raises(TypeError, match=r"deadline=<lambda>\(a, b\) for .*\(a\) cannot take"):
        deco(key="k", deadline=lambda a, b: None)(lambda a: None)


# -- what help(idempotent) shows (issue 13, D) ----------------------------------------------------

OPTIONS = [
    "key",
    "name",
    "store",
    "ttl",
    "fingerprint",
    "wait",
    "lease",
    "on_abandoned",
    "retry_on",
    "deadline",
    "transactional",
    "signing_key",
    "serializer",
]


def test_the_signature_shows_the_public_options_only() -> None:
    """A private positional _misuse parameter showed in help() and inspect.signature()."""
    import inspect

    import idemfn

    parameters = inspect.signature(idemfn.idempotent).parameters
    assert list(parameters) == OPTIONS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_the_docstring_describes_every_option() -> None:
    import pydoc
    import re

    import idemfn

    doc = idemfn.idempotent.__doc__ or ""
    args = doc.partition("\n    Args:\n")[2].partition("\n    Returns:\n")[0]
    described = re.findall(r"^        (\w+): \S", args, flags=re.M)
    assert described == OPTIONS
    assert "\n    Raises:\n        TypeError:" in doc and "See the README" not in doc
    assert "_misuse" not in pydoc.render_doc(idemfn.idempotent)


def test_options_given_positionally_are_refused_with_the_way_out() -> None:
    with pytest.raises(TypeError, match=r"keyword options only: write @idempotent\(key='k:\{x\}'"):
        idempotent("k:{x}")  # type: ignore[call-arg]
