"""Enqueueing a scoring run: one task per userid, each userid once per run, pipelined.

Userids are added to the run's id set first (SADD in a pipeline): only those that were
not already in the run are published, so re-running ``score`` with the same run id
never enqueues a userid twice. Messages are published through kombu's Redis publish
batch (one round trip per thousand messages, not one per task).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from secrets import token_hex

import redis
from celery import Celery

from worker.celery import SCORE_QUEUE
from worker.ids import check_run_id, check_userid
from worker.keys import run_keys
from worker.results import create_run, seal_run

log = logging.getLogger(__name__)
CHUNK = 1000
SCORE_TASK = "genderscore.score"


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{token_hex(2)}"


@dataclass(frozen=True)
class Enqueued:
    """What ``enqueue_run`` did."""

    run_id: str
    published: int
    already_in_run: int
    total: int


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def add_new_ids(client: redis.Redis, run_id: str, userids: Sequence[str]) -> list[str]:
    """Add userids to the run's id set; return those that were not in it yet."""
    key = run_keys(run_id).ids
    new: list[str] = []
    for chunk in _chunks(userids, CHUNK):
        pipe = client.pipeline(transaction=False)
        for userid in chunk:
            pipe.sadd(key, userid)
        new += [u for u, added in zip(chunk, pipe.execute(), strict=True) if added]
    return new


def publish(
    app: Celery,
    run_id: str,
    userids: Sequence[str],
    images_dir: Path,
    model: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Publish one score task per userid, in pipelined batches."""
    with app.producer_or_acquire() as producer:
        for chunk in _chunks(userids, CHUNK):
            with producer.batch(max_size=CHUNK):
                for userid in chunk:
                    app.send_task(
                        SCORE_TASK,
                        args=(run_id, userid, str(images_dir), str(model)),
                        queue=SCORE_QUEUE,
                        producer=producer,
                    )
            if progress:
                progress(len(chunk))


def enqueue_run(
    app: Celery,
    client: redis.Redis,
    images_dir: Path,
    model: Path,
    model_sha: str,
    userids: Sequence[str],
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Enqueued:
    """Create (or extend) a run and enqueue every userid not already in it."""
    run_id = check_run_id(run_id or new_run_id())
    unique = list(dict.fromkeys(check_userid(u) for u in userids))
    create_run(
        client,
        run_id,
        {
            "images_dir": str(images_dir.resolve()),
            "model": str(model.resolve()),
            "model_sha": model_sha,
        },
    )
    new = add_new_ids(client, run_id, unique)
    publish(app, run_id, new, images_dir.resolve(), model.resolve(), progress)
    total = int(client.scard(run_keys(run_id).ids))
    seal_run(client, run_id, total)
    log.info("run %s: %d enqueued, %d already in the run", run_id, len(new), len(unique) - len(new))
    return Enqueued(run_id, len(new), len(unique) - len(new), total)
