"""The Celery, RQ, Dramatiq, arq and Huey examples run as the README says, against real
workers."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.servers import RedisServer
from tests.support.workers import ROOT, Worker, celery_worker, rq_worker

pytestmark = pytest.mark.slow


def _run(script: str, env: dict[str, str], *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _receipts(output: list[str]) -> set[str]:
    return {line.partition(": ")[2] for line in output}


def test_the_celery_example(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {
        "BROKER_URL": f"redis+socket://{redis_server.socket}",
        "IDEMFN_STORE": str(tmp_path / "store"),
    }
    worker: Worker = celery_worker(
        tmp_path, env, "example", app="celery_app", workdir=ROOT / "examples"
    )
    order = f"order-{uuid.uuid4().hex[:8]}"
    try:
        first = _run("celery_app.py", env, order)
        second = _run("celery_app.py", env, order)
    finally:
        worker.kill()
    assert len(first) == 5 and len(_receipts(first)) == 1, first
    assert _receipts(second) == _receipts(first)
    assert worker.output().count(f"charging {order}:") == 1


def test_the_rq_example(tmp_path: Path, redis_server: RedisServer) -> None:
    url = f"unix://{redis_server.socket}"
    env = {"REDIS_URL": url, "IDEMFN_STORE": str(tmp_path / "store")}
    worker = rq_worker(
        tmp_path, env, "example", url, "default", "rq.worker.Worker", path=ROOT / "examples"
    )
    invoice = f"invoice-{uuid.uuid4().hex[:8]}"
    try:
        first = _run("rq_jobs.py", env, invoice)
        second = _run("rq_jobs.py", env, invoice)
    finally:
        worker.kill()
    assert len(first) == 3 and len(_receipts(first)) == 1, first
    assert _receipts(second) == _receipts(first)
    assert worker.output().count(f"paying {invoice}:") == 1


def test_the_dramatiq_example(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {"REDIS_URL": f"unix://{redis_server.socket}", "IDEMFN_STORE": str(tmp_path / "store")}
    argv = [sys.executable, "-m", "dramatiq", "dramatiq_actors", "--path", "examples"]
    worker = Worker(
        [*argv, "--processes", "1", "--threads", "2"],
        env,
        tmp_path / "example.log",
        ready="Worker process is ready",
    )
    invoice = f"invoice-{uuid.uuid4().hex[:8]}"
    try:
        first = _run("dramatiq_actors.py", env, invoice)
        second = _run("dramatiq_actors.py", env, invoice)
    finally:
        worker.kill()
    assert len(first) == 3 and len(_receipts(first)) == 1, first
    assert _receipts(second) == _receipts(first)
    assert worker.output().count(f"paying {invoice}:") == 1


def test_the_arq_example(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {"REDIS_URL": f"unix://{redis_server.socket}", "IDEMFN_STORE": str(tmp_path / "store")}
    # As its docstring says, in examples/ (arq imports the settings from its working directory)
    command = f"cd examples && exec {shlex.quote(sys.executable)} -m arq arq_jobs.WorkerSettings"
    worker = Worker(["sh", "-c", command], env, tmp_path / "example.log", ready="redis_version=")
    invoice = f"invoice-{uuid.uuid4().hex[:8]}"
    try:
        first = _run("arq_jobs.py", env, invoice)
        second = _run("arq_jobs.py", env, invoice)
    finally:
        worker.kill()
    assert len(first) == 3 and len(_receipts(first)) == 1, first
    assert _receipts(second) == _receipts(first)
    assert worker.output().count(f"paying {invoice}:") == 1


def test_the_huey_example(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {"REDIS_URL": f"unix://{redis_server.socket}", "IDEMFN_STORE": str(tmp_path / "store")}
    # As its docstring says, in examples/ (huey_consumer imports from its working directory)
    consumer = f"{shlex.quote(sys.executable)} -m huey.bin.huey_consumer huey_tasks.huey -k process"
    command = f"cd examples && exec {consumer}"
    worker = Worker(
        ["sh", "-c", command], env, tmp_path / "huey.log", ready="Huey consumer started"
    )
    invoice = f"invoice-{uuid.uuid4().hex[:8]}"
    try:
        first = _run("huey_tasks.py", env, invoice)
        second = _run("huey_tasks.py", env, invoice)
    finally:
        worker.kill()
    assert len(first) == 3 and len(_receipts(first)) == 1, first
    assert _receipts(second) == _receipts(first)
    assert worker.output().count(f"paying {invoice}:") == 1
