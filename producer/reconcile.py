"""Repairing a run: re-enqueue every userid left with neither a prediction nor an error.

With AOF persistence nothing is lost; after a Redis crash without it (or a flush),
the run's bookkeeping is gone or partial. ``reconcile`` rebuilds the run's id set from
the picture folder when needed and publishes each userid that has neither a
prediction nor an error. Writes are idempotent, so a userid whose message was still
queued is at worst scored twice and recorded once. (Messages lost in transit are
repaired by the workers themselves: ``worker.runs``.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import redis
from celery import Celery

from producer.scan import scan_pictures
from worker.keys import run_keys
from worker.model import ModelError, check_model_file
from worker.results import RunConflict, create_run, read_hash, run_userids, seal_run
from worker.runs import publish_pictures, unsettled
from worker.sources import FolderSource, parse_spec

log = logging.getLogger(__name__)


class ReconcileError(RuntimeError):
    """The run cannot be repaired with what is known; the message says what to pass."""


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
    source = FolderSource(images_dir.resolve()).spec if images_dir else meta.get("source")
    model_path = model or (Path(meta["model"]) if "model" in meta else None)
    if source is None or model_path is None:
        raise ReconcileError(
            f"Redis has no metadata for run {run_id}: pass --images DIR and --model PATH"
        )
    try:
        sha = check_model_file(model_path)
        create_run(
            client, run_id, {"source": source, "model": str(model_path.resolve()), "model_sha": sha}
        )
    except (ModelError, RunConflict) as exc:
        raise ReconcileError(str(exc)) from None
    if images_dir is not None or not client.exists(keys.ids):
        # The id set may be lost or partial: the folder is the source of truth.
        folder = parse_spec(source)
        if not isinstance(folder, FolderSource):
            raise ReconcileError(f"run {run_id} has no folder to rebuild its userids from")
        scan = scan_pictures(folder.root)
        known = run_userids(client, run_id)
        missing = [(u, name) for u, name in scan.pictures if u not in known]
        if missing:
            client.hset(keys.ids, mapping=dict(missing))
        log.info("run %s: %d userids restored from %s", run_id, len(missing), source)
    todo = unsettled(client, run_id)
    publish_pictures(app, client, run_id, todo, record=False)
    seal_run(client, run_id, int(client.hlen(keys.ids)))
    return len(todo)
