"""The Redis key schema: the only place a genderscore key string is built.

All keys start with ``<prefix>:`` (``GENDERSCORE_KEY_PREFIX``), so one prefix holds
the project's data, Celery's queues and its results alike.

    <p>:run:<run>:meta     hash  model, model_sha, images_dir, total, started_at, finished_at
    <p>:run:<run>:ids      set   userids enqueued in the run (dedupe, reconcile)
    <p>:run:<run>:pred     hash  userid -> "<p_female>|<unix time>"  (one per userid)
    <p>:run:<run>:err      hash  userid -> "<kind>: <message>"        (never beside a pred)
    <p>:run:<run>:tries    hash  userid -> deliveries seen by a worker; "<userid>:solo" ->
                                 attempts scored alone (a picture that kills its worker)
    <p>:runs               zset  run id scored by start time
    <p>:scored:<model_sha> hash  userid -> picture content hash (nightly --only-new)
    <p>:train:<task_id>    hash  training progress (epoch, metrics) for `status`
    <p>:lock:nightly       str   nightly run lock, with expiry
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
