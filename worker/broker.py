"""The one place that knows which broker carries the scoring messages.

Publishing a run, reading queue depths and finding a run's messages in flight differ
by broker; everything else (producer, reconcile, the repair, status, metrics) calls
these functions. With Redis as broker (``redis://``, ``rediss://``), messages are
prebuilt Celery protocol-2 envelopes pushed a thousand per ``LPUSH``; queues and
kombu's unacknowledged index live under the key prefix on the broker's Redis.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import redis
from celery import Celery

from worker.celery import SCORE_QUEUE, TRAINING_QUEUE
from worker.keys import prefix
from worker.results import connect
from worker.settings import settings

SCORE_TASK = "genderscore.score"
CHUNK = 1000


def broker_is_redis(url: str | None = None) -> bool:
    """Whether the scoring messages travel through Redis (else through AMQP)."""
    return urlsplit(url or settings.effective_broker_url).scheme in ("redis", "rediss", "unix")


def broker_client() -> redis.Redis:
    """A client of the broker's Redis (the queues), which may not be the results' Redis."""
    return connect(settings.effective_broker_url)


@dataclass(frozen=True)
class ScoreTask:
    """The arguments of one ``genderscore.score`` message."""

    run_id: str
    userid: str
    picture: str
    model_path: str
    model_sha: str

    def args(self) -> list[str]:
        """The task's positional arguments, in ``worker.batching.ARG_NAMES`` order."""
        return [self.run_id, self.userid, self.picture, self.model_path, self.model_sha]


class RedisEnvelopes:
    """Celery protocol-2 messages for the score task, as kombu's Redis transport queues them.

    ``send_task`` costs ~1 ms per task (message building, a binding lookup and a sent
    event per call); this builds each message from one template that Celery itself made,
    changing only the ids and arguments, so a run is published at pipeline speed. The
    envelope is kombu's Redis one: JSON, body base64, anonymous exchange with the queue
    name as routing key (what a consumer's requeue uses).
    """

    def __init__(self, app: Celery) -> None:
        template = app.amqp.as_task_v2("x", SCORE_TASK, args=(), kwargs={})
        self.headers: dict[str, Any] = dict(template.headers)
        self.headers["ignore_result"] = True
        self.embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def build(self, task: ScoreTask) -> str:
        """The queue entry of one task: a JSON string."""
        task_id = str(uuid4())
        headers = dict(
            self.headers,
            id=task_id,
            root_id=task_id,
            argsrepr=f"run={task.run_id} userid={task.userid}",
            kwargsrepr="{}",
        )
        body = base64.b64encode(json.dumps([task.args(), {}, self.embed]).encode()).decode()
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


def publish_scores(
    app: Celery, tasks: Sequence[ScoreTask], progress: Callable[[int], None] | None = None
) -> None:
    """Publish one score message per task; returns once the broker holds them all."""
    envelopes = RedisEnvelopes(app)
    client = broker_client()
    queue = prefix() + SCORE_QUEUE
    for start in range(0, len(tasks), CHUNK):
        chunk = tasks[start : start + CHUNK]
        client.lpush(queue, *[envelopes.build(task) for task in chunk])
        if progress:
            progress(len(chunk))


def queue_lengths() -> dict[str, int]:
    """Messages waiting in each queue, and delivered but not yet acknowledged."""
    client, p = broker_client(), prefix()
    return {
        SCORE_QUEUE: int(client.llen(p + SCORE_QUEUE)),
        TRAINING_QUEUE: int(client.llen(p + TRAINING_QUEUE)),
        "unacked (score)": int(client.hlen(p + "unacked")),
        "unacked (training)": int(client.hlen(p + "unacked_training")),
    }


def _task_run(raw: str | bytes) -> str | None:
    """The run id of a queued or unacknowledged score message; "?" when unreadable."""
    try:
        entry = json.loads(raw)
        envelope = entry[0] if isinstance(entry, list) else entry  # unacked: [msg, exch, key]
        if envelope["headers"].get("task") != SCORE_TASK:
            return None
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return "?"  # cannot tell: assume it may be anyone's


def _scan_list(client: redis.Redis, key: str, page: int = 5000) -> Iterable[str]:
    start = 0
    while True:
        entries = client.lrange(key, start, start + page - 1)
        yield from (str(entry) for entry in entries)
        if len(entries) < page:
            return
        start += page


def run_in_flight(run_id: str) -> bool:
    """Whether a message of ``run_id`` is queued or delivered and not yet acknowledged."""
    client, p = broker_client(), prefix()
    for raw in client.hvals(p + "unacked"):
        if _task_run(raw) in (run_id, "?"):
            return True
    return any(_task_run(raw) in (run_id, "?") for raw in _scan_list(client, p + SCORE_QUEUE))
