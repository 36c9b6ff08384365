"""The Celery application: ``celery -A worker worker -Q score`` finds ``worker.celery:app``.

Configuration comes from ``worker.settings`` only. Task modules are listed by name
(``include``) so that this package imports neither ``training`` nor TensorFlow.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from worker.keys import prefix
from worker.settings import Settings, cpu_count, settings

log = logging.getLogger(__name__)

SCORE_QUEUE = "score"
TRAINING_QUEUE = "training"


def transport_options(s: Settings, training: bool = False) -> dict[str, Any]:
    """Redis transport options; a training worker keeps its own unacked index.

    kombu re-queues a delivered, unacknowledged message once it is older than the
    visibility timeout, scanning one unacked index per Redis database. Scoring wants a
    short timeout (a SIGKILLed worker's messages come back soon); training runs for
    hours. Separate indexes let each worker restore only its own messages, each with
    its own timeout.
    """
    options: dict[str, Any] = {
        "global_keyprefix": prefix(),
        "visibility_timeout": s.visibility_timeout,
        # kombu scans for expired unacked messages every 10 s but, by default, acts on
        # one scan in 10: a lost message would wait up to 100 s past its timeout.
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    if training:
        options.update(
            visibility_timeout=s.training_visibility_timeout,
            unacked_key="unacked_training",
            unacked_index_key="unacked_training_index",
            unacked_mutex_key="unacked_training_mutex",
        )
    return options


def celery_config(s: Settings) -> dict[str, Any]:
    """The Celery configuration for settings ``s``."""
    return {
        "broker_url": s.effective_broker_url,
        "result_backend": s.redis_url,  # training progress and results only
        "broker_transport_options": transport_options(s),
        "result_backend_transport_options": {"global_keyprefix": prefix()},
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message is refused by the worker, never deserialized.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once: ack after the work, requeue when the pool process dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Tasks running when the broker connection drops cannot be acked on it: cancel
        # them; their messages come back (Celery 6's default).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_default_queue": SCORE_QUEUE,
        "task_routes": {
            "genderscore.score": {"queue": SCORE_QUEUE},
            "genderscore.train": {"queue": TRAINING_QUEUE},
        },
        # Batches need prefetch x concurrency > batch size (see Settings.prefetch_batches).
        "worker_prefetch_multiplier": s.batch_size * s.prefetch_batches,
        "task_ignore_result": True,
        "result_expires": s.result_ttl_days * 86400,
        # Flower and `genderscore status` see workers and tasks through events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
    }


app = Celery("genderscore", include=["worker.tasks", "training.tasks", "producer.nightly"])
app.conf.update(celery_config(settings))


@signals.celeryd_init.connect
def configure_worker(sender: Any = None, conf: Any = None, options: Any = None, **_: Any) -> None:
    """Per-role settings, decided by the queues the worker consumes (``-Q``)."""
    global _pool_processes
    _pool_processes = int((options or {}).get("concurrency") or 0) or cpu_count()
    queues = _queue_names((options or {}).get("queues"))
    if TRAINING_QUEUE in queues:
        if queues != {TRAINING_QUEUE}:
            raise SystemExit(
                "genderscore: consume the training queue on its own worker "
                "(celery -A worker worker -Q training -c 1): its visibility timeout "
                "and prefetch differ from scoring's"
            )
        conf.broker_transport_options = transport_options(settings, training=True)
        conf.worker_prefetch_multiplier = 1
        _role.append(TRAINING_QUEUE)
    elif not queues or SCORE_QUEUE in queues:
        from worker.model import ModelError, check_model_file

        # Fail at start, not on every task: check the default model without TensorFlow.
        try:
            check_model_file(settings.model)
        except ModelError as exc:
            raise SystemExit(f"genderscore: {exc}") from None


_pool_processes = 0
_role: list[str] = []  # set by configure_worker, logged once logging is set up


@signals.worker_ready.connect
def log_role(**_: Any) -> None:
    """Say which transport settings this worker runs with."""
    if TRAINING_QUEUE in _role:
        log.info(
            "training worker: visibility timeout %ss, prefetch 1, own unacked index",
            settings.training_visibility_timeout,
        )


def pool_processes() -> int:
    """Processes in this worker's pool (TensorFlow threads are shared among them)."""
    return _pool_processes or cpu_count()


def _queue_names(queues: Any) -> set[str]:
    if not queues:
        return set()
    if isinstance(queues, str):
        return {q.strip() for q in queues.split(",") if q.strip()}
    return {str(q) for q in queues}
