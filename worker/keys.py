"""The Redis key schema: the only place a genderscore key string is built.

All keys start with ``<prefix>:`` (``GENDERSCORE_KEY_PREFIX``), so one prefix holds
the project's data, Celery's queues and its results alike.

    <p>:run:<run>:meta     hash  model, model_sha, source, total, sealed, started_at,
                                 finished_at, cancelled
    <p>:run:<run>:ids      hash  userid -> picture reference, relative to the source
                                 (enqueued userids: dedupe, reconcile, repair)
    <p>:run:<run>:pred     hash  userid -> "<p_female>|<f|m>|<unix time>" (one per userid)
    <p>:run:<run>:err      hash  userid -> "<kind>: <message>"        (never beside a pred)
    <p>:run:<run>:tries    hash  userid -> deliveries seen by workers; "<userid>:skipped"
                                 -> redeliveries after it was settled; "<userid>:deaths"
                                 -> worker-process deaths it is blamed for;
                                 "<userid>:solo" -> pid scoring it alone right now
    <p>:runs               zset  run id scored by start time
    channel <p>:run:<run>:meta   "finished" is published on it when the run finishes
    <p>:scored:<model_sha> hash  userid -> picture content hash (nightly --only-new)
    <p>:train:<task_id>    hash  training progress (epoch, metrics) for `status`
    <p>:lock:nightly       str   nightly run lock, with expiry
    <p>:lock:repair        str   held by the one worker repairing a stalled run
    <p>:repair:progress    hash  run -> "<settled>|<since>": when a run last made progress
    <p>:nightly:count      str   pictures in the nightly source last night (shrink check)
    <p>:nightly:last_success  str   unix time of the last night that went as planned
    <p>:nightly:last_failure  hash  at, reason: the last night that did not
    <p>:nightly:undelivered   set   nightly runs collected before they finished
    <p>:nightly:undelivered:<run> set userids that run still owes to a nightly output
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.settings import settings


@dataclass(frozen=True)
class RunKeys:
    """Keys of one scoring run."""

    meta: str
    ids: str
    pred: str
    err: str
    tries: str

    def all(self) -> tuple[str, ...]:
        """Every key of the run (for expiry and deletion)."""
        return (self.meta, self.ids, self.pred, self.err, self.tries)


def prefix() -> str:
    """The global key prefix, with its trailing colon."""
    return f"{settings.key_prefix}:"


def run_keys(run_id: str) -> RunKeys:
    """The keys of run ``run_id``."""
    base = f"{prefix()}run:{run_id}:"
    return RunKeys(
        meta=base + "meta",
        ids=base + "ids",
        pred=base + "pred",
        err=base + "err",
        tries=base + "tries",
    )


def run_finished_channel(run_id: str) -> str:
    """The Pub/Sub channel a run's finish is announced on (the name of its meta key)."""
    return run_keys(run_id).meta


def runs_index() -> str:
    """Sorted set of run ids by start time."""
    return f"{prefix()}runs"


def scored_index(model_sha: str) -> str:
    """userid -> content hash of the picture last scored by that model."""
    return f"{prefix()}scored:{model_sha}"


def training_progress(task_id: str) -> str:
    """Progress of one training task."""
    return f"{prefix()}train:{task_id}"


def training_index() -> str:
    """Sorted set of training task ids by submission time."""
    return f"{prefix()}trains"


def model_loads() -> str:
    """Hash of worker process -> model loads (one per process is the contract)."""
    return f"{prefix()}model_loads"


def nightly_lock() -> str:
    """Lock held by the nightly run in progress."""
    return f"{prefix()}lock:nightly"


def nightly_count() -> str:
    """Pictures the nightly source held last night."""
    return f"{prefix()}nightly:count"


def nightly_last_success() -> str:
    """Unix time of the last nightly run that went as planned."""
    return f"{prefix()}nightly:last_success"


def nightly_last_failure() -> str:
    """Hash ``at``, ``reason`` of the last nightly run that failed."""
    return f"{prefix()}nightly:last_failure"


def nightly_undelivered_runs() -> str:
    """Nightly runs collected before they finished, owing pictures to later nights."""
    return f"{prefix()}nightly:undelivered"


def nightly_undelivered(run_id: str) -> str:
    """Userids the nightly run ``run_id`` has not delivered in any nightly output yet."""
    return f"{prefix()}nightly:undelivered:{run_id}"


def repair_lock() -> str:
    """Lock held while a stalled run is repaired (one repair at a time)."""
    return f"{prefix()}lock:repair"


def repair_progress() -> str:
    """Hash run -> "<settled count>|<unix time it was first seen>": stall detection."""
    return f"{prefix()}repair:progress"
