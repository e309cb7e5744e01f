"""``PostgresStore``: records in one PostgreSQL table, shared by every machine that reaches it.

    key text PRIMARY KEY   the stored key
    live text              the token of a live claim, NULL once finished: the fence
    token text             the entry's token, whatever its status (delete on a token)
    expires_at float8      when a finished record counts as absent, server UNIX seconds
    drop_at float8         when prune may remove the row (expiry, or an abandoned claim's
                           lease + ttl); indexed, so prune is one indexed DELETE
                           (and a look at each stale claim: is its owner gone?)
    entry bytea            the encoded entry

Every transition is one statement: the claim an ``INSERT … ON CONFLICT`` that replaces only
an expired row (refused, the row that holds the key is then read), every later write an
``UPDATE``/``DELETE … WHERE key = … AND live = token``. The clock is the server's
(``clock_timestamp()``, see ``clock.ServerClock``).

The record's checksum covers ``entry`` only. SQL alone replaces or removes a finished row only
when its two copies of its expiry agree that it has passed: ``expires_at`` and ``drop_at``,
which every version has written equal whenever ``expires_at`` is set (a claim has no
``expires_at``: only its lease + ttl in ``drop_at``). One flipped bit in either made a live
record look expired to a claim or prune, which removed it: its body ran again (issue 14,
review). A row whose copies disagree is judged by its record: the claim reads it (and removes
that exact row if the record says it expired), prune reads it. A write refused by the fence
``live`` reads the row once, to tell a lost claim from a damaged fence (``_refused``).

Lease renewals go to a second table, ``<table>_leases`` (key, token, lease_until, lease_mono),
never to the record's row, and on a connection of their own outside the pool (issue 14). A
transactional body's ``ok`` record is an ``UPDATE`` of the record's row inside the body's
transaction: a renewal that updated that row after the transaction's snapshot made the ``ok``
write fail at REPEATABLE READ and SERIALIZABLE ("could not serialize access"), and renewals
that waited for a pooled connection starved while the bodies they kept alive held them all.
A read that finds a claim (``get``, the claim's answer, ``scan``) also reads its lease row, so
that whoever judges it sees its latest renewal; reads of finished records, and first calls,
cost what they did. A takeover, ``forget``, and the end of a claim this process renewed remove
its lease row; ``prune`` removes the ones left behind (a crashed owner's, or a claim another
process settled).

Async callers (issue 16) run the same statements on connections of the event loop they run on
(an async connection belongs to its loop): a ``_LoopPool`` per loop, made on the loop's first
call from the connection string (or the given ``ConnectionPool``'s settings) and closed when
the loop shuts down (``_closed_at_shutdown``), or the ``AsyncConnectionPool`` the store was
given, on its one loop. Each primitive is written once, as a generator of the statements it runs
(``_Query``) and of its readings of the store's clock (``_NOW``): ``_drive`` runs them on the
calling thread, ``_adrive`` on the loop. An ``async def`` body with ``transactional=True`` runs
in ``atransaction(key)`` and writes on ``current_async_connection()``.

Wake-ups (issue 16). A waiter watches a busy key (``watch``, ``awatch``) on a connection that
LISTENs on the table's channel, and marks the key watched by holding a shared advisory lock on
it (``_MARK``: session level, for as long as it watches). Each settling write (a finished
record, a release, a delete) tries, in its own statement, to take that lock for its transaction:
when it cannot, someone watches, and it NOTIFYs (payload: the key); when it can, nobody does, and
it sends nothing. NOTIFY takes a global lock at COMMIT that serialises every transaction that
notified: a first call that nobody waits for must not pay for it. No race: a waiter marks before
it looks at the key again, and a settle that took the lock first holds it until it commits, so
the mark waits for that commit and the look sees the settle. A lock, not a row: a row the waiter
writes would be read through the settle's snapshot (a REPEATABLE READ body's ok write would never
see one written during the body), and the record's own row must never be written by a reader
(see above). A watch whose LISTEN fails (refused, the connection lost, or a probe NOTIFY that never
comes back, as behind a pooler in transaction mode) waits as the default watch does, polled by
its caller, and says so once in the log.

Behind a pooler in transaction mode (issue 19) each transaction may run on another server
connection, and what a session keeps stays on the one it was made on. The probe above cannot
tell: its NOTIFY often runs on the very server connection that LISTENs, and comes back. So the
option is explicit: with ``transaction_pooling=True`` (``pooling.py``) the store keeps no session
state: nothing is prepared, and watches are the default ones, polled (no LISTEN, no mark).
Transaction-scoped locks (the settles' ``pg_try_advisory_xact_lock``, the setup's
``pg_advisory_xact_lock``) end with their transaction, and stay.

Failover to a standby (issue 19): a connection string may name a primary and its standby
(``host=a,b target_session_attrs=read-write``); libpq connects to whichever accepts writes. An
idle connection the server dropped (a failover, a restart, a terminated backend) has input
waiting, which an idle connection never has otherwise: it is seen with one ``poll`` at check-out
(``_dropped``) and replaced before a statement is sent on it. A claim or a settling write whose
connection is lost under it is sent once more (``_resent``): a claim refused then is this
caller's if the row holds its token, a settling write landed if the row is exactly the one it
wrote (confirmed by a write of the same row, whose commit waits for a synchronous standby:
``_fenced``). Each lost or dropped connection makes the store read the server's clock again
(``ServerClock.forget``): the next server may be another machine.

The package, a module at a time (each says what it holds):

- ``store.py``: ``PostgresStore`` itself (its pools, primitives, transactions, renewals, watches).
- ``statements.py``: its SQL, and the names derived from the table's; ``_Query`` and ``_NOW``.
- ``connections.py``: connections outside the sync pool (renewals, each event loop's pool and
  side), fork handling, timeouts, how errors and the server are described.
- ``listen.py``: the wake-ups, ``PostgresWatch``, ``PostgresAsyncWatch`` and ``_Listener``.
- ``transaction.py``: the transactional mode's context (``current_connection()``, ...).
- ``pooling.py``: the ``transaction_pooling`` option: its connection-string parameter, its
  check of a given pool, and the hint a lost prepared statement's error gets.
"""

from .connections import _MAX_CONNECTIONS as _MAX_CONNECTIONS
from .connections import BUSY_POOL_WAIT as BUSY_POOL_WAIT
from .connections import DEFAULT_CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT
from .connections import _LoopPool as _LoopPool
from .listen import PostgresAsyncWatch, PostgresWatch
from .statements import _payload as _payload
from .statements import _table_mark as _table_mark
from .store import PostgresStore
from .transaction import current_async_connection, current_connection

# What ``idemfn._stores.postgres`` exported as one module, and the private names the tests
# import from it (re-exported as ``name as name``).
__all__ = [
    "PostgresAsyncWatch",
    "PostgresStore",
    "PostgresWatch",
    "current_async_connection",
    "current_connection",
]
