"""The sections of ``benchmarks/bench_deploy.py``, one deployment each, and what they share."""

from __future__ import annotations

import os


class GuaranteeBroken(Exception):
    """A section saw what its setting promises never happens (a duplicate run, a lost
    acknowledged record): ``bench_deploy.py`` exits 1."""


def load() -> str:
    """The machine's load averages, printed beside every figure."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
