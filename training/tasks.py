"""The Celery task ``genderscore.train``: ``training.train.train`` on the training queue.

The task is thin: it checks its options, reports progress and returns a JSON-able
digest; the work is ``run_training``, a plain function. Progress goes two ways, both
once per epoch: the Celery state ``PROGRESS`` (``AsyncResult.info``, followed by
``genderscore train --submit``) and the Redis hash ``worker.keys.training_progress``
(read by ``genderscore status``; the task id is added to ``training_index``). The hash
holds ``state`` (PENDING, STARTED, PROGRESS, SUCCESS, FAILURE), ``epoch``, ``epochs``,
the epoch's metrics, ``updated_at`` and, at the end, ``summary`` or ``error``.

TensorFlow is imported only inside the task, after the worker's pool has forked.
The queue (``training``) is set by ``task_routes`` in ``worker.celery``; run one
training worker: ``celery -A worker worker -Q training -c 1``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Task
from celery.utils.log import get_task_logger
from redis.typing import EncodableT, FieldT

from training.train import device_description, format_epoch, train
from worker.celery import app
from worker.keys import training_index, training_progress
from worker.logs import import_tensorflow
from worker.model import versioned_model_path
from worker.results import connect
from worker.settings import settings

log = get_task_logger(__name__)

TASK_NAME = "genderscore.train"
# Keyword options of training.train.train a task may pass.
OPTIONS = frozenset(
    {
        "epochs",
        "batch_size",
        "image_size",
        "val_fraction",
        "seed",
        "kernel_size",
        "optimizer",
        "patience",
    }
)
DEFAULT_EPOCHS = 25
UpdateState = Callable[..., None]


class ProgressRecorder:
    """Writes a training task's progress to Redis and to its Celery state.

    Redis errors are logged, never raised: losing a progress line must not lose hours
    of training.
    """

    def __init__(
        self,
        client: redis.Redis | None,
        task_id: str,
        epochs: int,
        update_state: UpdateState | None = None,
    ) -> None:
        self.client = client
        self.task_id = task_id
        self.epochs = epochs
        self.update_state = update_state

    def write(self, fields: dict[str, Any], fresh: bool = False) -> None:
        """Merge ``fields`` into the progress hash (with ``updated_at``), renewing its expiry.

        ``fresh`` first drops what a previous delivery of the task left there.
        """
        if self.client is None:
            return
        key = training_progress(self.task_id)
        mapping: dict[FieldT, EncodableT] = {k: str(v) for k, v in fields.items() if v is not None}
        mapping["updated_at"] = f"{time.time():.3f}"
        try:
            pipe = self.client.pipeline(transaction=True)
            if fresh:
                pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, settings.result_ttl_days * 86400)
            pipe.zadd(training_index(), {self.task_id: time.time()}, nx=True)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot record training progress of %s in Redis: %s", self.task_id, exc)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One finished epoch: a log line, the PROGRESS state and the Redis hash."""
        meta: dict[str, Any] = {"epoch": epoch, "epochs": self.epochs, **metrics}
        log.info("%s", format_epoch(epoch, self.epochs, metrics))
        if self.update_state is not None:
            self.update_state(state="PROGRESS", meta=meta)
        self.write({"state": "PROGRESS", **meta})


def check_task_options(options: dict[str, Any]) -> None:
    """Refuse option names ``train`` does not take (a typo would be silently ignored)."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown training options {', '.join(unknown)}; allowed: {', '.join(sorted(OPTIONS))}"
        )


def run_training(
    task_id: str,
    images_dir: str,
    labels_csv: str,
    out: str,
    options: dict[str, Any],
    update_state: UpdateState | None = None,
    client: redis.Redis | None = None,
) -> dict[str, Any]:
    """Train with progress reporting; return the result's JSON-able digest."""
    check_task_options(options)
    recorder = ProgressRecorder(
        client, task_id, int(options.get("epochs", DEFAULT_EPOCHS)), update_state
    )
    device = device_description()
    log.info("training on %s: %s + %s -> %s %s", device, images_dir, labels_csv, out, options)
    recorder.write(
        {
            "state": "STARTED",
            "epoch": 0,
            "epochs": recorder.epochs,
            "device": device,
            "images_dir": images_dir,
            "labels_csv": labels_csv,
            "out": out,
            "started_at": f"{time.time():.3f}",
        },
        fresh=True,
    )
    try:
        result = train(
            Path(images_dir), Path(labels_csv), Path(out), progress=recorder.epoch, **options
        )
    except Exception as exc:
        recorder.write({"state": "FAILURE", "error": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    digest = {**result.to_dict(), "device": device, "report": result.report.lines()}
    recorder.write(
        {
            "state": "SUCCESS",
            "summary": digest["summary"],
            "model": digest["model"],
            "sha256": digest["sha256"],
            "val_accuracy": digest["val_accuracy"],
            "val_loss": digest["val_loss"],
        }
    )
    log.info("training done: %s", digest["summary"])
    return digest


@app.task(
    name=TASK_NAME,
    bind=True,
    acks_late=True,
    ignore_result=False,
    time_limit=settings.training_time_limit,
)
def train_task(
    self: Task[Any, Any], /, images_dir: str, labels_csv: str, name: str, **options: Any
) -> dict[str, Any]:
    """Train a model from IMAGES_DIR and LABELS_CSV (paths as the worker sees them).

    The model is written to a new version ``<models>/<name>-<time>.h5`` in the folder of
    GENDERSCORE_MODEL, never anywhere a message names and never over the served model:
    ``genderscore promote`` serves it.
    """
    if not all(isinstance(v, str) for v in (images_dir, labels_csv, name)):
        raise ValueError("images_dir, labels_csv and name must be strings")
    out = str(versioned_model_path(name))
    task_id = self.request.id or "eager"
    import_tensorflow()  # here, in the pool process, without its C++ log lines

    def publish_progress(state: str, meta: dict[str, Any]) -> None:
        # update_state feeds AsyncResult and `train --submit`; the event feeds Flower,
        # which shows the latest epoch in its Result column.
        self.update_state(state=state, meta=meta)
        metrics = {k: v for k, v in meta.items() if k not in ("epoch", "epochs")}
        self.send_event(
            "task-progress", result=format_epoch(meta["epoch"], meta["epochs"], metrics)
        )

    return run_training(
        task_id,
        images_dir,
        labels_csv,
        out,
        options,
        update_state=publish_progress,
        client=connect(),
    )
