"""Behind a pooler in transaction mode (PgBouncer's ``pool_mode = transaction``, pgcat,
Supavisor, RDS Proxy): the ``transaction_pooling`` option (issue 19).

Such a pooler lends a server connection to a client for one transaction, then to another
client: whatever a session keeps beyond a transaction stays on the server connection, for
whoever gets it next, and the client may never see it again. Without the option the store keeps
three such things: psycopg's prepared statements (after a statement's 5th execution on a
connection: ``_pg3_0`` then "does not exist" on another server connection, or "already exists"
where another client prepared its own ``_pg3_0``), the wake-ups' ``LISTEN`` and the waiters'
session advisory locks (``listen.py``: a mark left held on a server connection makes every
later settle of its key NOTIFY for nobody). With it, every connection the store makes has
``prepare_threshold=None`` (``PostgresStore._own_pool_kwargs``, ``_session_args``), and watches
are the default ones (polled by their caller): nothing outlives a transaction.
"""

from __future__ import annotations

import re
from typing import Any

#: The connection string's parameter that turns the option on (stripped before libpq, which
#: refuses parameters it does not know).
PARAMETER = "transaction_pooling"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# One ``key = value`` pair of a key=value connection string (libpq's rules): the value quoted
# ('...', with \' and \\ inside) or up to the next space. Matched pair after pair from the
# start, so that a quoted value holding "transaction_pooling=" is never taken for the key.
_PAIR = re.compile(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|(?:[^\s'\\]|\\.)*)\s*")

#: SQLSTATEs a pooler in transaction mode gives psycopg's prepared statements: 26000
#: (invalid_sql_statement_name: "prepared statement ... does not exist") and 42P05
#: (duplicate_prepared_statement: "... already exists").
_PREPARED_LOST = {"26000", "42P05"}


def split(dsn: str) -> tuple[str, bool]:
    """``dsn`` without its ``transaction_pooling`` parameter (a URL's query parameter, or a
    ``key=value`` one), and whether that parameter turned the option on."""
    if PARAMETER not in dsn:
        return dsn, False
    if "://" in dsn:
        base, sep, query = dsn.partition("?")
        if not sep:
            return dsn, False
        kept, value = [], None
        for item in query.split("&"):
            name, _, given = item.partition("=")
            if name == PARAMETER:
                value = given
            elif item:
                kept.append(item)
        if value is None:
            return dsn, False
        return (f"{base}?{'&'.join(kept)}" if kept else base), _truth(value)
    kept, value, at = [], None, 0
    while at < len(dsn):
        pair = _PAIR.match(dsn, at)
        if pair is None or pair.end() == at:
            return dsn, False  # not key=value pairs: libpq will say what is wrong
        if pair.group(1) == PARAMETER:
            value = pair.group(2)
        else:
            kept.append(pair.group(0).strip())
        at = pair.end()
    if value is None:
        return dsn, False
    unquoted = value[1:-1] if value.startswith("'") else value
    return " ".join(kept), _truth(unquoted.replace("\\'", "'").replace("\\\\", "\\"))


def _truth(value: str) -> bool:
    from urllib.parse import unquote

    text = unquote(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"the {PARAMETER} parameter of the connection string must be true or false, not"
        f" {value!r}: true when the store connects through a pooler in transaction mode"
        " (PgBouncer's pool_mode = transaction)"
    )


def check_pool_kwargs(kwargs: Any, kind: str) -> None:
    """With ``transaction_pooling``, a given pool's connections must not prepare statements:
    ``ValueError`` unless its ``kwargs`` set ``prepare_threshold=None`` (a function giving the
    kwargs is the caller's to get right: it is called per connection)."""
    if callable(kwargs):
        return
    if (kwargs or {}).get("prepare_threshold", 5) is not None:
        raise ValueError(
            f"PostgresStore(transaction_pooling=True) was given a psycopg_pool.{kind} whose"
            " connections prepare statements (psycopg's default, after a statement's 5th"
            " execution), which a pooler in transaction mode loses between transactions:"
            f" make it with kwargs={{..., 'prepare_threshold': None}}"
        )


def hint(exc: BaseException) -> str:
    """What a ``StoreError`` adds after ``exc`` when it looks like a prepared statement lost
    by a pooler in transaction mode; "" otherwise (read on the error path only)."""
    if getattr(exc, "sqlstate", None) not in _PREPARED_LOST or "_pg3_" not in str(exc):
        return ""
    return (
        " (behind a pooler in transaction mode, such as PgBouncer's pool_mode = transaction?"
        " psycopg's prepared statements do not survive it: pass"
        " PostgresStore(..., transaction_pooling=True), or ?transaction_pooling=true in the"
        " store's URL)"
    )
