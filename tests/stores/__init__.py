"""Store tests: what one store has that the others don't. Redis and PostgreSQL servers going
down, their clocks and connections, transactional mode, DiskStore's path and permission checks,
corrupt and forged records, signing, faults (full disk, read-only file system, out of memory),
wall-clock jumps. Behaviour every store shares belongs in ``tests/contract``."""
