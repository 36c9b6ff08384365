"""Enqueueing a scoring run: one task per userid, each userid once per run, pipelined.

Userids are added to the run's id set first (SADD in a pipeline): only those that were
not already in the run are published, so re-running ``score`` with the same run id
never enqueues a userid twice. Messages are pushed a thousand per LPUSH (one round trip
per thousand tasks, not one per task).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from secrets import token_hex
from typing import Any
from uuid import uuid4

import redis
from celery import Celery

from worker.celery import SCORE_QUEUE
from worker.ids import check_run_id, check_userid
from worker.keys import prefix, run_keys
from worker.results import connect, create_run, seal_run

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


class MessageFactory:
    """Celery protocol-2 messages for the score task, ready for the Redis queue.

    ``send_task`` costs ~1 ms per task here (message building, a binding lookup and a
    sent event per call); this builds each message from one template that Celery itself
    made, changing only the ids and arguments, so a run is published at pipeline speed.
    The envelope is kombu's Redis one: JSON, body base64, anonymous exchange with the
    queue name as routing key (what a consumer's requeue uses).
    """

    def __init__(self, app: Celery) -> None:
        template = app.amqp.as_task_v2("x", SCORE_TASK, args=(), kwargs={})
        self.headers: dict[str, Any] = dict(template.headers)
        self.headers["ignore_result"] = True
        self.embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def build(self, args: tuple[str, ...]) -> str:
        """The queue entry of one task with ``args``: a JSON string."""
        task_id = str(uuid4())
        headers = dict(
            self.headers,
            id=task_id,
            root_id=task_id,
            argsrepr=f"run={args[0]} userid={args[1]}",
            kwargsrepr="{}",
        )
        body = base64.b64encode(json.dumps([list(args), {}, self.embed]).encode()).decode()
        return json.dumps(
            {
                "body": body,
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "correlation_id": task_id,
                    "reply_to": "",
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": SCORE_QUEUE},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid4()),
                },
            }
        )


def publish(
    app: Celery,
    run_id: str,
    userids: Sequence[str],
    images_dir: Path,
    model: Path,
    progress: Callable[[int], None] | None = None,
    client: redis.Redis | None = None,
) -> None:
    """Publish one score task per userid: LPUSH of prebuilt messages, pipelined."""
    factory = MessageFactory(app)
    client = client or connect()
    queue = prefix() + SCORE_QUEUE
    images, model_path = str(images_dir), str(model)
    for chunk in _chunks(userids, CHUNK):
        messages = [factory.build((run_id, u, images, model_path)) for u in chunk]
        client.lpush(queue, *messages)
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
    publish(app, run_id, new, images_dir.resolve(), model.resolve(), progress, client)
    total = int(client.scard(run_keys(run_id).ids))
    seal_run(client, run_id, total)
    log.info("run %s: %d enqueued, %d already in the run", run_id, len(new), len(unique) - len(new))
    return Enqueued(run_id, len(new), len(unique) - len(new), total)
