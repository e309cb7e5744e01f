"""idemfn: make a function call happen once, across retries, duplicates, processes and crashes.

    from idemfn import idempotent

    @idempotent(key="charge:{order_id}")
    def charge(order_id: str, amount: int) -> Receipt: ...

The first call with a key runs the body and records the outcome; later calls with that key
replay it (a fresh copy of the value, or the exception) without running the body, and a call
with the same key but other arguments raises ``FingerprintMismatch``. Records live in a store:
a ``DiskStore`` by default, shared by the machine's processes; a ``RedisStore`` or
``PostgresStore`` when callers run on several machines.

The public names, each with its docstring (``help(idemfn.idempotent)``):

- ``idempotent``, ``IdempotentFunction``: the decorator, and the function it returns;
- ``Store``, ``DiskStore``, ``MemoryStore``, ``RedisStore``, ``PostgresStore``, ``open_store``,
  ``default_store``, ``default_directory``, ``current_connection``,
  ``current_async_connection``: where records live;
- ``Record``, ``Status``: what ``fn.status(...)`` returns;
- ``IdempotencyError`` and its subclasses ``AlreadyRunning``, ``FingerprintMismatch``,
  ``Halted``, ``DeadlineExceeded``, ``OwnershipLost``, ``StoreError``;
- ``begin``, ``abegin``, ``Claim``, ``Finished``, ``Policy``: the low-level API the decorator
  drives, for framework authors;
- ``fingerprint_value``, ``FINGERPRINT_VERSION``: the canonical fingerprint of a value;
- ``subscribe``, ``Event``, ``Subscription``: every decision as an event (``idemfn.events``).

Submodules, imported on their own: ``idemfn.events`` (event names and handlers),
``idemfn.otel`` and ``idemfn.prometheus`` (metrics and traces), ``idemfn.testing``
(``StoreContract``, the store conformance suite), ``idemfn.celery`` and ``idemfn.rq``
(task queue integrations), ``idemfn.asgi``, ``idemfn.wsgi`` and ``idemfn.django`` (the
HTTP ``IdempotencyMiddleware``).
Documentation: https://idemfn.readthedocs.io/
"""

from ._decorator import IdempotentFunction, idempotent
from ._engine import Claim, Finished, abegin, begin
from ._errors import (
    AlreadyRunning,
    DeadlineExceeded,
    FingerprintMismatch,
    Halted,
    IdempotencyError,
    OwnershipLost,
    StoreError,
)
from ._fingerprint import FINGERPRINT_VERSION, fingerprint_value
from ._policy import Policy
from ._record import Record, Status
from ._stores import DiskStore, MemoryStore, Store, default_store, open_store
from ._stores.disk import default_directory
from ._stores.postgres import PostgresStore, current_async_connection, current_connection
from ._stores.redis import RedisStore
from .events import Event, Subscription, subscribe

__all__ = [
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

__version__ = "0.1.0.dev0"

# Show the public path in reprs and tracebacks: idemfn.Halted, not idemfn._errors.Halted.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("idemfn."):
        try:
            _obj.__module__ = "idemfn"
        except (AttributeError, TypeError):
            pass
del _name, _obj
