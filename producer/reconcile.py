"""Repairing a run: re-enqueue every userid left with neither a prediction nor an error.

With AOF persistence nothing is lost; after a Redis crash without it (or a flush),
the run's bookkeeping is gone or partial. ``reconcile`` rebuilds the run's id set from
its source when needed and publishes each userid that has neither a prediction nor an
error. Writes are idempotent, so a userid whose message was still queued is at worst
scored twice and recorded once. (Messages lost in transit are repaired by the workers
themselves: ``worker.runs``.)

The source is the one the run recorded (``worker.sources``), or the one given again:

- a folder is scanned again when the id set is lost or partial;
- a URL prefix is listed again, which also gives each picture's version token: the
  re-published messages carry it, so ``--only-new`` knows the pictures afterwards;
- a manifest cannot be read back from Redis: its userids and URLs are in the run's id
  set, and when that set is lost the manifest file must be given again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import redis
from celery import Celery

from producer.scan import scan_pictures
from producer.sources import RunPictures, list_source
from worker.keys import run_keys
from worker.model import ModelError, check_model_file
from worker.results import RunConflict, create_run, read_hash, run_userids, seal_run
from worker.runs import publish_pictures, unsettled
from worker.settings import settings
from worker.sources import (
    FolderSource,
    ManifestSource,
    PictureRef,
    PrefixSource,
    SourceError,
    parse_spec,
)

log = logging.getLogger(__name__)


class ReconcileError(RuntimeError):
    """The run cannot be repaired with what is known; the message says what to pass."""


def reconcile_run(
    app: Celery,
    client: redis.Redis,
    run_id: str,
    given: RunPictures | None = None,
    model: Path | None = None,
) -> int:
    """Re-enqueue the run's unsettled userids; return how many were published.

    ``given`` is the run's source read again by the caller (``producer.sources.gather``),
    needed when Redis lost the run's metadata, or its id set of a manifest run.
    """
    keys = run_keys(run_id)
    meta = read_hash(client, keys.meta)
    spec = given.source.spec if given else meta.get("source")
    model_path = model or (Path(meta["model"]) if "model" in meta else None)
    if spec is None or model_path is None:
        raise ReconcileError(
            f"Redis has no metadata for run {run_id}: pass its source (--images DIR, "
            "--source URL or --manifest FILE) and --model PATH"
        )
    try:
        sha = check_model_file(model_path)
        create_run(
            client, run_id, {"source": spec, "model": str(model_path.resolve()), "model_sha": sha}
        )
        source = parse_spec(spec)
    except (ModelError, RunConflict, SourceError) as exc:
        raise ReconcileError(str(exc)) from None
    rebuild = given is not None or not client.exists(keys.ids)
    versions: dict[str, str] = {}
    found = given
    if found is None and (rebuild or isinstance(source, PrefixSource)):
        found = _read_again(run_id, source)
    if found is not None:
        versions = found.versions
    if rebuild and found is not None:
        # The id set may be lost or partial: the source is the source of truth.
        known = run_userids(client, run_id)
        missing = [(p.userid, p.name) for p in found.pictures if p.userid not in known]
        if missing:
            client.hset(keys.ids, mapping=dict(missing))
        log.info("run %s: %d userids restored from %s", run_id, len(missing), found.shown)
    todo = unsettled(client, run_id)
    publish_pictures(app, client, run_id, todo, record=False, versions=versions)
    seal_run(client, run_id, int(client.hlen(keys.ids)))
    return len(todo)


def _read_again(run_id: str, source: FolderSource | PrefixSource | ManifestSource) -> RunPictures:
    """The run's recorded source, scanned or listed again."""
    if isinstance(source, ManifestSource):
        raise ReconcileError(
            f"run {run_id} was scored from manifest {source.label} and Redis lost its "
            "userids: pass --manifest FILE again"
        )
    if isinstance(source, FolderSource):
        try:
            scan = scan_pictures(source.root, tuple(settings.picture_extensions))
        except OSError as exc:
            raise ReconcileError(f"run {run_id}: cannot scan {source.root} ({exc})") from None
        return RunPictures(source, [_ref(u, n) for u, n in scan.pictures], scan.skipped)
    try:
        listing = list_source(source, settings.picture_extensions)
    except SourceError as exc:
        raise ReconcileError(f"run {run_id}: {exc}") from None
    return RunPictures(source, listing.pictures, listing.skipped)


def _ref(userid: str, name: str) -> PictureRef:
    return PictureRef(userid, name)
