"""Values of types of the tests' own that fingerprints are checked on: the golden vectors of
``tests/unit/test_fingerprint.py`` and the properties of ``tests/unit/test_fuzz.py``.

They live at module level on purpose: a class's ``__qualname__`` is part of its fingerprint's
encoding, so moving one into a function (or renaming it) would change its golden vectors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from decimal import Decimal
from typing import NamedTuple

__all__ = ["Color", "Level", "Money", "Pair", "Point", "Str", "ToyZone"]


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 3


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Pair(NamedTuple):
    key: str
    size: int


class Money:
    """Not natively supported: fingerprinted through the hook."""

    def __init__(self, amount: str, currency: str) -> None:
        self.amount = amount
        self.currency = currency

    def __idemfn_fingerprint__(self) -> object:
        return (self.currency, Decimal(self.amount))


class Str(str):
    """A str subclass: must fingerprint like the plain str."""

    __slots__ = ()


class ToyZone(dt.tzinfo):
    """A zone with daylight saving time, fold-aware (PEP 495) and independent of the system's
    tz database: UTC+1, and UTC+2 from 2024-03-31 02:00 (clocks jump to 03:00: a gap) to
    2024-10-27 03:00 (clocks go back to 02:00: a fold). ``key`` names it as zoneinfo would."""

    key = "Toy/Zone"
    SPRING = dt.datetime(2024, 3, 31, 2)
    AUTUMN = dt.datetime(2024, 10, 27, 2)
    HOUR = dt.timedelta(hours=1)

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta | None:
        if when is None:
            return None  # like zoneinfo: a time of day alone has no offset
        wall = when.replace(tzinfo=None, fold=0)
        if self.SPRING <= wall < self.SPRING + self.HOUR:
            summer = when.fold == 1  # in the gap, fold=0 takes the offset from before it
        elif self.AUTUMN <= wall < self.AUTUMN + self.HOUR:
            summer = when.fold == 0  # in the fold, fold=0 is the first (summer) pass
        else:
            summer = self.SPRING <= wall < self.AUTUMN
        return self.HOUR * (2 if summer else 1)

    def dst(self, when: dt.datetime | None) -> dt.timedelta | None:
        offset = self.utcoffset(when)
        return None if offset is None else offset - self.HOUR

    def tzname(self, when: dt.datetime | None) -> str:
        return "TST" if self.dst(when) else "TWT"
