"""Repairing a run after Redis lost data: re-enqueue every userid left unsettled.

With AOF persistence nothing is lost; after a Redis crash without it (or a flush),
the run's bookkeeping is gone or partial. ``reconcile`` rebuilds the run's id set from
the picture folder when needed and publishes each userid that has neither a
prediction nor an error. Writes are idempotent, so a userid whose message was still
queued is at worst scored twice and recorded once.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import redis
from celery import Celery

from producer.enqueue import SCORE_TASK, add_new_ids, publish
from producer.scan import scan_pictures
from worker.keys import prefix, run_keys
from worker.model import ModelError, check_model_file
from worker.results import create_run, read_hash, seal_run

log = logging.getLogger(__name__)


class ReconcileError(RuntimeError):
    """The run cannot be repaired with what is known; the message says what to pass."""


def unsettled(client: redis.Redis, run_id: str) -> list[str]:
    """Userids of the run with neither a prediction nor an error, sorted."""
    keys = run_keys(run_id)
    expected = set(client.sscan_iter(keys.ids, count=5000))
    settled = {u for u, _ in client.hscan_iter(keys.pred, count=5000)}
    settled |= {u for u, _ in client.hscan_iter(keys.err, count=5000)}
    return sorted(expected - settled)


def reconcile_run(
    app: Celery,
    client: redis.Redis,
    run_id: str,
    images_dir: Path | None = None,
    model: Path | None = None,
) -> int:
    """Re-enqueue the run's unsettled userids; return how many were published."""
    keys = run_keys(run_id)
    meta = read_hash(client, keys.meta)
    images = images_dir or (Path(meta["images_dir"]) if "images_dir" in meta else None)
    model_path = model or (Path(meta["model"]) if "model" in meta else None)
    if images is None or model_path is None:
        raise ReconcileError(
            f"Redis has no metadata for run {run_id}: pass --images DIR and --model PATH"
        )
    try:
        sha = check_model_file(model_path)
    except ModelError as exc:
        raise ReconcileError(str(exc)) from None
    create_run(
        client,
        run_id,
        {"images_dir": str(images.resolve()), "model": str(model_path.resolve()), "model_sha": sha},
    )
    if images_dir is not None or not client.exists(keys.ids):
        # The id set may be lost or partial: the folder is the source of truth.
        added = add_new_ids(client, run_id, scan_pictures(images).userids)
        log.info("run %s: %d userids restored from %s", run_id, len(added), images)
    todo = unsettled(client, run_id)
    publish(app, run_id, todo, images.resolve(), model_path.resolve(), client=client)
    seal_run(client, run_id, int(client.scard(keys.ids)))
    return len(todo)


def _in_flight(client: redis.Redis, run_id: str) -> bool:
    """Whether a delivered, unacknowledged score message of the run is still out there."""
    for raw in client.hvals(prefix() + "unacked"):
        try:
            envelope = json.loads(raw)[0]  # kombu stores [message, exchange, routing key]
            if envelope["headers"].get("task") != SCORE_TASK:
                continue
            args = json.loads(base64.b64decode(envelope["body"]))[0]
        except (ValueError, KeyError, IndexError, TypeError):
            return True  # cannot tell: assume it is ours
        if args and args[0] == run_id:
            return True
    return False


def repair_stalled(app: Celery, client: redis.Redis, run_id: str) -> int:
    """Re-enqueue a stalled run's unsettled userids, when nothing can still deliver them.

    Redis's BRPOP hands a message to a worker before kombu records it as unacked: a
    connection lost in between loses the message. Once the queue is empty and no
    unacked message belongs to the run, an unsettled userid can only have been lost
    that way.
    """
    from producer.status import queue_lengths

    if queue_lengths(client)["score"] or _in_flight(client, run_id):
        return 0
    keys = run_keys(run_id)
    meta = read_hash(client, keys.meta)
    todo = unsettled(client, run_id)
    if todo and "images_dir" in meta and "model" in meta:
        log.warning("run %s stalled: re-enqueueing %d userids lost in transit", run_id, len(todo))
        publish(app, run_id, todo, Path(meta["images_dir"]), Path(meta["model"]), client=client)
        return len(todo)
    return 0
