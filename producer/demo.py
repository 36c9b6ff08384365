"""``genderscore demo``: the whole job end to end on generated pictures (the quickstart).

Makes a labelled sample set, trains a small model on it, starts a local Redis
(``redis-server`` on the PATH, else the embedded Valkey) and a scoring worker if none
answers (and stops only what it started), scores the pictures through the real Celery
pipeline, writes the CSV and evaluates it.
Like the CLI, this module composes the packages: it is the one place besides
``producer.cli`` that uses ``training``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from producer.localredis import LOOPBACK_HOSTS, LocalRedisError, start_server
from worker.results import RedisUnavailable  # exit 3 from the CLI
from worker.settings import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files, and how well the model did."""

    csv_path: Path
    model_path: Path
    run_id: str
    summary: str


def _reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@contextmanager
def ensure_redis(url: str, workdir: Path) -> Iterator[None]:
    """Use the Redis at ``url``; if none answers there and it is local, start one for the block.

    The private server listens on the URL's own port, so the URL (and every process
    that reads it, the worker included) stays as it is: ``redis-server`` on the PATH,
    else the embedded Valkey (``producer.localredis``).
    """
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}"
    if _reachable(url):
        log.info("using the Redis that answers at %s", where)
        yield
        return
    if parts.hostname not in LOOPBACK_HOSTS or parts.username or parts.password:
        raise RedisUnavailable(
            f"no Redis answers at {where} (GENDERSCORE_REDIS_URL): start it; the demo starts"
            " one itself only for a local URL without credentials (redis://localhost:6379/0)"
        )
    if parts.scheme != "redis":
        raise RedisUnavailable(f"no Redis answers at {where}: the demo starts no TLS server")
    try:
        server = start_server(parts.port or 6379, workdir=workdir)
    except LocalRedisError as exc:
        raise RedisUnavailable(
            f"no Redis answers at {where} and none could be started: {exc}"
        ) from None
    log.info(
        "no Redis answered at %s: started %s (stopped at the end)", where, server.binary.describe()
    )
    try:
        _wait(lambda: _reachable(url), 10, f"the Redis started on {where} does not answer")
        yield
    finally:
        server.stop()
        log.info("stopped the Redis on %s", where)


def _live_workers() -> list[str]:
    from producer.status import live_workers

    return live_workers(timeout=1.5)


@contextmanager
def ensure_worker(model: Path, log_path: Path) -> Iterator[None]:
    """Use the running scoring workers, or start one for the block."""
    if _live_workers():
        yield
        return
    log.info("starting a scoring worker (log: %s; stopped at the end)", log_path)
    env = dict(os.environ, GENDERSCORE_MODEL=str(model))
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "-Q",
                "score",
                "--loglevel=INFO",
                "-n",
                f"demo-{os.getpid()}@%h",
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait(
                lambda: proc.poll() is not None or bool(_live_workers()),
                90,
                "the worker did not start",
            )
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}: see {log_path}")
            yield
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)


def _wait(ready: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.3)


def run_demo(workdir: Path, count: int = 400, epochs: int = 6) -> DemoResult:
    """Sample set -> trained model -> Celery scoring run -> CSV and evaluation."""
    from producer.collect import collect
    from producer.enqueue import enqueue_run
    from producer.follow import follow_run
    from producer.scan import scan_pictures
    from training.sample import make_sample
    from training.train import train
    from worker.celery import app
    from worker.evaluation import evaluate_files, format_evaluation
    from worker.model import check_model_file
    from worker.results import connect
    from worker.sources import FolderSource

    with ExitStack() as stack:
        # Redis first: a URL where nothing answers fails before minutes of training.
        stack.enter_context(ensure_redis(settings.redis_url, workdir / "redis"))
        images, profile = make_sample(workdir / "data", count)
        log.info("sample: %d pictures in %s, labels in %s", count, images, profile)
        model = workdir / "models" / "demo.h5"
        trained = train(
            images,
            profile,
            out=model,
            epochs=epochs,
            image_size=64,
            patience=3,
            progress=lambda epoch, metrics: log.info("epoch %d: %s", epoch, metrics),
        )
        log.info("%s", trained.summary())
        stack.enter_context(ensure_worker(model, workdir / "worker.log"))
        client = connect()
        scan = scan_pictures(images)
        run = enqueue_run(
            app,
            client,
            FolderSource(scan.images_dir).spec,
            scan.pictures,
            model,
            check_model_file(model),
        )
        log.info("run %s: %d pictures enqueued on the score queue", run.run_id, run.published)
        follow_run(app, client, run.run_id, timeout=600)
        out = workdir / "out" / f"{run.run_id}.csv"
        collect(client, run.run_id, out)
    summary = format_evaluation(evaluate_files(out, profile))
    return DemoResult(out, model, run.run_id, summary)
