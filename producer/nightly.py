"""Nightly scoring of new profiles: a Celery beat entry, a Redis lock and two plain tasks.

Beat sends ``genderscore.nightly`` on ``GENDERSCORE_NIGHTLY_CRON`` (UTC; a plain number
is an interval in seconds, for tests), with no arguments: the worker that runs it reads
the source, output folder and model from its own settings (a message never names a
path). The source is ``GENDERSCORE_NIGHTLY_SOURCE``, a folder or a URL prefix
(``s3://bucket/profiles/image/``), or else ``GENDERSCORE_NIGHTLY_IMAGES_DIR``. The task
takes the nightly lock, refuses a source that is empty, cannot be listed, or shrank below
``GENDERSCORE_NIGHTLY_MIN_SHARE`` of the previous night's, enqueues only the pictures
the model has not scored as they are now (a folder's content hash, ``producer.newness``;
a prefix's ETag or version token from the listing, ``producer.sources``, with no
download) and hands over to
``genderscore.nightly_finish``, which checks the run every
``GENDERSCORE_NIGHTLY_POLL_SECONDS`` (a countdown, not a sleep: no pool process waits
for the run), then writes ``<output>/<YYYY-MM-DD>-<run_id>.csv``, copies it to
``<output>/latest.csv`` and releases the lock.

The lock (``SET NX`` with ``GENDERSCORE_NIGHTLY_LOCK_SECONDS`` of expiry) is what keeps
two nightly runs from overlapping, whatever number of beat processes send the task: a
nightly task that finds it held logs a line and ends. A run still unfinished when its
lock is about to expire is collected as it is (its pending pictures go to the errors
file as ``missing``) and is remembered as undelivered: every later night adds the
results that arrived since to its own CSV, so a picture counts as delivered only once
it is in a nightly output. Each night records its outcome in Redis
(``nightly:last_success``, ``nightly:last_failure``), which the metrics export.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task, signals
from celery.schedules import ParseException, crontab, schedule
from celery.utils.log import get_task_logger

from producer.enqueue import enqueue_run, new_run_id
from producer.newness import only_new_pictures as only_new_files
from producer.sources import RunPictures, gather, only_new_pictures
from worker.celery import SCORE_QUEUE, app
from worker.files import errors_path, write_atomic
from worker.ids import check_run_id
from worker.keys import (
    nightly_count,
    nightly_last_failure,
    nightly_last_success,
    nightly_lock,
    nightly_undelivered,
    nightly_undelivered_runs,
)
from worker.model import check_model_file
from worker.results import connect, run_counts
from worker.runs import repair_stalled
from worker.settings import Settings, settings
from worker.sources import FolderSource, SourceError, redact_url

if TYPE_CHECKING:
    from producer.collect import Collected, RunData
# producer.collect (pandas, 80 MB and a second of import) is imported where a night is
# collected: every scoring worker imports this module (the app's include list), and its
# pool processes would carry pandas for nothing (issue 11: RSS and cold start).

log = get_task_logger(__name__)
beat_log = logging.getLogger(__name__)

NIGHTLY_TASK = "genderscore.nightly"
FINISH_TASK = "genderscore.nightly_finish"
SCHEDULE_ENTRY = "genderscore-nightly"
LATEST = "latest.csv"
NIGHTLY_RUN_RE = re.compile(r"nightly-[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")
TASK_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")

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
    """What a nightly run works on, from the settings of the worker that runs it."""

    source: Path | str  # a folder, or a URL prefix as GENDERSCORE_NIGHTLY_SOURCE gives it
    output_dir: Path
    model: Path
    lock_seconds: int
    poll_seconds: float
    min_share: float

    @classmethod
    def from_settings(cls, s: Settings) -> NightlyConfig:
        """The nightly configuration of settings ``s`` (its source must be set)."""
        source = s.nightly_source_text
        if source is None:
            raise ValueError(
                "neither GENDERSCORE_NIGHTLY_SOURCE nor GENDERSCORE_NIGHTLY_IMAGES_DIR is "
                "set on this worker"
            )
        return cls(
            s.nightly_images_dir.resolve() if s.nightly_images_dir is not None else source,
            s.nightly_output_dir.resolve(),
            s.model.resolve(),
            s.nightly_lock_seconds,
            s.nightly_poll_seconds,
            s.nightly_min_share,
        )


def beat_schedule(s: Settings) -> dict[str, dict[str, Any]]:
    """The beat entry of the nightly run; empty when no source is configured."""
    every = parse_schedule(s.nightly_cron)
    if s.nightly_source_text is None:
        return {}
    return {
        SCHEDULE_ENTRY: {"task": NIGHTLY_TASK, "schedule": every, "options": {"queue": SCORE_QUEUE}}
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
    """What ``start_nightly`` did: ``locked``, ``refused``, ``nothing_new`` or ``started``."""

    status: str
    run_id: str | None = None
    enqueued: int = 0
    skipped: int = 0
    delivered_late: int = 0


class SourceRefused(RuntimeError):
    """The nightly source is empty or shrank too much: nothing is scored, the night fails."""


def record_success(client: redis.Redis) -> None:
    """The night went as planned (``nightly:last_success``, for the metrics)."""
    client.set(nightly_last_success(), f"{time.time():.3f}")


def record_failure(client: redis.Redis, reason: str) -> None:
    """The night failed, and why (``nightly:last_failure``, for the metrics and alerts)."""
    try:
        client.hset(
            nightly_last_failure(), mapping={"at": f"{time.time():.3f}", "reason": reason[:500]}
        )
    except redis.RedisError as exc:
        log.error("nightly: cannot record the failure in Redis (%s): %s", exc, reason)


def check_source_size(client: redis.Redis, count: int, min_share: float) -> None:
    """Refuse an empty source, or one below ``min_share`` of the previous night's count."""
    if count == 0:
        raise SourceRefused("the nightly source holds no picture (is the share mounted?)")
    previous = int(client.get(nightly_count()) or 0)
    if previous and count < min_share * previous:
        raise SourceRefused(
            f"the nightly source shrank from {previous} to {count} pictures, below "
            f"GENDERSCORE_NIGHTLY_MIN_SHARE={min_share} of the previous night's: refused"
        )


def list_nightly(source: Path | str) -> RunPictures:
    """The nightly source's pictures; SourceRefused when it cannot be listed (a missing
    bucket or prefix, a 403, a folder that is not there)."""
    try:
        return gather(str(source), None)
    except SourceError as exc:
        raise SourceRefused(f"the nightly source cannot be listed: {exc}") from None


def start_nightly(
    celery_app: Celery, client: redis.Redis, config: NightlyConfig, task_id: str
) -> NightlyStart:
    """Take the lock, find the new or changed pictures and enqueue them as one run.

    The lock stays held when a run starts (``finish_nightly`` releases it); it is
    released here when there is nothing to score or anything fails. A night with
    nothing new still delivers the late results of earlier nights.
    """
    from producer.collect import RunData

    run_id = acquire_lock(client, f"nightly-{new_run_id()}", task_id, config.lock_seconds)
    if run_id is None:
        log.info(
            "nightly: run %s still holds the lock; this one is skipped", lock_holder(client) or "?"
        )
        return NightlyStart("locked")
    try:
        sha = check_model_file(config.model)
        found = list_nightly(config.source)
        if found.skipped:
            log.warning(
                "nightly: %d files of %s are not pictures, skipped (first: %s)",
                len(found.skipped),
                found.shown,
                found.skipped[0][0],
            )
        check_source_size(client, len(found.pictures), config.min_share)
        client.set(nightly_count(), len(found.pictures))
        if isinstance(found.source, FolderSource):
            pictures, unchanged = only_new_files(client, sha, found.source.root, found.pairs)
        else:
            refs, unchanged = only_new_pictures(client, sha, found.pictures)
            pictures = [(p.userid, p.name) for p in refs]
        if not pictures:
            late = late_results(client, set())
            log.info(
                "nightly: nothing new in %s (%d pictures, all scored by model %s)",
                found.shown,
                unchanged,
                sha[:12],
            )
            delivered = len(late.data.predictions) + len(late.data.errors)
            if delivered:
                night = RunData(run_id, {}, late.data.predictions, late.data.errors)
                written = write_nightly_outputs(night, config.output_dir, time.time())
                log.info("nightly: %d late results delivered in %s", delivered, written.csv_path)
            forget_delivered(client, late)
            record_success(client)
            release_lock(client, run_id, task_id)
            return NightlyStart("nothing_new", skipped=unchanged, delivered_late=delivered)
        result = enqueue_run(
            celery_app,
            client,
            found.source.spec,
            pictures,
            config.model,
            sha,
            run_id,
            versions=found.versions,
        )
    except BaseException as exc:
        record_failure(client, f"run {run_id} did not start: {exc}")
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


@dataclass
class LateResults:
    """What earlier nights owed and can deliver tonight."""

    data: RunData  # the results that arrived since (each prediction with its own model)
    owed_by: dict[str, set[str]]  # earlier run -> userids it no longer owes after tonight


def late_results(client: redis.Redis, own: set[str]) -> LateResults:
    """Results that earlier nights had not delivered and that have arrived since.

    ``own`` are the userids of tonight's run: its own result wins, and the earlier
    night no longer owes them.
    """
    from producer.collect import RunData, load_run

    late = LateResults(RunData("late", {}, {}, {}), {})
    for run_id in sorted(map(str, client.smembers(nightly_undelivered_runs()))):
        owed = set(map(str, client.smembers(nightly_undelivered(run_id))))
        try:
            earlier = load_run(client, run_id)
        except KeyError:  # the run expired: nothing more will come
            late.owed_by[run_id] = owed
            continue
        settled = set()
        for userid in owed - own:
            if userid in earlier.predictions:
                prediction = earlier.predictions[userid]
                late.data.predictions[userid] = prediction._replace(model=earlier.model_id)
                settled.add(userid)
            elif userid in earlier.errors:
                late.data.errors[userid] = earlier.errors[userid]
                settled.add(userid)
        late.owed_by[run_id] = settled | (owed & own)
    return late


def forget_delivered(client: redis.Redis, late: LateResults) -> None:
    """Earlier nights no longer owe what tonight delivered (or took over)."""
    for run_id, done in late.owed_by.items():
        key = nightly_undelivered(run_id)
        if done:
            client.srem(key, *done)
        if not client.scard(key):
            client.srem(nightly_undelivered_runs(), run_id)


def merge(tonight: RunData, late: LateResults) -> RunData:
    """Tonight's run with the late results of earlier nights added."""
    from producer.collect import RunData

    predictions = {
        userid: p._replace(model=p.model or tonight.model_id)
        for userid, p in tonight.predictions.items()
    }
    predictions.update(late.data.predictions)
    errors = {**tonight.errors, **late.data.errors}
    return RunData(tonight.run_id, tonight.meta, predictions, errors, list(tonight.missing))


def write_nightly_outputs(data: RunData, output_dir: Path, started_at: float) -> Collected:
    """Write the night's dated CSV, then replace ``latest.csv`` with a copy."""
    from producer.collect import write_outputs

    written = write_outputs(data, nightly_csv(output_dir, data.run_id, started_at))
    # Errors file first: a reader that sees the new latest.csv sees its errors too.
    write_atomic(errors_path(output_dir / LATEST), written.errors_path.read_bytes())
    write_atomic(output_dir / LATEST, written.csv_path.read_bytes())
    return written


def finish_nightly(
    client: redis.Redis, run_id: str, task_id: str, output_dir: Path, deadline: float
) -> Collected | None:
    """Write the run's CSVs and release the lock once it is finished (or past ``deadline``).

    None while the run is still going. A run collected unfinished is remembered as owing
    its pending pictures to later nights.
    """
    from producer.collect import load_run

    counts = run_counts(client, run_id)
    late_now = time.time() >= deadline
    if not counts.finished and not late_now:
        # Messages lost in transit (BRPOP before kombu's unacked entry) come back here.
        repair_stalled(app, client, run_id)
        return None
    try:
        tonight = load_run(client, run_id)
        own = set(tonight.predictions) | set(tonight.errors) | set(tonight.missing)
        late = late_results(client, own)
        started_at = float(tonight.meta.get("started_at") or time.time())
        written = write_nightly_outputs(merge(tonight, late), output_dir, started_at)
        forget_delivered(client, late)
        if tonight.missing:
            client.sadd(nightly_undelivered(run_id), *tonight.missing)
            client.sadd(nightly_undelivered_runs(), run_id)
            reason = (
                f"run {run_id} still had {len(tonight.missing)} pending pictures at its "
                "deadline: collected without them (a later night delivers them)"
            )
            log.error("nightly: %s", reason)
            record_failure(client, reason)
        else:
            record_success(client)
    except Exception as exc:
        record_failure(client, f"run {run_id} could not be collected: {exc}")
        raise
    finally:
        if not release_lock(client, run_id, task_id):
            log.warning("nightly: run %s no longer held the lock (expired)", run_id)
    log.info(
        "nightly: run %s done: %d scored, %d errors (%d late from earlier nights) -> %s (and %s)",
        run_id,
        written.scored,
        written.errors,
        len(late.data.predictions) + len(late.data.errors),
        written.csv_path,
        output_dir / LATEST,
    )
    return written


# --- tasks -----------------------------------------------------------------------------


@app.task(name=NIGHTLY_TASK, bind=True, ignore_result=True)
def nightly(self: Task[Any, Any]) -> dict[str, Any]:
    """Start tonight's run of new and changed pictures, unless one is in progress."""
    client = connect()
    try:
        config = NightlyConfig.from_settings(settings)
    except ValueError as exc:
        record_failure(client, str(exc))
        raise
    task_id = str(self.request.id)
    try:
        started = start_nightly(app, client, config, task_id)
    except SourceRefused as exc:
        log.error("nightly: %s", exc)
        return {"status": "refused", "reason": str(exc)}
    if started.run_id is not None:
        # Give up a little before the lock expires, so that no second run can start first.
        lock, poll = config.lock_seconds, config.poll_seconds
        deadline = time.time() + max(lock - 2 * poll, lock / 2)
        nightly_finish.apply_async((started.run_id, task_id, deadline), countdown=poll)
    return {
        "status": started.status,
        "run_id": started.run_id,
        "enqueued": started.enqueued,
        "skipped": started.skipped,
        "delivered_late": started.delivered_late,
    }


@app.task(name=FINISH_TASK, bind=True, ignore_result=True)
def nightly_finish(self: Task[Any, Any], run_id: str, task_id: str, deadline: float) -> str:
    """Write the nightly CSVs once the run is finished; checks again later until it is.

    Every argument is checked: the output folder comes from the settings, never from
    the message.
    """
    if not isinstance(run_id, str) or not NIGHTLY_RUN_RE.fullmatch(check_run_id(run_id)):
        raise ValueError(f"not a nightly run id: {run_id[:80]!a}")
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        raise ValueError("invalid nightly task id")
    if not isinstance(deadline, int | float) or not math.isfinite(deadline):
        raise ValueError("invalid nightly deadline")
    output_dir = settings.nightly_output_dir.resolve()
    written = finish_nightly(connect(), run_id, task_id, output_dir, float(deadline))
    if written is None:
        self.apply_async((run_id, task_id, deadline), countdown=settings.nightly_poll_seconds)
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
        beat_log.warning(
            "nightly: neither GENDERSCORE_NIGHTLY_SOURCE nor GENDERSCORE_NIGHTLY_IMAGES_DIR "
            "is set: no nightly run"
        )
    else:
        beat_log.info(
            "nightly: %s on %s (UTC) -> %s",
            redact_url(settings.nightly_source_text or ""),
            settings.nightly_cron,
            settings.nightly_output_dir,
        )


_install_schedule()
