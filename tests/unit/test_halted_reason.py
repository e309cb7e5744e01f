"""``idemfn.events.halted_reason``: one word per halted record, read from idemfn's own texts."""

from __future__ import annotations

import pytest

from idemfn._outcome import describe_exception
from idemfn.events import halted_reason


class interrupted_by_design(Exception):  # a user's name that reads like a reason
    pass


class AbandonedCart(Exception):
    pass


@pytest.mark.parametrize("exc", [interrupted_by_design("x"), AbandonedCart("interrupted by me")])
def test_a_users_names_and_messages_cannot_change_the_word(exc: Exception) -> None:
    described = describe_exception(exc)
    assert halted_reason(described.reason, described.exc_type) == "raised"


@pytest.mark.parametrize(
    ("reason", "exc_type", "word"),
    [
        ("abandoned: its owner x died: its process is gone", None, "abandoned"),
        ("the call was interrupted by KeyboardInterrupt", "KeyboardInterrupt", "interrupted"),
        ("interrupted by SystemExit while storing the result", None, "interrupted"),
        ("the call raised ValueError, interrupted while storing it", "ValueError", "interrupted"),
        ("the claim's block ended without complete() or fail()", "RuntimeError", "incomplete"),
        ("the call returned a _thread.lock, which could not be stored (...)", None, "unstorable"),
        ("the call raised ValueError", "ValueError", "raised"),
        (None, None, "other"),
    ],
)
def test_each_of_idemfns_texts_has_its_word(
    reason: str | None, exc_type: str | None, word: str
) -> None:
    assert halted_reason(reason, exc_type) == word
