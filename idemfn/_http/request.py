"""``Request``: what the ``scope``, ``fingerprint`` and ``deadline`` callables are given."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["Headers", "Request"]


class Headers(Mapping[str, str]):
    """A request's headers, looked up by name in any case: ``headers["X-Api-Key"]``.

    ``headers[name]`` and ``get(name)`` give the first value of a repeated header;
    ``getall(name)`` gives every value, in order.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = [(name.lower(), value) for name, value in items]

    def __getitem__(self, name: str) -> str:
        wanted = name.lower()
        for found, value in self._items:
            if found == wanted:
                return value
        raise KeyError(name)

    def getall(self, name: str) -> list[str]:
        """Every value of header ``name``, in the order they came (empty if none)."""
        wanted = name.lower()
        return [value for found, value in self._items if found == wanted]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self._items))

    def __len__(self) -> int:
        return len({name for name, _ in self._items})

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Request:
    """A request as the middleware sees it before the app runs, for the ``scope``,
    ``fingerprint`` and ``deadline`` callables of ``idemfn.asgi`` and ``idemfn.wsgi``
    (``idemfn.django`` gives them Django's own ``HttpRequest``).

    Attributes:
        method: The method, upper case: ``"POST"``.
        path: The path, decoded: ``"/orders"``.
        query: The query string as sent, without the ``?``: ``"a=1&b=2"``.
        headers: The headers (``Headers``: any case, ``getall`` for repeated ones).
        body: The whole body, read before the app runs (at most ``max_request_body`` bytes).
        raw: The ASGI ``scope`` dict, or the WSGI ``environ``.
    """

    __slots__ = ("body", "headers", "method", "path", "query", "raw")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        raw: Mapping[str, Any],
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.raw = raw

    def __repr__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"<Request {self.method} {self.path}{query} ({len(self.body)} bytes)>"
