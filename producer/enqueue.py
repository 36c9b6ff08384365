"""Enqueueing a run: one ``genderscore.score`` message per userid picture.

A run has one source (a folder or a URL prefix, or a manifest of URLs) and one model.
Userids are recorded in the run's id set (with their picture's name) only after their
messages are published: a producer interrupted mid-publish leaves its unpublished
userids out of the set, so running ``score`` again with the same run id publishes
exactly the userids the run does not hold yet, and never one twice. Messages are
published through ``worker.broker`` (a thousand per round trip on Redis).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from secrets import token_hex

import redis
from celery import Celery

from worker.ids import check_run_id, check_userid
from worker.keys import run_keys
from worker.results import create_run, seal_run
from worker.runs import publish_pictures

log = logging.getLogger(__name__)
CHUNK = 1000


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


def enqueue_run(
    app: Celery,
    client: redis.Redis,
    source: str,
    pictures: Sequence[tuple[str, str]],
    model: Path,
    model_sha: str,
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    versions: Mapping[str, str] | None = None,
) -> Enqueued:
    """Create (or extend) a run and enqueue every ``(userid, name)`` not already in it.

    ``source`` is the run's source spec (``worker.sources``); ``name`` a picture's name
    within it (a file or object name, a manifest's URL). ``versions`` (userid -> the
    store's version token from the listing) travel with the messages: the worker keeps
    them in the model's scored index, which ``--only-new`` compares with the next
    listing. Raises ``worker.results.RunConflict`` when the run exists with another
    model or source.
    """
    run_id = check_run_id(run_id or new_run_id())
    unique = dict((check_userid(u), name) for u, name in pictures)
    create_run(
        client,
        run_id,
        {"source": source, "model": str(model.resolve()), "model_sha": model_sha},
    )
    ids_key = run_keys(run_id).ids
    new: list[tuple[str, str]] = []
    items = list(unique.items())
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        known = client.hmget(ids_key, [u for u, _ in chunk])
        new += [item for item, present in zip(chunk, known, strict=True) if present is None]
    publish_pictures(app, client, run_id, new, progress, versions=versions)
    total = int(client.hlen(ids_key))
    seal_run(client, run_id, total)
    log.info("run %s: %d enqueued, %d already in the run", run_id, len(new), len(unique) - len(new))
    return Enqueued(run_id, len(new), len(unique) - len(new), total)
