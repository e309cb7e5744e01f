"""Contract tests: what a call does and what a store must do, held to one behaviour on every
store (the ``store`` and ``make`` fixtures run a test on Memory, Disk, Redis and PostgreSQL,
sync and async). Calls, claims and their owners, the heartbeat, replays, the engine's state
machine, store conformance (``idemfn.testing.StoreContract``), and races and crashes between
real processes."""
