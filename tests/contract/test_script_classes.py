"""A script's own classes (its ``__main__``) replay as themselves in the script's next run.

cloudpickle stores them by value, so a new process used to rebuild look-alike classes: the
second run's ``except PaymentDeclined:`` missed the replayed exception, and a returned dataclass
failed ``isinstance`` and ``==`` (issue 13, A5). Each test runs real scripts in new processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.cli import cli_env, idemfn_cli

SCRIPT = """
import enum, json, sys, threading
from dataclasses import dataclass
from idemfn import DiskStore, idempotent

class PaymentDeclined(Exception):
    pass

class ApiError(Exception):  # __init__ takes other arguments than it passes to Exception
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail

@dataclass(frozen=True)
class Receipt:
    order: str
    cents: int

class Outer:
    @dataclass
    class Line:
        sku: str

class Color(enum.Enum):
    RED = 1

class Holder:  # its class attribute cannot be pickled: stored by name only
    lock = threading.Lock()

store = DiskStore(sys.argv[1])
ran = []

@idempotent(key="{order}", name="script.charge", store=store)
def charge(order):
    ran.append("charge")
    return Receipt(order, 250)

@idempotent(key="{order}", name="script.pay", store=store)
def pay(order):
    ran.append("pay")
    raise PaymentDeclined(order)

@idempotent(key="{order}", name="script.api", store=store)
def api(order):
    ran.append("api")
    raise ApiError(402, order)

@idempotent(key="{order}", name="script.mixed", store=store)
def mixed(order):
    ran.append("mixed")
    return {"color": Color.RED, "line": Outer.Line("a"), "receipts": [Receipt(order, 1)] * 2}

@idempotent(key="{order}", name="script.holder", store=store)
def holder(order):
    ran.append("holder")
    return Holder()

out = {}
receipt = charge("o-1")
out["receipt"] = [isinstance(receipt, Receipt), receipt == Receipt("o-1", 250)]
try:
    pay("o-1")
except PaymentDeclined as exc:
    out["declined"] = list(exc.args)
except Exception as exc:
    out["declined"] = f"missed {type(exc).__module__}.{type(exc).__name__}: {exc}"
try:
    api("o-1")
except ApiError as exc:
    out["api"] = [exc.code, exc.detail, str(exc)]
except Exception as exc:
    out["api"] = f"missed {type(exc).__module__}.{type(exc).__name__}: {exc}"
m = mixed("o-1")
out["mixed"] = [
    m["color"] is Color.RED,
    isinstance(m["line"], Outer.Line) and m["line"] == Outer.Line("a"),
    m["receipts"] == [Receipt("o-1", 1)] * 2,
    m["receipts"][0] is m["receipts"][1],  # one object twice stays one object
]
try:
    out["holder"] = isinstance(holder("o-1"), Holder)
except Exception as exc:
    out["holder"] = f"failed {type(exc).__name__}: {exc}"
out["ran"] = ran
print(json.dumps(out))
"""

# Another program on the same store, which defines none of the script's classes.
OTHER = """
import json, sys
from idemfn import DiskStore, StoreError, idempotent

store = DiskStore(sys.argv[1])

def replay(name):
    @idempotent(key="{order}", name=name, store=store)
    def never(order):
        raise AssertionError("the record exists: replayed, never run")
    return never("o-1")

out = {}
receipt = replay("script.charge")
out["receipt"] = [type(receipt).__module__, type(receipt).__name__, receipt.order, receipt.cents]
try:
    replay("script.api")
except Exception as exc:
    out["api"] = [type(exc).__name__, exc.code, exc.detail, str(exc)]
try:
    replay("script.holder")
except StoreError as exc:
    out["holder"] = str(exc)
print(json.dumps(out))
"""

FIRST_RUN = ["charge", "pay", "api", "mixed", "holder"]


def run_script(path: Path, store: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(path), str(store)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_scripts_next_run_replays_its_own_classes(tmp_path: Path) -> None:
    script = tmp_path / "payments.py"
    script.write_text(SCRIPT)
    store = tmp_path / "store"
    expected = {
        "receipt": [True, True],
        "declined": ["o-1"],
        "api": [402, "o-1", "402: o-1"],
        "mixed": [True, True, True, True],
        "holder": True,
    }
    # Two runs, two processes: the second replays every call.
    runs = [run_script(script, store) for _ in range(2)]
    assert [run["ran"] for run in runs] == [FIRST_RUN, []]
    for item, value in expected.items():
        assert [run[item] for run in runs] == [value, value], item


def test_a_program_without_the_scripts_classes_loads_their_stored_copies(
    tmp_path: Path,
) -> None:
    script = tmp_path / "payments.py"
    script.write_text(SCRIPT)
    store = tmp_path / "store"
    run_script(script, store)
    other = tmp_path / "inspect_records.py"
    other.write_text(OTHER)
    seen = run_script(other, store)
    assert seen["receipt"] == ["__main__", "Receipt", "o-1", 250]  # its copy, by value
    assert seen["api"] == ["ApiError", 402, "o-1", "402: o-1"]
    # A class stored by name only cannot be found here: the replay says so, nothing wrong.
    assert "could not be loaded" in seen["holder"]
    assert "Holder of the recording script's __main__ is not defined" in seen["holder"]
    shown = idemfn_cli("show", "script.charge:o-1", "--json", env=cli_env(store)).stdout
    assert json.loads(shown)["value_repr"] == "Receipt(order='o-1', cents=250)"


# A script's classes seen from a multiprocessing "spawn" (or forkserver) child: there the script
# runs as __mp_main__, and plain pickle wrote its classes by reference to that module, which
# only a process that imported multiprocessing has. The record was ok, and every replay in the
# script's next run (without multiprocessing) or in another program failed with StoreError.
SPAWNING = """
import sys
from dataclasses import dataclass
from idemfn import DiskStore, idempotent

@dataclass(frozen=True)
class Receipt:
    order: str

class Declined(Exception):
    def __init__(self, order, why):
        super().__init__(f"{order}: {why}")
        self.order, self.why = order, why

store = DiskStore(sys.argv[1])

@idempotent(key="{order}", name="spawned.charge", store=store)
def charge(order):
    return {"receipt": Receipt(order), "note": "charged"}

@idempotent(key="{order}", name="spawned.pay", store=store)
def pay(order):
    raise Declined(order, "card")

def both(order):
    out = [charge(order)["receipt"].order]
    try:
        pay(order)
    except Declined as exc:
        out.append(exc.why)
    return out

if __name__ == "__main__":
    if sys.argv[2] == "spawn":
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            print(pool.apply(both, ("o-1",)))
    else:
        import json
        out = {"multiprocessing": "multiprocessing" in sys.modules}
        receipt = charge("o-1")["receipt"]
        out["receipt"] = [isinstance(receipt, Receipt), receipt == Receipt("o-1")]
        try:
            pay("o-1")
        except Declined as exc:
            out["declined"] = [exc.order, exc.why]
        except Exception as exc:
            out["declined"] = f"missed {type(exc).__module__}.{type(exc).__name__}: {exc}"
        print(json.dumps(out))
"""

OTHER_SPAWNED = """
import json, sys
from idemfn import DiskStore, idempotent

store = DiskStore(sys.argv[1])

@idempotent(key="{order}", name="spawned.charge", store=store)
def never(order):
    raise AssertionError("the record exists: replayed, never run")

receipt = never("o-1")["receipt"]
print(json.dumps([type(receipt).__name__, receipt.order]))
"""


def test_classes_recorded_in_a_spawned_child_replay_in_the_scripts_next_run(
    tmp_path: Path,
) -> None:
    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING)
    store = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, str(script), str(store), "spawn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['o-1',", "'card']"]
    # The next run replays, in a process that never imported multiprocessing.
    done = subprocess.run(
        [sys.executable, str(script), str(store), "replay"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr  # before the fix: StoreError, No module '__mp_main__'
    assert json.loads(done.stdout) == {
        "multiprocessing": False,
        "receipt": [True, True],
        "declined": ["o-1", "card"],
    }
    other = tmp_path / "other.py"
    other.write_text(OTHER_SPAWNED)
    assert run_script(other, store) == ["Receipt", "o-1"]  # its copy, by value


# The pickled exception of a class of the recording script's __main__, as idemfn wrote it on
# 2026-11-27 (``describe_exception(Declined("no", 3))`` in a script): it names
# ``idemfn._outcome._main_class``, which must keep its module, name and arguments, or every
# such record already written stops loading.
_DECLINED_BY_A_SCRIPT = bytes.fromhex(
    "80059531010000000000008c0f6964656d666e2e5f6f7574636f6d65948c0b5f6d61696e5f636c6173739493"
    "948c084465636c696e65649443f1800595e6000000000000008c17636c6f75647069636b6c652e636c6f7564"
    "7069636b6c65948c145f6d616b655f736b656c65746f6e5f636c617373949394288c086275696c74696e7394"
    "8c04747970659493948c084465636c696e65649468038c09457863657074696f6e94939485947d948c0a5f5f"
    "6d6f64756c655f5f948c085f5f6d61696e5f5f94738c20366566343436396635376332343633393833626436"
    "6362363661316566376333944e7494529468008c0f5f636c6173735f7365747374617465949394680f7d9428"
    "8c075f5f646f635f5f944e8c0a5f5f6d6f64756c655f5f94680c757d9486948652302e94869452948c026e6f"
    "944b03869481942e"
)


def test_a_script_class_exception_recorded_earlier_still_loads() -> None:
    from idemfn._outcome import load

    exc = load(_DECLINED_BY_A_SCRIPT)
    assert isinstance(exc, Exception)
    assert type(exc).__qualname__ == "Declined" and exc.args == ("no", 3)
