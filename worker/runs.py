"""Run-level operations shared by the producer and the workers: publishing a run's
pictures, finding what is unsettled, and repairing runs whose messages were lost.

With Redis as broker, BRPOP hands a message to a worker before kombu records it as
unacknowledged: a connection lost in between loses the message (celery/celery#7950).
``repair_stalled`` re-publishes a run's unsettled userids once none of its messages is
queued or unacknowledged; ``Repairer`` runs it in every scoring worker, so a run left
to the workers alone still completes. One repair at a time, under a Redis lock. On
RabbitMQ nothing is lost in transit and nothing is repaired.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import redis
from celery import Celery

from worker.broker import ScorePublisher, ScoreTask, broker_is_redis, run_in_flight
from worker.keys import repair_lock, repair_progress, run_keys, runs_index
from worker.results import run_userids
from worker.settings import settings
from worker.sources import parse_spec, picture_string

log = logging.getLogger(__name__)
CHUNK = 1000
RECENT_RUNS = 200  # the newest runs the repairer looks at


def publish_pictures(
    app: Celery,
    client: redis.Redis,
    run_id: str,
    pictures: Sequence[tuple[str, str]],
    progress: Callable[[int], None] | None = None,
    record: bool = True,
    versions: Mapping[str, str] | None = None,
) -> None:
    """Publish the ``(userid, name)`` pictures of a run, then (``record``) add them to its
    id set, a chunk at a time, with the run's source and model from its metadata.

    ``versions`` (userid -> the store's version token from the listing) travel with the
    messages, for ``--only-new`` on object stores.
    """
    meta = client.hmget(run_keys(run_id).meta, ["source", "model", "model_sha"])
    spec, model, sha = (str(v) if v is not None else "" for v in meta)
    if not (spec and model and sha):
        raise LookupError(f"run {run_id} has no source or model in Redis")
    versions = versions or {}
    source = parse_spec(spec)
    publisher = ScorePublisher(app)
    for start in range(0, len(pictures), CHUNK):
        chunk = pictures[start : start + CHUNK]
        tasks = [
            ScoreTask(run_id, u, picture_string(source, name), model, sha, versions.get(u, ""))
            for u, name in chunk
        ]
        publisher.publish(tasks)
        if record:
            client.hset(run_keys(run_id).ids, mapping=dict(chunk))
        if progress:
            progress(len(chunk))


def unsettled(client: redis.Redis, run_id: str) -> list[tuple[str, str]]:
    """``(userid, picture name)`` of the run with neither a prediction nor an error, sorted."""
    keys = run_keys(run_id)
    expected = run_userids(client, run_id)
    settled = {u for u, _ in client.hscan_iter(keys.pred, count=5000)}
    settled |= {u for u, _ in client.hscan_iter(keys.err, count=5000)}
    return sorted((u, name) for u, name in expected.items() if u not in settled)


def repair_stalled(app: Celery, client: redis.Redis, run_id: str) -> int:
    """Re-publish a stalled run's unsettled userids, when nothing can still deliver them.

    Once no message of the run is queued or unacknowledged, an unsettled userid can only
    have been lost in transit. Counted in the run's ``repairs`` field. Returns how many
    userids were re-published (0 on RabbitMQ, or when another repair holds the lock).
    """
    if not broker_is_redis():
        return 0
    lock = client.lock(repair_lock(), timeout=300, blocking=False)
    if not lock.acquire():
        return 0
    try:
        if run_in_flight(run_id):
            return 0
        meta = run_keys(run_id).meta
        if not client.hexists(meta, "model_sha") or client.hexists(meta, "cancelled"):
            return 0
        todo = unsettled(client, run_id)
        if todo:
            log.warning(
                "run %s stalled: re-enqueueing %d userids lost in transit", run_id, len(todo)
            )
            publish_pictures(app, client, run_id, todo, record=False)
            client.hincrby(meta, "repairs", len(todo))
        return len(todo)
    finally:
        lock.release()


def repair_stalled_runs(app: Celery, client: redis.Redis, stall_seconds: float) -> int:
    """Repair every recent unfinished run without progress for ``stall_seconds``.

    Progress (settled count and since when) is kept in Redis, so any worker can tell.
    """
    now = time.time()
    run_ids = [str(r) for r in client.zrevrange(runs_index(), 0, RECENT_RUNS - 1)]
    pipe = client.pipeline(transaction=False)
    for run_id in run_ids:
        keys = run_keys(run_id)
        pipe.hmget(keys.meta, ["finished_at", "cancelled", "model_sha"])
        pipe.hlen(keys.pred)
        pipe.hlen(keys.err)
    replies = pipe.execute()
    seen = dict(client.hgetall(repair_progress()))
    repaired = 0
    for n, run_id in enumerate(run_ids):
        (finished, cancelled, sha), done, errors = replies[3 * n : 3 * n + 3]
        if finished or cancelled or not sha:
            if run_id in seen:
                client.hdel(repair_progress(), run_id)
            continue
        settled = int(done) + int(errors)
        last, _, since = str(seen.get(run_id, "")).partition("|")
        if not last or int(last) != settled:
            client.hset(repair_progress(), run_id, f"{settled}|{now:.0f}")
        elif now - float(since) >= stall_seconds:
            repaired += repair_stalled(app, client, run_id)
            client.hset(repair_progress(), run_id, f"{settled}|{now:.0f}")
    return repaired


class Repairer(threading.Thread):
    """A scoring worker's background thread: repairs stalled runs every interval."""

    def __init__(self, app: Celery, client: redis.Redis) -> None:
        super().__init__(name="genderscore-repairer", daemon=True)
        self.app, self.client = app, client
        self.stopped = threading.Event()

    def run(self) -> None:
        """Check every ``GENDERSCORE_REPAIR_INTERVAL`` seconds until stopped."""
        while not self.stopped.wait(settings.repair_interval):
            try:
                repair_stalled_runs(self.app, self.client, settings.repair_stall_seconds)
            except redis.RedisError as exc:
                log.warning("repair check skipped, Redis unavailable: %s", exc)
            except Exception:  # the thread must outlive any one bad run
                log.exception("repair check failed")
