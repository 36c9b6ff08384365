"""The Celery application: ``celery -A worker worker -Q score`` finds ``worker.celery:app``.

Configuration comes from ``worker.settings`` only. Task modules are listed by name
(``include``) so that this package imports neither ``training`` nor TensorFlow.

Invalid settings stop ``celery -A worker ...`` here, at the app's import, with one line
and exit status 2. Logging: Celery sets up its handlers; the hooks below give them the
JSON formatter when ``GENDERSCORE_LOG_FORMAT=json``, warn about unknown
``GENDERSCORE_*`` variables, and keep TensorFlow's C++ lines out of the output.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from celery import Celery, signals
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES

from worker.logs import json_warnings, quiet_native_logs, use_json
from worker.settings import Settings, cpu_count, require_settings, unknown_variables

settings = require_settings()  # before anything else reads them: one line, exit 2
quiet_native_logs()  # before a pool process can import TensorFlow (it inherits this)
if settings.log_format == "json":
    json_warnings()  # Celery warns before its logging is set up

from worker.fastjson import use_for_messages  # noqa: E402
from worker.keys import prefix  # noqa: E402  (reads the settings checked above)

log = logging.getLogger(__name__)

SCORE_QUEUE = "score"
TRAINING_QUEUE = "training"
EXCHANGE = "genderscore"  # RabbitMQ: the topic exchange both queues are bound to


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


def password_in_userinfo(url: str) -> str:
    """A Redis URL with a ``?password=`` query moved into ``:password@`` (same meaning to
    redis-py), where Celery's banner and logs know to mask it."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    password = [v for k, v in query if k.lower() == "password"]
    if not password or parts.password:
        return url
    user = [v for k, v in query if k.lower() == "username"]
    rest = urlencode([(k, v) for k, v in query if k.lower() not in ("password", "username")])
    username = quote(user[0] if user else parts.username or "", safe="")
    auth = f"{username}:{quote(password[0], safe='')}"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}", query=rest))


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis server (else the broker is AMQP: RabbitMQ)."""
    return urlsplit(url).scheme in ("redis", "rediss", "unix")


def amqp_config() -> dict[str, Any]:
    """RabbitMQ: durable quorum queues on a topic exchange, publisher confirms.

    Quorum queues are replicated and keep their messages through a broker restart;
    a topic exchange is what Celery's native delayed delivery needs for countdowns on
    quorum queues (the nightly finisher). No visibility timeout: RabbitMQ returns a
    consumer's unacknowledged messages when its connection closes.
    """
    exchange = Exchange(EXCHANGE, type="topic", durable=True)
    quorum = {"x-queue-type": "quorum"}
    return {
        "task_queues": [
            Queue(name, exchange, routing_key=name, durable=True, queue_arguments=quorum)
            for name in (SCORE_QUEUE, TRAINING_QUEUE)
        ],
        "task_default_exchange": EXCHANGE,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": SCORE_QUEUE,
        "task_default_queue_type": "quorum",
        "broker_transport_options": {"confirm_publish": True},
        "task_create_missing_queues": False,
    }


def celery_config(s: Settings) -> dict[str, Any]:
    """The Celery configuration for settings ``s``."""
    redis_broker = is_redis_url(s.effective_broker_url)
    return {
        "broker_url": password_in_userinfo(s.effective_broker_url),
        "result_backend": password_in_userinfo(s.redis_url),  # training progress, results
        "broker_transport_options": transport_options(s) if redis_broker else {},
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
        # Prefork, finishing at a warm shutdown the batches a pool process already holds
        # (worker.pool); `-P prefork`, Celery's default, selects it too.
        "worker_pool": "worker.pool:FinishingTaskPool",
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
        **({} if redis_broker else amqp_config()),
    }


# Redis: kombu's transport, taking a batch of messages per round trip. Registered under
# the URL schemes themselves, so that the connection still reads as redis:// (Flower's
# broker view and Celery's banner go by the scheme).
TRANSPORT_ALIASES.update(
    redis="worker.redis_transport:Transport", rediss="worker.redis_transport:Transport"
)

# Workers start without mingle and gossip, unless the environment says otherwise: nothing
# here uses what they synchronise (revoked ids, clocks, peer events), and mingle alone
# waits about a second for replies on every start (the cold start). Celery's CLI reads
# CELERY_WORKER_* for its options after it has imported this app.
os.environ.setdefault("CELERY_WORKER_WITHOUT_MINGLE", "true")
os.environ.setdefault("CELERY_WORKER_WITHOUT_GOSSIP", "true")

app = Celery("genderscore", include=["worker.tasks", "training.tasks", "producer.nightly"])
app.conf.update(celery_config(settings))
# Task events leave once per batch, with its outcome, or within 0.25 s (worker.eventflush).
app.steps["consumer"].add("worker.eventflush:CoalescedTaskEvents")
# Message bodies decoded by orjson wherever it reads what kombu's decoder reads.
use_for_messages()


@signals.celeryd_init.connect
def configure_worker(sender: Any = None, conf: Any = None, options: Any = None, **_: Any) -> None:
    """Per-role settings, decided by the queues the worker consumes (``-Q``)."""
    global _pool_processes
    _pool_processes = int((options or {}).get("concurrency") or 0) or cpu_count()
    queues = _queue_names((options or {}).get("queues"))
    if not is_redis_url(settings.effective_broker_url):
        declare_amqp_queues()
    if TRAINING_QUEUE in queues:
        if queues != {TRAINING_QUEUE}:
            raise SystemExit(
                "genderscore: consume the training queue on its own worker "
                "(celery -A worker worker -Q training -c 1): its visibility timeout "
                "and prefetch differ from scoring's"
            )
        if is_redis_url(settings.effective_broker_url):
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


def declare_amqp_queues() -> None:
    """Declare the exchange and both quorum queues on RabbitMQ.

    Celery binds every queue of the app for delayed delivery when a worker starts, also
    those it does not consume: each must exist by then.
    """
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=5)
            for queue in app.amqp.queues.values():
                queue(conn.default_channel).declare()
    except Exception as exc:  # the worker's own start retries the connection
        log.warning("could not declare the queues on the broker yet: %s", exc)


_pool_processes = 0
_role: list[str] = []  # set by configure_worker, logged once logging is set up
_repairer: list[Any] = []  # the scoring worker's repair thread, once started


def is_training_worker() -> bool:
    """Whether this worker consumes the training queue (known once the worker starts,
    before its pool processes fork)."""
    return TRAINING_QUEUE in _role


@signals.worker_ready.connect
def log_role(**_: Any) -> None:
    """Say which transport settings this worker runs with; start a scoring worker's
    repairer (Redis broker only: see ``worker.runs``)."""
    if is_training_worker():
        log.info(
            "training worker: visibility timeout %ss, prefetch 1, own unacked index",
            settings.training_visibility_timeout,
        )
    elif is_redis_url(settings.effective_broker_url):
        from worker.results import connect
        from worker.runs import Repairer

        _repairer.append(Repairer(app, connect()))
        _repairer[0].start()
        log.info(
            "repairing runs stalled for %ss (checked every %ss)",
            settings.repair_stall_seconds,
            settings.repair_interval,
        )


@signals.worker_shutting_down.connect
def stop_repairer(**_: Any) -> None:
    """Stop the repairer with the worker."""
    for repairer in _repairer:
        repairer.stopped.set()


def pool_processes() -> int:
    """Processes in this worker's pool (TensorFlow threads are shared among them)."""
    return _pool_processes or cpu_count()


def _queue_names(queues: Any) -> set[str]:
    if not queues:
        return set()
    if isinstance(queues, str):
        return {q.strip() for q in queues.split(",") if q.strip()}
    return {str(q) for q in queues}


@signals.after_setup_logger.connect
def _worker_logging(logger: logging.Logger | None = None, **_: Any) -> None:
    """JSON on Celery's root handlers when asked; then the settings' warnings."""
    if logger is not None and settings.log_format == "json":
        use_json(list(logger.handlers))
    for warning in unknown_variables():
        log.warning("%s", warning)


@signals.after_setup_task_logger.connect
def _task_logging(logger: logging.Logger | None = None, **_: Any) -> None:
    """JSON on Celery's task logger too (it does not propagate to the root)."""
    if logger is not None and settings.log_format == "json":
        use_json(list(logger.handlers))


@signals.celeryd_after_setup.connect
def _no_banner_with_json(instance: Any = None, **_: Any) -> None:
    """With JSON logs, no startup banner: every line of the output is one JSON object."""
    if instance is not None and settings.log_format == "json":
        instance.quiet = True


@signals.worker_ready.connect
def _no_shutdown_notice_with_json(sender: Any = None, **_: Any) -> None:
    """With JSON logs, the SIGTERM/SIGQUIT handlers without their plain-text notice.

    Celery's handlers write "worker: Warm shutdown (MainProcess)" straight to stdout;
    the same handlers, reinstalled with ``verbose=False``, log nothing (the worker still
    logs its shutdown through logging).
    """
    if settings.log_format != "json" or sender is None:
        return
    from celery.apps import worker as worker_app

    controller = getattr(sender, "controller", None)
    try:
        for name in ("install_worker_term_handler", "install_worker_term_hard_handler"):
            getattr(worker_app, name)(controller, verbose=False)
    except (AttributeError, TypeError, ValueError) as exc:  # another Celery, or thread
        log.debug("kept Celery's shutdown handlers: %s", exc)
