"""CLI tests: the ``idemfn`` command (ls, show, forget, prune, stats) and ``idemfn run``,
driven as a real subprocess."""
