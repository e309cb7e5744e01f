"""idemfn: make a function call happen once.

    from idemfn import idempotent

    @idempotent(key="charge:{order_id}")
    def charge(order_id: str, amount: int) -> Receipt: ...

The first call with a key runs the body and records the outcome; later calls replay it.
"""

from ._decorator import IdempotentFunction, idempotent
from ._engine import Claim, Finished, Policy, abegin, begin
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
from ._record import Record, Status
from ._stores import DiskStore, MemoryStore, Store, default_store, open_store
from ._stores.disk import default_directory
from ._stores.postgres import PostgresStore, current_connection
from ._stores.redis import RedisStore

__all__ = [
    "FINGERPRINT_VERSION",
    "AlreadyRunning",
    "Claim",
    "DeadlineExceeded",
    "DiskStore",
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
    "abegin",
    "begin",
    "current_connection",
    "default_directory",
    "default_store",
    "fingerprint_value",
    "idempotent",
    "open_store",
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
