"""The store's SQL, and the names it derives from the table's: its statements (``_statements``),
its lease table, its channel and advisory-lock mark, a settle's NOTIFY payload; the steps
a primitive is written in (``_Query``, ``_NOW``: see ``PostgresStore._drive``); what a row
or a result reads as.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Generator
from typing import Any, NamedTuple, TypeVar

from ..._errors import StoreError
from ..._record import Entry

T = TypeVar("T")

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


#: A key longer than this (in characters) is NOTIFYed as its SHA-256: NOTIFY's payload must be
#: shorter than 8000 bytes (less on a server built with smaller pages), 4 bytes a character.
_PAYLOAD_CHARS = 1000


class _Query(NamedTuple):
    """A step of a primitive (see ``_drive``): run ``query`` with ``params`` (on ``conn``, else
    a pooled connection); its rows, or its row count, are sent back. Errors name ``key``."""

    action: str
    key: str | None
    query: str
    params: Any
    conn: Any = None


#: A step of a primitive: read the store's clock (``time()``, or ``await atime()``).
_NOW = object()

#: A primitive, written once: a generator of ``_Query`` and ``_NOW`` steps, which returns the
#: primitive's result. ``_drive`` runs it for sync callers, ``_adrive`` for async ones.
_Steps = Generator[Any, Any, T]


def _leases_table(table: str) -> str:
    """The name of ``table``'s lease table: ``<table>_leases``, or for a name too long for that
    (PostgreSQL cuts names at 63 bytes) a cut one made unique by a hash of the whole."""
    name = f"{table}_leases"
    return name if len(name) <= 63 else f"{table[:46]}_{zlib.crc32(table.encode()):08x}_leases"


def _renewed(entry: Entry, until: float | None, mono: float | None) -> Entry:
    """``entry`` with the lease of its live claim's lease row (``until``, ``mono``): each end the
    later of the two, each on its own clock. ``until`` (the server's clock) judges the owner
    from other machines, ``mono`` (its machine's lease clock) on its own: a server clock set
    back since the claim must not hide a renewal from the judges of the owner's machine."""
    later_until = until is not None and (entry.lease_until is None or until > entry.lease_until)
    later_mono = mono is not None and (entry.lease_mono is None or mono > entry.lease_mono)
    if not (later_until or later_mono):
        return entry
    return entry._replace(
        lease_until=until if later_until else entry.lease_until,
        lease_mono=mono if later_mono else entry.lease_mono,
    )


def _statements(table: str, leases: str) -> dict[str, str]:
    t = f'"{table}"'  # checked against _TABLE_NAME: a plain name, safe to quote
    lt = f'"{leases}"'
    now = "extract(epoch from clock_timestamp())"
    # The last condition of each settling write (see the package's docstring): true, and a
    # NOTIFY when the key is watched, that is when its transaction cannot take the key's mark.
    # Last: PostgreSQL evaluates a row's conditions cheapest first and stops at the first false,
    # so it runs on the row written only (were it not, a waiter would be woken for nothing).
    # Computed by the server from the row's key: the write takes no more parameters than it did.
    payload = (
        f"CASE WHEN length({t}.key) <= {_PAYLOAD_CHARS} THEN {t}.key ELSE 'sha256:' ||"
        f" encode(sha256(convert_to({t}.key, 'UTF8')), 'hex') END"
    )
    wake = (
        f"CASE WHEN pg_try_advisory_xact_lock({_table_mark(table)}, hashtext({t}.key)) THEN true"
        f" ELSE pg_notify('{_channel(table)}', {payload}) IS NOT NULL END"
    )
    return {
        "create": f"CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, live text, token text"
        " NOT NULL, expires_at float8, drop_at float8, entry bytea NOT NULL)",
        "index": f'CREATE INDEX IF NOT EXISTS "{table}_drop_at" ON {t} (drop_at)'
        " WHERE drop_at IS NOT NULL",
        "create_leases": f"CREATE TABLE IF NOT EXISTS {lt} (key text NOT NULL, token text NOT"
        " NULL, lease_until float8 NOT NULL, lease_mono float8, PRIMARY KEY (key, token))",
        "now": f"SELECT {now}",
        # One row written when it claimed. Refused, the caller reads the row that holds the
        # key: a claim that wins (a first call: the engine read the key first) returns no more.
        "claim": f"INSERT INTO {t} AS r (key, live, token, expires_at, drop_at, entry) VALUES"
        " (%(key)s, %(live)s, %(token)s, %(expires_at)s, %(drop_at)s, %(entry)s)"
        " ON CONFLICT (key) DO UPDATE SET live = EXCLUDED.live, token = EXCLUDED.token,"
        " expires_at = EXCLUDED.expires_at, drop_at = EXCLUDED.drop_at, entry = EXCLUDED.entry"
        f" WHERE r.expires_at <= {now} AND r.drop_at = r.expires_at",
        "get": f"SELECT entry FROM {t} WHERE key = %s",
        "lease": f"SELECT lease_until, lease_mono FROM {lt} WHERE key = %s AND token = %s",
        # A takeover (a claim written over a claim): its lease row goes, nobody is woken.
        "take": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(fence)s) UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at ="
        " %(expires_at)s, drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND"
        f" live = %(fence)s",
        # The settling writes, which wake the key's watchers (wake).
        "swap": f"UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at = %(expires_at)s,"
        f" drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND live = %(fence)s"
        f" AND {wake}",
        "swap_tidy": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(fence)s) UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at ="
        " %(expires_at)s, drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND"
        f" live = %(fence)s AND {wake}",
        "release": f"DELETE FROM {t} WHERE key = %(key)s AND live = %(token)s AND {wake}",
        "release_tidy": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(token)s) DELETE FROM {t} WHERE key = %(key)s AND live = %(token)s AND {wake}",
        "delete": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND (%(token)s::text IS"
        f" NULL OR token = %(token)s)) DELETE FROM {t} WHERE key = %(key)s"
        f" AND (%(token)s::text IS NULL OR token = %(token)s) AND {wake} RETURNING expires_at",
        "renew": f"INSERT INTO {lt} (key, token, lease_until, lease_mono) SELECT %(key)s::text,"
        f" %(token)s::text, {now} + %(lease)s::float8, %(mono)s::float8 WHERE EXISTS (SELECT"
        f" FROM {t} WHERE key = %(key)s AND live = %(token)s) ON CONFLICT (key, token) DO UPDATE"
        " SET lease_until = EXCLUDED.lease_until, lease_mono = EXCLUDED.lease_mono"
        " RETURNING lease_until",
        "tidy": f"DELETE FROM {lt} WHERE key = %s AND token = %s",
        "keys": f"SELECT key FROM {t} WHERE starts_with(key, %s) ORDER BY key",
        # A batch of at most %(batch)s expired rows, found through the drop_at index: the
        # time is %(until)s, a reading of the server's clock taken before (a parameter, where
        # clock_timestamp(), volatile, kept the planner off the index: a whole-table scan).
        # Both copies compared in the row, and again when a row is deleted (a claim may have
        # replaced it since the subquery read it: the outer conditions are rechecked on the
        # row's newest version): an index scan does not read the row's drop_at again. The stale
        # query also reads finished rows whose copies disagree, to judge them by their record.
        # A batch: how many rows it picked, and how many of those it removed (a row claimed
        # after the pick is checked again by the DELETE, on its newest version, and stays).
        "prune": f"WITH picked AS (SELECT key FROM {t} WHERE drop_at IS NOT NULL"
        " AND drop_at < %(until)s AND live IS NULL AND drop_at = expires_at AND expires_at <"
        f" %(until)s ORDER BY drop_at LIMIT %(batch)s), gone AS (DELETE FROM {t} WHERE key IN"
        " (SELECT key FROM picked) AND drop_at IS NOT NULL AND drop_at < %(until)s AND live IS"
        " NULL AND drop_at = expires_at AND expires_at < %(until)s RETURNING 1)"
        " SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM gone)",
        "stale": f"SELECT key FROM {t} WHERE drop_at IS NOT NULL AND drop_at < {now}"
        " AND live IS NOT NULL OR live IS NULL AND drop_at IS DISTINCT FROM expires_at",
        "fence": f"SELECT live, entry FROM {t} WHERE key = %s",
        # Whether the row is exactly the one written (a write sent again after its connection
        # was lost: _fenced). A write of the same values, not a read: its commit waits, as
        # every write's, for a synchronous standby to have everything before it.
        "landed": f"UPDATE {t} SET entry = entry WHERE key = %(key)s AND live IS NOT DISTINCT"
        " FROM %(live)s AND entry = %(entry)s",
        "delete_row": f"DELETE FROM {t} WHERE key = %s AND entry = %s",
        "prune_leases": f"DELETE FROM {lt} l WHERE l.lease_until < {now} AND NOT EXISTS"
        f" (SELECT FROM {t} r WHERE r.key = l.key AND r.live = l.token)",
        # Each table's and, for a table made PARTITION BY HASH (key) (docs/scaling.md), its
        # partitions': a partitioned table's own size is 0.
        "size": "SELECT sum(pg_total_relation_size(p.r)) FROM (VALUES"
        " (quote_ident(%s)::regclass), (quote_ident(%s)::regclass)) AS v(t), LATERAL (SELECT"
        " v.t UNION SELECT relid FROM pg_partition_tree(v.t)) AS p(r)",
        "listen": f'LISTEN "{_channel(table)}"',
    }


def _channel(table: str) -> str:
    """The channel the settles of ``table``'s keys are notified on: ``<table>_settled``, or for
    a name too long for that (a channel is a name: 63 bytes) a cut one made unique by a hash."""
    name = f"{table}_settled"
    return name if len(name) <= 63 else f"{table[:45]}_{zlib.crc32(table.encode()):08x}_settled"


def _table_mark(table: str) -> int:
    """The first half of the advisory locks that mark ``table``'s keys watched (the second is
    the key's ``hashtext``): its CRC-32 as an int4. Two int4, a space apart from the one-bigint
    locks applications most often take, and from the tables' own. Keys whose hashes collide
    only wake each other's waiters."""
    crc = zlib.crc32(table.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _payload(key: str) -> str:
    """What a settle of ``key`` NOTIFYs, as the server computes it (``_statements``)."""
    if len(key) <= _PAYLOAD_CHARS:
        return key
    return f"sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def _rows(cur: Any) -> Any:
    """A cursor's rows, or its row count when the statement returns none (told by its
    result's fields: ``cur.description`` builds a list of columns, ~2 µs a call)."""
    if not cur.pgresult.nfields:
        return cur.rowcount
    return cur.fetchall()


async def _result(cur: Any) -> Any:
    """An async cursor's rows, or its row count when the statement returns none (told by its
    result's fields: ``cur.description`` builds a list of columns, ~2 µs a call)."""
    if not cur.pgresult.nfields:
        return cur.rowcount
    return await cur.fetchall()


def _too_long_for_the_index(exc: StoreError) -> bool:
    """Whether ``exc`` is PostgreSQL refusing a key too long for the primary key's btree."""
    import psycopg

    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.ProgramLimitExceeded) and "index row" in str(cause)
