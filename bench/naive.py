"""The naive Celery baseline (c): what people write first, for comparison only.

One task per picture, ``model.predict`` on that one picture, the model loaded once per
worker process (lazily, after the fork), the result written to Redis by the task.
Celery's own defaults otherwise (prefork, prefetch multiplier 4, early acks). It uses
the project's broker, key prefix and preprocessing, so only the shape of the work
differs from the real pipeline. Start it with::

    celery -A bench.naive worker -Q naive

Its keys live under the benchmark's private prefix, beside the project's:
``<prefix>:bench:naive:<run>`` (userid -> p) and ``<prefix>:bench:naive:loads``
(worker process -> model loads).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery
from celery.utils.log import get_task_logger

from worker.keys import prefix
from worker.settings import settings

log = get_task_logger(__name__)

NAIVE_QUEUE = "naive"
NAIVE_TASK = "bench.naive_score"

app = Celery("bench.naive")
app.conf.update(
    broker_url=settings.effective_broker_url,
    broker_transport_options={"global_keyprefix": prefix()},
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=NAIVE_QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


def results_key(run: str) -> str:
    """userid -> sigmoid output, for one naive run."""
    return f"{prefix()}bench:naive:{run}"


def loads_key() -> str:
    """worker process -> model loads (must be one per process)."""
    return f"{prefix()}bench:naive:loads"


_models: dict[str, Any] = {}
_client: redis.Redis | None = None


def _model(model_path: str) -> Any:
    """The model, loaded on first use in this process."""
    model = _models.get(model_path)
    if model is None:
        import keras

        model = keras.models.load_model(model_path, compile=False)
        _models[model_path] = model
        _redis().hincrby(loads_key(), f"{os.uname().nodename}:{os.getpid()}", 1)
        log.info("naive: model loaded in %d", os.getpid())
    return model


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return _client


@app.task(name=NAIVE_TASK)
def naive_score(run: str, userid: str, picture: str, model_path: str) -> None:
    """Score one picture with ``model.predict`` and store its output."""
    from worker.preprocess import preprocess_file

    model = _model(model_path)
    height, width = int(model.input_shape[1]), int(model.input_shape[2])
    array = preprocess_file(Path(picture), (width, height))
    value = float(np.asarray(model.predict(array[np.newaxis], verbose=0)).reshape(-1)[0])
    _redis().hset(results_key(run), userid, f"{value:.6f}")
