"""The command tests' store: a DiskStore in the test's own directory, and the environment
that points the ``idemfn`` command at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from idemfn import DiskStore
from tests.support.cli import cli_env


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def env(store_dir: Path) -> dict[str, str]:
    return cli_env(store_dir)


@pytest.fixture
def store(store_dir: Path) -> Iterator[DiskStore]:
    s = DiskStore(store_dir)
    yield s
    s.close()
