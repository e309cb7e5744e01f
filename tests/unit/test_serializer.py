"""``serializer=``: "json" (or a user's dumps/loads) stores outcomes without pickle, and a
replay under it never unpickles anything, whatever the store holds."""

from __future__ import annotations

import collections
import enum
import json
import pickle
from pathlib import Path
from typing import Any, ClassVar

import pytest

from idemfn import DiskStore, Halted, MemoryStore, Policy, StoreError, begin, idempotent
from tests.support.cli import cli_env, idemfn_cli
from tests.support.stores import Make


class Unpickled:
    """Creates a file when unpickled: proof that a payload was loaded with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


VALUES = [
    {"id": 7, "lines": [{"sku": "a", "qty": 2}], "note": "naïve ✓", "paid": True, "x": None},
    [1, 2.5, "three", None, [], {}],
    "text",
    0,
    0.0,
    "",
    [],
    {},
    False,
    None,
    10**30,
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_json_replays_every_json_value_and_runs_once(make: Make, value: object) -> None:
    runs: list[object] = []

    def body(x: int) -> object:
        runs.append(x)
        return value

    fn = make(body, serializer="json")
    assert fn(1) == value
    replayed = fn(1)
    assert replayed == value and type(replayed) is type(value) and runs == [1]
    if isinstance(value, (dict, list)) and value:
        assert replayed is not fn(1)  # a fresh copy each time


def test_json_replays_tuples_as_lists(make: Make) -> None:
    fn = make(lambda x: {"pair": (1, 2)}, serializer="json")
    assert fn(1) == {"pair": (1, 2)}  # the first call returns the value itself
    assert fn(1) == {"pair": [1, 2]}  # JSON has no tuples (documented)


_CYCLE: list[object] = []
_CYCLE.append(_CYCLE)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1: "a"}, r"the dict key 1 \(int\) would replay as '1': use str keys"),
        ([{"ok": {None: 1}}], r"the dict key None \(NoneType\) would replay as 'null'"),
        ({(1, 2): "a"}, r"keys must be str, int, float, bool or None, not tuple"),
        ({"when": {1, 2}}, r"Object of type set is not JSON serializable"),
        (Path("/tmp"), r"Object of type PosixPath is not JSON serializable"),
        # Past the digit limit, ints are written another way, which still refuses the rest.
        ([7**6000, _CYCLE], r"Circular reference detected"),
        ([7**6000, {7**6000: 1}], r"cannot store it exactly"),
        ([7**6000, {"when": {1, 2}}], r"Object of type set is not JSON serializable"),
    ],
    ids=[
        "int key",
        "nested None key",
        "tuple key",
        "set",
        "path",
        "long int and a cycle",
        "long int key",
        "long int and a set",
    ],
)
def test_a_value_json_cannot_replay_exactly_halts_the_key(
    make: Make, value: object, message: str
) -> None:
    runs: list[int] = []

    def body(x: int) -> object:
        runs.append(x)
        return value

    fn = make(body, serializer="json")
    with pytest.raises(Halted, match=message):
        fn(1)
    with pytest.raises(Halted, match=message):
        fn(1)
    assert runs == [1]
    record = fn.status(1)
    assert record is not None and record.status == "halted"  # never left processing


def test_json_replays_builtin_exceptions_as_themselves(make: Make) -> None:
    errors: dict[int, Exception] = {
        1: ValueError("bad amount", 3),
        2: KeyError("sku"),
        3: FileNotFoundError(2, "No such file"),
        4: ZeroDivisionError("division by zero"),
    }
    runs: list[int] = []

    def body(n: int) -> None:
        runs.append(n)
        raise errors[n]

    fn = make(body, serializer="json")
    for n, error in errors.items():
        with pytest.raises(type(error)) as first:
            fn(n)
        with pytest.raises(type(error)) as replayed:
            fn(n)
        assert type(replayed.value) is type(error) and replayed.value.args == error.args
        assert replayed.value is not first.value
        assert "replayed from the record" in replayed.value.__notes__[-1]
    assert runs == [1, 2, 3, 4]


class Declined(Exception):
    pass


def test_json_replays_other_exceptions_as_halted_with_type_message_and_traceback(
    make: Make,
) -> None:
    def body(n: int) -> None:
        if n == 1:
            raise Declined("card declined")
        raise ValueError(b"bytes are not JSON")

    fn = make(body, serializer="json")
    with pytest.raises(Declined):
        fn(1)
    with pytest.raises(Halted, match=r"Declined: card declined\): .*replays only builtin") as h:
        fn(1)
    assert h.value.exc_type is not None and h.value.exc_type.endswith("test_serializer.Declined")
    assert h.value.traceback is not None and 'raise Declined("card declined")' in h.value.traceback
    with pytest.raises(ValueError):
        fn(2)
    with pytest.raises(Halted, match="could not be stored as JSON exactly"):
        fn(2)


def test_a_json_function_never_unpickles_a_record(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    marker = tmp_path / "unpickled"

    @idempotent(key="{n}", name="shared", store=store)
    def pickled(n: int) -> object:
        return Unpickled(marker)

    @idempotent(key="{n}", name="shared", store=store, serializer="json")
    def as_json(n: int) -> object:
        raise AssertionError("the body must not run: the key has a record")

    pickled(1)  # recorded with pickle, after loading it back once to check that it loads
    marker.unlink()
    with pytest.raises(StoreError, match=r"holds a pickle, and serializer 'json' never unpickles"):
        as_json(1)
    assert not marker.exists()
    pickled(1)  # the pickle serializer does load it: the marker proves this test can see that
    assert marker.exists()


def test_records_stay_readable_when_a_function_switches_serializer(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")

    @idempotent(key="{n}", name="f", store=store, serializer="json")
    def before(n: int) -> object:
        if n == 2:
            raise KeyError("gone")
        return {"n": n}

    @idempotent(key="{n}", name="f", store=store)
    def after(n: int) -> object:
        raise AssertionError("replayed, never run")

    before(1)
    with pytest.raises(KeyError):
        before(2)
    assert after(1) == {"n": 1}  # pickle reads JSON payloads (they are safe to read)
    with pytest.raises(KeyError):
        after(2)


class Upper:
    """A user's serializer: JSON text, upper-cased, proving its own dumps/loads ran."""

    calls: ClassVar[list[str]] = []

    @classmethod
    def dumps(cls, value: Any) -> str:
        cls.calls.append("dumps")
        return json.dumps(value).upper()

    @classmethod
    def loads(cls, data: bytes) -> Any:
        cls.calls.append("loads")
        return json.loads(data.lower())


def test_any_object_with_dumps_and_loads_is_a_serializer(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    Upper.calls.clear()

    @idempotent(key="{n}", name="u", store=store, serializer=Upper)
    def fn(n: int) -> object:
        return {"word": "abc"}

    assert fn(1) == fn(1) == {"word": "abc"}
    # loads: once to check that what dumps wrote loads back, before recording it; once to replay
    assert Upper.calls == ["dumps", "loads", "loads"]
    assert b"ABC" in (store.get("u:1").payload or b"")  # type: ignore[union-attr]

    @idempotent(key="{n}", name="u", store=store)
    def plain(n: int) -> object:
        return None

    with pytest.raises(StoreError, match="recorded with a custom serializer, not 'pickle'"):
        plain(1)

    class Broken:
        def dumps(self, value: Any) -> int:
            return 42

        def loads(self, data: bytes) -> Any:
            return None

    @idempotent(key="{n}", store=MemoryStore(), serializer=Broken())  # type: ignore[arg-type]
    def broken(n: int) -> object:
        return "x"

    with pytest.raises(Halted, match=r"Broken.dumps\(\) returned int, not bytes or str"):
        broken(1)


@pytest.mark.parametrize("given", ["yaml", "", 42, None, object(), json.dumps])
def test_a_bad_serializer_is_refused_at_decoration(given: Any) -> None:
    with pytest.raises(TypeError, match=r"serializer must be 'pickle', 'json', or an object"):
        idempotent(serializer=given)
    with pytest.raises(TypeError, match="serializer"):
        Policy(serializer=given)


def test_the_low_level_api_and_the_policy_take_the_serializer(tmp_path: Path) -> None:
    policy = Policy(serializer="json")
    assert "serializer='json'" in repr(policy)
    claim = begin("low:1", store=DiskStore(tmp_path / "s"), policy=policy)
    with claim:
        claim.complete([1, "a"])  # type: ignore[union-attr]
    finished = begin("low:1", store=DiskStore(tmp_path / "s"), policy=policy)
    assert finished.replay() == [1, "a"]  # type: ignore[union-attr]
    assert pickle.loads(pickle.dumps(Policy().serializer.name)) == "pickle"


def test_the_command_shows_a_json_value(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")

    @idempotent(key="{n}", name="job", store=store, serializer="json")
    def job(n: int) -> object:
        return {"n": n, "done": True}

    job(1)
    env = cli_env(tmp_path / "store")
    shown = json.loads(idemfn_cli("show", "job:1", "--json", env=env).stdout)
    assert shown["status"] == "ok" and shown["value_repr"] == repr({"n": 1, "done": True})


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file", "/x"),
        ImportError("no module", name="m"),
        AttributeError("no attribute", name="x"),
    ],
    ids=["filename", "import name", "attribute name"],
)
def test_a_builtin_exception_json_cannot_rebuild_exactly_replays_as_halted(
    make: Make, error: Exception
) -> None:
    def body(n: int) -> None:
        raise error

    fn = make(body, serializer="json")
    with pytest.raises(type(error)):
        fn(1)
    with pytest.raises(Halted, match=r"could not be stored as JSON exactly") as halted:
        fn(1)
    assert str(error) in str(halted.value)  # its message is still there, as text


def test_a_class_a_library_put_in_builtins_is_never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from idemfn._outcome import JSON

    built: list[object] = []

    class Planted(Exception):
        def __init__(self, *args: object) -> None:
            built.append(args)

    monkeypatch.setattr(builtins, "Planted", Planted, raising=False)
    with pytest.raises(ValueError, match="not a builtin exception"):
        JSON.load(b'\x00e["Planted", ["x"]]')
    assert built == []
    assert type(JSON.load(b'\x00e["KeyError", ["x"]]')) is KeyError


class Level(enum.IntEnum):
    HIGH = 1


def cycle() -> object:
    loop: list[object] = []
    loop.append(loop)
    return {"loop": loop}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Level.HIGH, r"a tests\.unit\.test_serializer\.Level would replay as a plain int"),
        ({"level": collections.OrderedDict(a=1)}, r"OrderedDict would replay as a plain dict"),
        (cycle(), r"Circular reference"),
    ],
    ids=["IntEnum", "OrderedDict", "cycle"],
)
def test_json_halts_a_subclass_or_a_cycle_instead_of_replaying_it_wrong(
    make: Make, value: object, message: str
) -> None:
    fn = make(lambda n: value, serializer="json")
    for _ in range(2):
        with pytest.raises(Halted, match=message) as halted:
            fn(1)
        assert "serializer='json' cannot store it exactly" in str(halted.value)


# A JSON record crosses processes whose int digit limits differ (issue 14): a 5,000-digit int
# recorded where PYTHONINTMAXSTRDIGITS=0 was a StoreError where the default (4,300) holds, and
# a process with the default limit refused to record it at all.
_LONG_INT_SCRIPT = """
import sys
from idemfn import DiskStore, Halted, idempotent

store = DiskStore(sys.argv[1])
n = 7 ** 6000  # 5,071 digits
value = {"n": n, "more": [-n, 1, True, None, (n,)], "idemfn-int-0": "idemfn-int-0", "s": 5}
runs = []

@idempotent(key="v", name="long", store=store, serializer="json")
def returns():
    runs.append("value")
    return value

@idempotent(key="e", name="long", store=store, serializer="json")
def raises():
    runs.append("exception")
    raise ValueError(n, "declined")

got = returns()
expected = {"n": n, "more": [-n, 1, True, None, [n]], "idemfn-int-0": "idemfn-int-0", "s": 5}
try:
    raises()
except ValueError as exc:
    raised = "ValueError " + str(exc.args == (n, "declined"))
except Halted as exc:
    raised = "Halted"
print(",".join(runs), got in (value, expected), raised, sys.get_int_max_str_digits())
"""


def _run_with_digit_limit(script: Path, store: Path, limit: str | None) -> list[str]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PYTHONINTMAXSTRDIGITS", None)
    if limit is not None:
        env["PYTHONINTMAXSTRDIGITS"] = limit
    done = subprocess.run(
        [sys.executable, str(script), str(store)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    ("writer", "reader"), [("0", None), (None, "0"), ("0", "640"), (None, "640")]
)
def test_a_long_int_recorded_as_json_replays_whatever_each_process_limits(
    tmp_path: Path, writer: str | None, reader: str | None
) -> None:
    script = tmp_path / "long_int.py"
    script.write_text(_LONG_INT_SCRIPT)
    default = "4300"
    wrote = _run_with_digit_limit(script, tmp_path / "store", writer)
    assert wrote == ["value,exception", "True", "ValueError", "True", writer or default]
    read = _run_with_digit_limit(script, tmp_path / "store", reader)
    # A value is recorded whatever the writer's limit. An exception is recorded as itself where
    # its message can be made (str() of a long int obeys the limit), else it replays as Halted.
    replayed = ["ValueError", "True"] if writer == "0" else ["Halted"]
    assert read == ["True", *replayed, reader or default]  # nothing ran: both replayed
