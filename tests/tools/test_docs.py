"""Every Python block of the README and of the site (docs/**/*.md) runs; the README's commands
are the ones CI runs; the demo replays across processes.

Each page's blocks run in order, in one namespace of their own, in a fresh working directory,
with ``IDEMFN_STORE`` pointing to a fresh directory. An HTML comment on the line right before a
block changes how it runs (see CONTRIBUTING.md):

- ``<!-- docs-test: redis -->``: the block writes ``redis://localhost:6379/0``, which is replaced
  by the suite's ``redis_server`` (a database of its own, emptied for each page);
- ``<!-- docs-test: postgres -->``: the block writes ``postgresql://localhost/app``, which is
  replaced by a fresh database of the suite's ``postgres_server``;
- ``<!-- docs-test: redis-cluster -->``: the block writes
  ``redis+cluster://localhost:7000,localhost:7001,localhost:7002``, which is replaced by the
  suite's ``redis_cluster`` (three primaries);
- ``<!-- docs-test: skip because <reason> -->``: the block is compiled, not run.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REDIS_URL = "redis://localhost:6379/0"
POSTGRES_URL = "postgresql://localhost/app"
REDIS_CLUSTER_URL = "redis+cluster://localhost:7000,localhost:7001,localhost:7002"
_MARK = re.compile(r"<!-- docs-test: (?P<what>.*?) -->")
_REDIS_DB = 15  # the suite's other Redis tests use database 0, each under a prefix of its own


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, code (dedented), first code line and mark."""

    language: str
    code: str
    line: int  # 1-based line of the block's first code line in the page
    mark: str | None


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"( *)```(\S*)\s*", lines[index])
        if opening is None:
            index += 1
            continue
        indent, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end] != f"{indent}```":
            end += 1
        assert end < len(lines), f"{_name(page)}:{index + 1}: a block that never closes"
        mark = _MARK.fullmatch(lines[index - 1].strip()) if index else None
        code = textwrap.dedent("\n".join(lines[index + 1 : end]) + "\n")
        blocks.append(Block(language, code, index + 2, mark["what"] if mark else None))
        index = end + 1
    return blocks


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _python(page: Path) -> list[Block]:
    return [block for block in _blocks(page) if block.language == "python"]


@pytest.fixture
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh working directory and default store; the process's environment and logging
    configuration as they were afterwards (a page may set a variable or configure a logger)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("IDEMFN_STORE", str(tmp_path / "store"))
    environ = dict(os.environ)
    handlers = logging.root.handlers[:]
    levels = {name: logging.getLogger(name).level for name in ("", "idemfn")}
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        logging.root.handlers[:] = handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _redis_url(request: pytest.FixtureRequest) -> str:
    import redis

    server = request.getfixturevalue("redis_server")
    url = f"{server.url}?db={_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def _postgres_url(request: pytest.FixtureRequest) -> str:
    import psycopg

    server = request.getfixturevalue("postgres_server")
    database = f"docs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")

    def drop() -> None:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    request.addfinalizer(drop)
    return f"postgresql://postgres@/{database}?host={server.socket_dir}"


@pytest.mark.usefixtures("_isolated")
@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_python_blocks_run(
    page: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's Python blocks run in order in one namespace (compiled with the page's line
    numbers, so a traceback points into the page); a failure names the page and block."""
    name = _name(page)
    namespace: dict[str, object] = {"__name__": re.sub(r"\W", "_", page.stem)}
    urls: dict[str, str] = {}
    for number, block in enumerate(_python(page), 1):
        where = f"{name}, python block {number} (line {block.line})"
        code = block.code
        if block.mark is not None:
            what, _, reason = block.mark.partition(" because ")
            known = ("skip", "redis", "postgres", "redis-cluster")
            assert what in known, f"{where}: unknown mark {block.mark!r}"
            assert (what == "skip") == bool(reason.strip()), f"{where}: 'skip because <reason>'"
            if what == "redis":
                assert REDIS_URL in code, f"{where}: a redis block writes {REDIS_URL}"
                if "redis" not in urls:
                    urls["redis"] = _redis_url(request)
                code = code.replace(REDIS_URL, urls["redis"])
            elif what == "redis-cluster":
                assert REDIS_CLUSTER_URL in code, f"{where}: a cluster block writes its URL"
                code = code.replace(REDIS_CLUSTER_URL, request.getfixturevalue("redis_cluster").url)
            elif what == "postgres":
                assert POSTGRES_URL in code, f"{where}: a postgres block writes {POSTGRES_URL}"
                if "postgres" not in urls:
                    urls["postgres"] = _postgres_url(request)
                code = code.replace(POSTGRES_URL, urls["postgres"])
        compiled = compile("\n" * (block.line - 1) + code, str(page), "exec")
        if block.mark is not None and block.mark.startswith("skip"):
            continue
        try:
            exec(compiled, namespace)
        except BaseException as exc:
            if sys.version_info >= (3, 11):  # the traceback's lines point into the page anyway
                exc.add_note(f"in {where}")
            raise
    out = capsys.readouterr().out
    if 'charge("o-17", 2500)  # replays' in page.read_text():
        assert out.count("charging o-17") == 1  # the intro's second call replayed


def test_every_page_is_collected_and_blocks_run() -> None:
    """The parametrisation finds the site, and most blocks run rather than being skipped."""
    assert (ROOT / "docs" / "index.md") in PAGES
    blocks = [block for page in PAGES for block in _python(page)]
    skipped = [block for block in blocks if block.mark and block.mark.startswith("skip")]
    assert len(blocks) >= 20
    assert len(skipped) * 5 <= len(blocks), "prefer blocks that run: keep skips few"


def test_no_python_block_hides_under_another_language() -> None:
    """A ```py or ```python3 block would never run: every Python block is fenced ```python."""
    for page in PAGES:
        for block in _blocks(page):
            assert block.language not in ("py", "python3", "py3"), (_name(page), block.line)


def _commands(page: Path) -> list[str]:
    return [
        line
        for block in _blocks(page)
        if block.language == "sh"
        for line in block.code.splitlines()
        if line and not line.startswith("#")
    ]


def test_ci_runs_the_readme_test_command_exactly() -> None:
    commands = _commands(ROOT / "README.md")
    assert len(commands) == 2, commands
    demo, test = commands
    assert "examples/demo.py" in demo
    assert demo.endswith("&& idemfn ls")  # test_demo_... runs that part too
    assert "pytest" in test and "ruff check" in test and "mypy --strict idemfn" in test
    assert "mkdocs build --strict" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test
    # The site and CONTRIBUTING.md repeat the README's set-up commands, never a variant.
    for page in [*PAGES[1:], ROOT / "CONTRIBUTING.md"]:
        for command in _commands(page):
            if command.startswith("python3 -m venv"):
                assert command in commands, (_name(page), command)


def test_demo_runs_and_replays_across_processes(tmp_path: Path) -> None:
    env = {**os.environ, "IDEMFN_STORE": str(tmp_path / "store")}
    demo = [sys.executable, str(ROOT / "examples" / "demo.py")]
    first = subprocess.run(demo, env=env, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(demo, env=env, capture_output=True, text=True, check=True).stdout
    assert "call 1: " in first and "(ran the body)" in first
    assert first.count("the body runs") == 2  # the charge and the failing refund
    assert "the body runs" not in second and "(ran the body)" not in second
    assert second.count("replayed, body not run") == 2
    listing = subprocess.run(
        [sys.executable, "-m", "idemfn", "ls"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert listing.split()[:5] == ["KEY", "STATUS", "AGE", "OWNER", "EXPIRES"]
    assert "idemfn.demo.charge:charge:order-1001  ok" in listing
    assert "idemfn.demo.refund:refund:order-1001  halted" in listing
    assert second.count("idemfn: replayed from the record") == 2
