"""The public API cannot drift by accident."""

from __future__ import annotations

import types

import idemfn


def test_all_is_sorted_and_complete() -> None:
    assert idemfn.__all__ == sorted(idemfn.__all__, key=lambda n: (not n.isupper(), n))
    # Public submodules (idemfn.testing, once imported) are not names of the package's API.
    public = {
        name
        for name in dir(idemfn)
        if not name.startswith("_") and not isinstance(getattr(idemfn, name), types.ModuleType)
    }
    assert public == set(idemfn.__all__)


def test_contract_names_are_exported() -> None:
    for name in [
        "idempotent",
        "DiskStore",
        "MemoryStore",
        "open_store",
        "Record",
        "Status",
        "IdempotencyError",
        "AlreadyRunning",
        "FingerprintMismatch",
        "Halted",
        "DeadlineExceeded",
        "OwnershipLost",
        "StoreError",
        "Store",
    ]:
        assert name in idemfn.__all__, name
    assert [s.value for s in idemfn.Status] == ["processing", "ok", "halted"]


def test_errors_share_one_base_and_carry_the_key() -> None:
    for name in [
        "AlreadyRunning",
        "FingerprintMismatch",
        "Halted",
        "DeadlineExceeded",
        "OwnershipLost",
        "StoreError",
    ]:
        cls = getattr(idemfn, name)
        assert issubclass(cls, idemfn.IdempotencyError)
        assert cls.__module__ == "idemfn"


def test_errors_survive_pickling() -> None:
    import pickle

    error = idemfn.Halted("m", key="k", reason="r", exc_type="E", traceback="tb")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.key, copy.reason, str(copy)) == (idemfn.Halted, "k", "r", "m")


def test_py_typed_ships() -> None:
    from pathlib import Path

    assert (Path(idemfn.__file__).parent / "py.typed").exists()


def test_integration_modules_export_what_they_define() -> None:
    import idemfn.arq
    import idemfn.celery
    import idemfn.dramatiq
    import idemfn.huey
    import idemfn.rq

    assert idemfn.celery.__all__ == ["idempotent_task", "task_id"]
    assert idemfn.rq.__all__ == ["idempotent_job", "job_id"]
    assert idemfn.dramatiq.__all__ == ["idempotent_actor", "message_id"]
    assert idemfn.huey.__all__ == ["idempotent_task", "task_id"]
    assert idemfn.arq.__all__ == ["idempotent_job", "job_id"]
    for queue in ("celery", "rq", "dramatiq", "huey", "arq"):
        assert queue not in idemfn.__all__  # optional parts stay out of the core's namespace


def test_importing_idemfn_imports_no_task_queue() -> None:
    import subprocess
    import sys

    queues = "{'celery', 'rq', 'kombu', 'dramatiq', 'huey', 'arq'}"
    code = f"import sys, idemfn; print(sorted({queues} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_idemfn_imports_no_prometheus_client() -> None:
    import subprocess
    import sys

    code = "import sys, idemfn; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import idemfn.prometheus

    assert idemfn.prometheus.__all__ == ["Instrumentation", "instrument", "multiprocess_registry"]
    assert "prometheus" not in idemfn.__all__


def test_the_public_api_is_exactly_what_it_was() -> None:
    # Issue 15 moved and renamed private modules; what users import must not move with them.
    import inspect

    import idemfn.celery
    import idemfn.rq
    import idemfn.testing

    assert idemfn.__all__ == [
        "FINGERPRINT_VERSION",
        "AlreadyRunning",
        "Claim",
        "DeadlineExceeded",
        "DiskStore",
        "Event",
        "FingerprintMismatch",
        "Finished",
        "Halted",
        "IdempotencyError",
        "IdempotentFunction",
        "MemoryStore",
        "OwnershipLost",
        "Policy",
        "PostgresStore",
        "Record",
        "RedisStore",
        "Status",
        "Store",
        "StoreError",
        "Subscription",
        "abegin",
        "begin",
        "current_async_connection",
        "current_connection",
        "default_directory",
        "default_store",
        "fingerprint_value",
        "idempotent",
        "open_store",
        "subscribe",
    ]
    assert idemfn.testing.__all__ == ["StoreContract"]
    assert idemfn.celery.__all__ == ["idempotent_task", "task_id"]
    assert idemfn.rq.__all__ == ["idempotent_job", "job_id"]
    # idempotent's options are pinned by tests/unit/test_keys.py (OPTIONS).
    assert list(inspect.signature(idemfn.Policy).parameters) == [
        "ttl",
        "lease",
        "wait",
        "on_abandoned",
        "retry_on",
        "serializer",
    ]
    for name in ["attempt", "complete", "fail", "halt", "key", "release", "renew", "token"]:
        assert hasattr(idemfn.Claim, name), name
    for name in ["claim", "get", "swap", "release", "delete", "scan", "prune", "time", "close"]:
        assert callable(getattr(idemfn.Store, name)), name
    for name in ["forget", "key_for", "status", "subscribe"]:
        assert hasattr(idemfn.IdempotentFunction, name), name
    assert idemfn.__version__


def test_importing_idemfn_imports_no_opentelemetry() -> None:
    # idemfn[otel] is an extra: only ``import idemfn.otel`` brings the OpenTelemetry API in.
    import subprocess
    import sys

    code = "import sys, idemfn; print(sorted(m for m in sys.modules if 'opentelemetry' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import idemfn.otel

    assert idemfn.otel.__all__ == ["Instrumentation", "instrument"]
    assert "otel" not in idemfn.__all__
