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
from tests.support.workers import ROOT, Worker, celery_worker

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


# Each task queue's example (but Celery's, above) and its worker, as the example's docstring
# says to run it, from examples/: three sends of one payment pay once, and the script run again
# replays the same receipt.
WORKERS = {
    "rq_jobs.py": ("-m rq.cli worker --url {url} --with-scheduler default", "Listening on"),
    "dramatiq_actors.py": (
        "-m dramatiq dramatiq_actors --processes 1 --threads 2",
        "Worker process is ready",
    ),
    "huey_tasks.py": (
        "-m huey.bin.huey_consumer huey_tasks.huey -k process",
        "Huey consumer started",
    ),
    "arq_jobs.py": ("-m arq arq_jobs.WorkerSettings", "redis_version="),
}


@pytest.mark.parametrize("script", list(WORKERS))
def test_a_queue_example_pays_once_under_its_worker(
    script: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    url = f"unix://{redis_server.socket}"
    env = {"REDIS_URL": url, "IDEMFN_STORE": str(tmp_path / "store")}
    arguments, ready = WORKERS[script]
    command = f"cd examples && exec {shlex.quote(sys.executable)} {arguments.format(url=url)}"
    worker = Worker(["sh", "-c", command], env, tmp_path / "worker.log", ready=ready)
    invoice = f"invoice-{uuid.uuid4().hex[:8]}"
    try:
        first = _run(script, env, invoice)
        second = _run(script, env, invoice)
    finally:
        worker.kill()
    assert len(first) == 3 and len(_receipts(first)) == 1, first
    assert _receipts(second) == _receipts(first)
    assert worker.output().count(f"paying {invoice}:") == 1
