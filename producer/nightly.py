"""Nightly scoring of new profiles: a Celery beat entry, a Redis lock and two plain tasks.

Beat sends ``genderscore.nightly`` on ``GENDERSCORE_NIGHTLY_CRON`` (UTC; a plain number
is an interval in seconds, for tests) with the folder, output folder and model of its
own settings as arguments, so any scoring worker can run it. The task takes the
nightly lock, enqueues only the pictures the model has not scored as they are now
(``producer.newness``) and hands over to ``genderscore.nightly_finish``, which checks
the run every ``GENDERSCORE_NIGHTLY_POLL_SECONDS`` (a countdown, not a sleep: no pool
process waits for the run), then writes ``<output>/<YYYY-MM-DD>-<run_id>.csv``, copies
it to ``<output>/latest.csv`` and releases the lock.

The lock (``SET NX`` with ``GENDERSCORE_NIGHTLY_LOCK_SECONDS`` of expiry) is what keeps
two nightly runs from overlapping, whatever number of beat processes send the task: a
nightly task that finds it held logs a line and ends. A run still unfinished when its
lock is about to expire is collected as it is (missing pictures go to the errors file).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.schedules import ParseException, crontab, schedule
from celery.utils.log import get_task_logger

from producer.collect import Collected, collect
from producer.enqueue import enqueue_run, new_run_id
from producer.newness import only_new_userids
from producer.reconcile import repair_stalled
from producer.scan import scan_pictures
from worker.celery import SCORE_QUEUE, app
from worker.files import errors_path, write_atomic
from worker.keys import nightly_lock
from worker.model import check_model_file
from worker.results import connect, run_counts
from worker.settings import Settings, settings

log = get_task_logger(__name__)
beat_log = logging.getLogger(__name__)

NIGHTLY_TASK = "genderscore.nightly"
FINISH_TASK = "genderscore.nightly_finish"
SCHEDULE_ENTRY = "genderscore-nightly"
LATEST = "latest.csv"

# Compare-and-delete: a run releases the lock only while it still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ScheduleError(ValueError):
    """GENDERSCORE_NIGHTLY_CRON cannot be read."""


def parse_schedule(expression: str) -> crontab | schedule:
    """Five cron fields (``0 2 * * *``, UTC), or a number of seconds between runs."""
    text = expression.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds <= 0:
            raise ScheduleError(f"GENDERSCORE_NIGHTLY_CRON={expression!r}: seconds must be > 0")
        return schedule(timedelta(seconds=seconds))
    if len(text.split()) != 5:
        raise ScheduleError(
            f"GENDERSCORE_NIGHTLY_CRON={expression!r}: expected five cron fields "
            "'minute hour day month weekday' (e.g. '0 2 * * *'), or a number of seconds"
        )
    try:
        return crontab.from_string(text)
    except (ValueError, ParseException) as exc:
        raise ScheduleError(f"GENDERSCORE_NIGHTLY_CRON={expression!r}: {exc}") from None


@dataclass(frozen=True)
class NightlyConfig:
    """What a nightly run works on: beat's settings, sent as the task's arguments."""

    images_dir: str
    output_dir: str
    model: str
    lock_seconds: int
    poll_seconds: float

    @classmethod
    def from_settings(cls, s: Settings) -> NightlyConfig:
        """The nightly configuration of settings ``s`` (its images folder must be set).

        Paths are made absolute here: the worker that runs the task may have another
        working directory (in docker-compose.yml every service mounts the same paths).
        """
        if s.nightly_images_dir is None:
            raise ValueError("GENDERSCORE_NIGHTLY_IMAGES_DIR is not set")
        return cls(
            str(s.nightly_images_dir.resolve()),
            str(s.nightly_output_dir.resolve()),
            str(s.model.resolve()),
            s.nightly_lock_seconds,
            s.nightly_poll_seconds,
        )


def beat_schedule(s: Settings) -> dict[str, dict[str, Any]]:
    """The beat entry of the nightly run; empty when no images folder is configured."""
    every = parse_schedule(s.nightly_cron)
    if s.nightly_images_dir is None:
        return {}
    return {
        SCHEDULE_ENTRY: {
            "task": NIGHTLY_TASK,
            "schedule": every,
            "kwargs": asdict(NightlyConfig.from_settings(s)),
            "options": {"queue": SCORE_QUEUE},
        }
    }


# --- the lock -------------------------------------------------------------------------


def acquire_lock(client: redis.Redis, run_id: str, task_id: str, seconds: int) -> str | None:
    """Take the nightly lock for ``run_id``; the run id to go on with, or None if held.

    The lock holds ``<run_id> <task_id>``: a redelivered nightly task (its worker died)
    finds its own task id there and resumes the same run instead of skipping it.
    """
    key = nightly_lock()
    if client.set(key, f"{run_id} {task_id}", nx=True, ex=seconds):
        return run_id
    held = str(client.get(key) or "")  # the client decodes responses
    held_run, _, held_task = held.partition(" ")
    if held_task and held_task == task_id:
        return held_run
    return None


def lock_holder(client: redis.Redis) -> str | None:
    """The run id that holds the nightly lock, if any."""
    held = client.get(nightly_lock())
    return str(held).partition(" ")[0] if held else None


def release_lock(client: redis.Redis, run_id: str, task_id: str) -> bool:
    """Release the lock if ``run_id`` (started by ``task_id``) still holds it."""
    return bool(client.eval(_RELEASE, 1, nightly_lock(), f"{run_id} {task_id}"))


# --- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NightlyStart:
    """What ``start_nightly`` did: ``locked``, ``nothing_new`` or ``started``."""

    status: str
    run_id: str | None = None
    enqueued: int = 0
    skipped: int = 0


def start_nightly(
    celery_app: Celery, client: redis.Redis, config: NightlyConfig, task_id: str
) -> NightlyStart:
    """Take the lock, find the new or changed pictures and enqueue them as one run.

    The lock stays held when a run starts (``finish_nightly`` releases it); it is
    released here when there is nothing to do or anything fails.
    """
    run_id = acquire_lock(client, f"nightly-{new_run_id()}", task_id, config.lock_seconds)
    if run_id is None:
        log.info(
            "nightly: run %s still holds the lock; this one is skipped", lock_holder(client) or "?"
        )
        return NightlyStart("locked")
    try:
        model = Path(config.model)
        sha = check_model_file(model)
        images_dir = Path(config.images_dir)
        scan = scan_pictures(images_dir)
        if scan.skipped:
            log.warning(
                "nightly: %d files of %s are not <userid>.jpg, skipped (first: %s)",
                len(scan.skipped),
                images_dir,
                scan.skipped[0][0],
            )
        userids, unchanged = only_new_userids(client, sha, images_dir, scan.userids)
        if not userids:
            log.info(
                "nightly: nothing new in %s (%d pictures, all scored by model %s)",
                images_dir,
                unchanged,
                sha[:12],
            )
            release_lock(client, run_id, task_id)
            return NightlyStart("nothing_new", skipped=unchanged)
        result = enqueue_run(celery_app, client, images_dir, model, sha, userids, run_id)
    except BaseException:
        release_lock(client, run_id, task_id)
        raise
    log.info(
        "nightly: run %s started: %d new or changed pictures enqueued, %d unchanged",
        run_id,
        result.published,
        unchanged,
    )
    return NightlyStart("started", run_id, result.published, unchanged)


def nightly_csv(output_dir: Path, run_id: str, started_at: float) -> Path:
    """``<output>/<YYYY-MM-DD>-<run_id>.csv``, dated by the run's start (UTC)."""
    return output_dir / f"{datetime.fromtimestamp(started_at, UTC):%Y-%m-%d}-{run_id}.csv"


def write_nightly_outputs(
    client: redis.Redis, run_id: str, output_dir: Path, partial: bool = False
) -> Collected:
    """Collect the run into its dated CSV, then replace ``latest.csv`` with a copy."""
    started_at = float(run_counts(client, run_id).meta.get("started_at") or time.time())
    written = collect(client, run_id, nightly_csv(output_dir, run_id, started_at), partial=partial)
    # Errors file first: a reader that sees the new latest.csv sees its errors too.
    write_atomic(errors_path(output_dir / LATEST), written.errors_path.read_bytes())
    write_atomic(output_dir / LATEST, written.csv_path.read_bytes())
    return written


def finish_nightly(
    client: redis.Redis, run_id: str, task_id: str, output_dir: Path, deadline: float
) -> Collected | None:
    """Write the run's CSVs and release the lock once it is finished (or past ``deadline``).

    None while the run is still going.
    """
    counts = run_counts(client, run_id)
    late = time.time() >= deadline
    if not counts.finished and not late:
        # Messages lost in transit (BRPOP before kombu's unacked entry) come back here.
        repair_stalled(app, client, run_id)
        return None
    if not counts.finished:
        log.error(
            "nightly: run %s still has %d pending pictures at its deadline; "
            "collecting what there is (see `genderscore reconcile %s`)",
            run_id,
            counts.pending,
            run_id,
        )
    try:
        written = write_nightly_outputs(client, run_id, output_dir, partial=not counts.finished)
    finally:
        if not release_lock(client, run_id, task_id):
            log.warning("nightly: run %s no longer held the lock (expired)", run_id)
    log.info(
        "nightly: run %s done: %d scored, %d errors -> %s (and %s)",
        run_id,
        written.scored,
        written.errors,
        written.csv_path,
        output_dir / LATEST,
    )
    return written


# --- tasks -----------------------------------------------------------------------------


@app.task(name=NIGHTLY_TASK, bind=True, ignore_result=True)
def nightly(
    self: Task[Any, Any],
    images_dir: str,
    output_dir: str,
    model: str,
    lock_seconds: int,
    poll_seconds: float,
) -> dict[str, Any]:
    """Start tonight's run of new and changed pictures, unless one is in progress."""
    config = NightlyConfig(images_dir, output_dir, model, lock_seconds, poll_seconds)
    task_id = str(self.request.id)
    started = start_nightly(app, connect(), config, task_id)
    if started.run_id is not None:
        # Give up a little before the lock expires, so that no second run can start first.
        deadline = time.time() + max(lock_seconds - 2 * poll_seconds, lock_seconds / 2)
        nightly_finish.apply_async(
            (started.run_id, task_id, output_dir, deadline, poll_seconds),
            countdown=poll_seconds,
        )
    return asdict(started)


@app.task(name=FINISH_TASK, bind=True, ignore_result=True)
def nightly_finish(
    self: Task[Any, Any],
    run_id: str,
    task_id: str,
    output_dir: str,
    deadline: float,
    poll_seconds: float,
) -> str:
    """Write the nightly CSVs once the run is finished; checks again later until it is."""
    written = finish_nightly(connect(), run_id, task_id, Path(output_dir), deadline)
    if written is None:
        self.apply_async(
            (run_id, task_id, output_dir, deadline, poll_seconds), countdown=poll_seconds
        )
        return "pending"
    return str(written.csv_path)


# --- beat ------------------------------------------------------------------------------

_schedule_error: str | None = None


def _install_schedule() -> None:
    """Add the nightly entry to ``beat_schedule`` (beat imports this module at start)."""
    global _schedule_error
    try:
        entries = beat_schedule(settings)
    except ScheduleError as exc:
        _schedule_error = str(exc)  # fatal for beat only (below); workers go on
        return
    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), **entries}


@signals.beat_init.connect
def _check_schedule(sender: Any = None, **_: Any) -> None:
    """Stop beat on a bad schedule; say what it will run."""
    if _schedule_error:
        raise SystemExit(f"genderscore: {_schedule_error}")
    entry = app.conf.beat_schedule.get(SCHEDULE_ENTRY)
    if entry is None:
        beat_log.warning("nightly: GENDERSCORE_NIGHTLY_IMAGES_DIR is not set: no nightly run")
    else:
        beat_log.info(
            "nightly: %s on %s (UTC) -> %s",
            entry["kwargs"]["images_dir"],
            settings.nightly_cron,
            entry["kwargs"]["output_dir"],
        )


_install_schedule()
