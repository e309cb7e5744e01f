"""Kept for records: ``idemfn run`` lived here until the CLI became the package ``idemfn._cli``.

A halted run's record holds a pickled ``CommandFailed``, and pickle names a class by the module
that defines it: every such record written so far says ``idemfn._run.CommandFailed`` (and so do
new ones, which then load in older versions too: see ``command_outcome``). Nothing else of a
run's record names a class or function (its ok value is plain dicts, lists, str, int, bytes).
Remove nothing from here.
"""

from ._cli.command_outcome import CommandFailed

__all__ = ["CommandFailed"]
