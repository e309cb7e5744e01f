"""Unit tests: pure functions, no store behaviour. Keys and options, fingerprints (golden
vectors and fuzzing), serializers, the public exports, the wrapper's metadata, the hot paths'
shortcuts. A test here may use a ``MemoryStore`` to reach a function, but checks no call's
outcome: that belongs in ``tests/contract``."""
