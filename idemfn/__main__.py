"""``python -m idemfn``: the ``idemfn`` command."""

from ._cli import entry_point

if __name__ == "__main__":
    entry_point()
