"""Stores, and how a path, URL or ``IDEMFN_STORE`` becomes one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .._signing import Signer, SigningKey, signer_for
from .base import Store
from .disk import DiskStore, default_directory
from .memory import MemoryStore

__all__ = [
    "DiskStore",
    "MemoryStore",
    "Store",
    "default_store",
    "locate",
    "open_store",
    "resolve_store",
]

ENV_VAR = "IDEMFN_STORE"
# Redis through Sentinel (issue 19): the master that Sentinel names, followed through failovers.
#: The schemes of a RedisStore's URL: one server, one through Sentinel, a cluster.
_REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)

_lock = threading.Lock()
_opened: dict[tuple[str, Path | str, Signer | None], Store] = {}
_memory_store: MemoryStore | None = None


def open_store(
    url_or_path: str | os.PathLike[str] | Store, *, signing_key: SigningKey | None = None
) -> Store:
    """The store a path or URL names.

    A directory path (or ``file://`` URL) gives a ``DiskStore``, one per absolute path in
    this process; ``memory://`` gives this process's ``MemoryStore``; ``redis://``, ``rediss://``
    and ``unix://`` give a ``RedisStore`` (``redis+sentinel://`` and ``rediss+sentinel://`` one
    that follows the master Sentinel names; ``redis+cluster://host:port[,host:port...]`` and
    ``rediss+cluster://`` one on a Redis Cluster), ``postgresql://`` and ``postgres://`` a
    ``PostgresStore``, one per URL (``?connect_timeout=S`` bounds how long a call waits for an
    unreachable server; default 5 s). A ``Store`` is returned as is.

    Args:
        url_or_path: A directory (``str`` or path-like), a URL of one of the schemes above, or a
            ``Store``, returned as it is.
        signing_key: Signs and checks the records of the store opened (default: the keys in
            ``IDEMFN_SIGNING_KEY``, if set); one store is opened per path or URL and set of
            keys.

    Returns:
        The store, shared by every caller in this process that names the same path or URL
        with the same keys.

    Raises:
        TypeError: ``url_or_path`` is neither a path, a URL nor a ``Store``.
        ValueError: An unknown URL scheme, an empty path, a store whose client library is not
            installed (the message names the extra to install), ``signing_key`` with
            ``memory://`` or a ``MemoryStore``, a ``Store`` made with other keys, or a signing
            key that is too short.
        StoreError: The store cannot be opened (a directory that cannot be created, or whose
            way another user could change).
    """
    global _memory_store
    if isinstance(url_or_path, Store):
        if signing_key is not None:
            _check_signer(url_or_path, signing_key, option="open_store(signing_key=...)")
        return url_or_path
    kind, where = locate(url_or_path)
    if kind == "memory":
        if signing_key is not None:
            raise ValueError(
                "signing_key: a memory:// store keeps records in this process: there is"
                " nothing to sign"
            )
        with _lock:
            if _memory_store is None:
                _memory_store = MemoryStore()
            return _memory_store
    signer = signer_for(signing_key, option="signing_key")
    with _lock:
        store = _opened.get((kind, where, signer))
        if store is None:
            store = _open(kind, where, signing_key)
            _opened[(kind, where, signer)] = store
        return store


def _open(kind: str, where: Path | str, signing_key: SigningKey | None) -> Store:
    if kind == "disk":
        return DiskStore(where, signing_key=signing_key)
    # Each imports its client library only when a store needs it.
    url = str(where)
    if kind == "redis":
        from .redis import RedisStore

        try:
            return RedisStore(url, signing_key=signing_key)
        except ImportError:
            raise ValueError(
                f"store URL {url!r} needs redis-py: pip install 'idemfn[redis]'"
            ) from None
    from .postgres import PostgresStore

    try:
        return PostgresStore(url, signing_key=signing_key)
    except ImportError:
        raise ValueError(
            f"store URL {url!r} needs psycopg 3: pip install 'idemfn[postgres]'"
        ) from None


def locate(url_or_path: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """What a path or URL names: ("disk", absolute directory), ("memory", ""), ("redis", URL)
    or ("postgres", URL).

    Raises ``TypeError``/``ValueError`` for anything that names no store this version has.
    """
    if not isinstance(url_or_path, (str, os.PathLike)):
        raise TypeError(
            "open_store() takes a directory path, a store URL or a Store, not "
            f"{type(url_or_path).__name__}"
        )
    text = os.fspath(url_or_path)
    if not text.strip():
        raise ValueError("open_store() got an empty path or URL")
    scheme, sep, rest = text.partition("://")
    if sep and _is_scheme(scheme):
        scheme = scheme.lower()
        if scheme == "memory":
            return "memory", ""
        if scheme in _REDIS_SCHEMES:
            return "redis", text
        if scheme in ("postgresql", "postgres"):
            return "postgres", text
        if scheme == "file":
            text = rest
        else:
            raise ValueError(
                f"unknown store URL scheme {scheme!r} in {text!r}: expected a directory path,"
                f" file://, memory://, {''.join(f'{s}://, ' for s in _REDIS_SCHEMES)}"
                "postgresql:// or postgres://"
            )
    return "disk", _absolute(Path(text).expanduser())


def _is_scheme(text: str) -> bool:
    """Whether ``text``, before a ``://``, is a URL scheme: a name, or names joined by ``+``
    (``redis+cluster``). Anything else (``./a``, ``C:\\x``, ``a.b``, ``~/x``) is a path."""
    return all(part.isidentifier() for part in text.split("+"))


def _absolute(path: Path) -> Path:
    """``path`` made absolute, with its links left in: the ``DiskStore`` resolves them when it
    opens, checking who may change each one (issue 14: resolved here, a link that another user
    owns went unseen). A ``..`` is applied here only where that takes no link: after a
    directory, or a name that does not exist (``~/../x`` without a home directory)."""
    kept: list[str] = []
    for part in path.absolute().parts:
        if part != "..":
            kept.append(part)
        elif len(kept) > 1 and kept[-1] != ".." and not os.path.islink(os.path.join(*kept)):
            kept.pop()
        elif len(kept) > 1:
            kept.append(part)  # after a link: the store resolves it
    return Path(*kept)


def default_store(*, signing_key: SigningKey | None = None) -> Store:
    """The store used when ``@idempotent`` is given none.

    ``IDEMFN_STORE`` (a directory or URL) if set, else a ``DiskStore`` in the user's state
    directory (see ``default_directory()``).

    Args:
        signing_key: As ``open_store`` takes it.

    Returns:
        The store, opened as ``open_store`` opens it.

    Raises:
        TypeError: As ``open_store``; the message starts with ``IDEMFN_STORE=...`` when the
            variable named the store.
        ValueError: As ``open_store``, likewise.
        StoreError: As ``open_store``.
    """
    configured = os.environ.get(ENV_VAR, "").strip()
    try:
        return open_store(configured or default_directory(), signing_key=signing_key)
    except (TypeError, ValueError) as exc:
        where = f"{ENV_VAR}={configured!r}" if configured else "the default store"
        raise type(exc)(f"{where}: {exc}") from None


def _check_signer(store: Store, signing_key: SigningKey, *, option: str) -> None:
    if isinstance(store, MemoryStore):
        raise ValueError(
            f"{option}: a MemoryStore keeps records in this process's memory, where nobody else"
            " can write them: there is nothing to sign, drop signing_key="
        )
    if store.signer != signer_for(signing_key, option=option):
        raise ValueError(
            f"{option} signs the records of a store opened from a path or URL, but {store!r}"
            f" is a store already made, with {'other' if store.signer else 'no'} signing keys:"
            f" give signing_key= to the store itself, e.g. {type(store).__name__}(...,"
            " signing_key=...)"
        )


def resolve_store(
    store: Store | str | os.PathLike[str] | None,
    *,
    option: str,
    signing_key: SigningKey | None = None,
) -> Store:
    """``store=`` (and ``signing_key=``) as the decorator and ``begin`` take them; errors name
    ``option``."""
    if isinstance(store, Store):
        if signing_key is not None:
            _check_signer(store, signing_key, option="signing_key")
        return store
    if store is None:
        return default_store(signing_key=signing_key)
    try:
        return open_store(store, signing_key=signing_key)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{option}: {exc}") from None
