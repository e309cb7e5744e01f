"""``MemoryStore``: records in a dict, for tests and throwaway scripts."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator

from .._record import Entry
from .base import Corrupt, Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Records in this process's memory: shared by its threads, lost when it exits.

    Each process (a ``fork`` child too) has its own records, so a ``MemoryStore`` never
    coordinates processes: use ``DiskStore`` or a server store for that. For tests and
    throwaway scripts; ``store="memory://"`` names one shared by the whole process. Its
    records are objects, never serialised or signed (``signing_key`` is refused).

    Examples:
        >>> from idemfn import MemoryStore, idempotent
        >>> store = MemoryStore()
        >>> @idempotent(key="{n}", name="demo", store=store)
        ... def square(n: int) -> int:
        ...     return n * n
        >>> square(3), [entry.key for entry in store.scan()]
        (9, ['demo:3'])
        >>> store.clear()
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        _stores.add(self)

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held the lock at fork time: the child's copy
        # would stay locked forever.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._entries)} records>)"

    def claim(self, entry: Entry) -> Entry | None:
        with self._lock:
            current = self._entries.get(entry.key)
            if current is not None and not current.is_expired(self.time()):
                return current
            self._entries[entry.key] = entry
            return None

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.is_expired(self.time()):
            return None
        return entry

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        with self._lock:
            current = self._entries.get(key)
            if current is None or current.token != token or current.status != "processing":
                return False
            self._entries[key] = entry
            return True

    def release(self, key: str, token: str) -> bool:
        with self._lock:
            current = self._entries.get(key)
            if current is None or current.token != token or current.status != "processing":
                return False
            del self._entries[key]
            return True

    def delete(self, key: str, token: str | None = None) -> bool:
        with self._lock:
            current = self._entries.get(key)
            if current is None or (token is not None and current.token != token):
                return False
            del self._entries[key]
            # An expired record counts as absent: removing it is tidying, not forgetting.
            return token is not None or not current.is_expired(self.time())

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        # Entries are kept as objects here: none can be corrupt.
        with self._lock:
            entries = [e for k, e in self._entries.items() if k.startswith(prefix)]
        yield from entries

    # Async callers run the primitives inline: a dict under a lock never waits on I/O.
    async def aclaim(self, entry: Entry) -> Entry | None:
        return self.claim(entry)

    async def aget(self, key: str) -> Entry | None:
        return self.get(key)

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        return self.swap(key, token, entry)

    async def arelease(self, key: str, token: str) -> bool:
        return self.release(key, token)

    async def adelete(self, key: str, token: str | None = None) -> bool:
        return self.delete(key, token)

    def clear(self) -> None:
        """Forget every record: every key's next call runs its body again."""
        with self._lock:
            self._entries.clear()


_stores: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
