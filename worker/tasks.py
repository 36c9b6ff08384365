"""Celery tasks of the scoring worker: thin wrappers around ``worker.batching``.

``genderscore.score`` takes one picture per message, ``(run_id, userid, picture,
model_path, model_sha)``; the worker buffers messages (celery-batches) and hands a whole
batch to one pool process, which scores it with one forward pass. Each message is
acknowledged only after its outcome is in Redis, and handed back to the queue when its
pool process dies (counted against its userids, see ``worker.batching``) or Redis stays
unreachable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import redis
from billiard.einfo import ExceptionInfo
from celery import signals
from celery.utils.log import get_task_logger
from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.batching import (
    BatchReply,
    BatchScorer,
    MalformedMessage,
    ScoreRequest,
    group_by_run,
)
from worker.celery import app, is_training_worker, pool_processes
from worker.events import TaskEvents
from worker.ids import describe
from worker.pool import shutting_down
from worker.redis_transport import QoS as BatchQoS
from worker.results import connect, record_deaths
from worker.runtime import twin_recorded
from worker.settings import settings

log = get_task_logger(__name__)
pool_log = logging.getLogger("genderscore.worker")  # the main process, outside any task


class ScoreBatches(Batches):  # type: ignore[misc]
    """celery-batches with per-message acks: ack what was recorded, requeue the rest.

    celery-batches acknowledges every message of a batch when the batch returns, even
    when it failed, and never rejects on a lost worker; this flush does both per
    message, from the reply the pool process sends back.
    """

    _scorer: BatchScorer | None = None
    _scorer_lock = threading.Lock()
    _parent_client: redis.Redis | None = None  # the main process's, for lost batches

    @property
    def scorer(self) -> BatchScorer:
        """The per-process scorer, created on first use (after the fork)."""
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = BatchScorer(connect(), processes=pool_processes())
        return self._scorer

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 (Celery's name)
        """A new consumer (after a broker reconnect) gets a new flush timer.

        celery-batches starts its timer only when ``_tref`` is None; the timer of the
        previous consumer is gone after a reconnect, so without this reset a partial
        batch would wait forever in the buffer.
        """
        self._tref = None
        handler = super().Strategy(task, app, consumer)
        # Redis broker: a partial batch goes to the pool as soon as the queue is empty
        # (worker.redis_transport), not after the flush interval.
        drained = getattr(getattr(consumer.connection, "default_channel", None), "on_drained", None)
        if isinstance(drained, list):
            drained.append(self._do_flush)
        return handler

    def flush(self, requests: Collection[Request]) -> Any:
        """Send the batch to a pool process; ack or requeue each message on its reply.

        Once the worker is shutting down, a batch still buffered goes back to the queue
        instead: the pool takes no new work then, and the batch would wait there until
        its time limit.
        """
        if shutting_down():
            pool_log.info("shutting down: %d buffered messages go back to the queue", len(requests))
            for req in requests:
                req.reject(requeue=True)
            return None
        by_id = {req.id: req for req in requests}
        started = time.monotonic()
        accepted_by: list[int] = []  # the pool process's pid, once it took the batch
        events = TaskEvents(requests)

        def on_return(result: Any) -> None:
            reply: dict[str, Any] = result if isinstance(result, dict) else {}
            acked = [by_id.pop(i) for i in reply.get("ack", []) if i in by_id]
            requeued = list(by_id.values())
            acknowledge(acked)
            for req in requeued:
                req.reject(requeue=True)
            events.finished(acked, requeued, time.monotonic() - started, reply.get("progress", {}))

        def on_error(exc_info: ExceptionInfo) -> None:
            # The pool process died (SIGKILL, OOM, hard time limit): every message goes
            # back, and the death is counted against its userids, which bounds a picture
            # that kills its process every time.
            pool_log.error("batch of %d lost (%s): requeueing", len(by_id), exc_info.exception)
            self._count_death(by_id.values(), accepted_by[0] if accepted_by else None)
            for req in by_id.values():
                req.reject(requeue=True)
            events.lost()

        def on_accepted(pid: int, time_accepted: float) -> None:
            accepted_by.append(pid)
            events.started()

        events.received()
        batch = ([lean_request(r) for r in requests],)
        return self._pool.apply_async(
            apply_batches_task,
            (self, batch, 0, None),
            accept_callback=on_accepted,
            callback=on_return,
            error_callback=on_error,
            timeout=settings.score_time_limit,
        )

    def _count_death(self, requests: Iterable[Request], pid: int | None) -> None:
        """Record a pool process's death against the userids it held (main process)."""
        parsed = []
        for req in requests:
            with contextlib.suppress(MalformedMessage):
                parsed.append(ScoreRequest.from_args(req.id, req.args, req.kwargs))
        try:
            if self._parent_client is None:
                self._parent_client = connect()
            for (run_id, _, _), group in group_by_run(parsed).items():
                record_deaths(self._parent_client, run_id, [r.userid for r in group], pid)
        except redis.RedisError as exc:
            pool_log.warning("could not count the lost batch in Redis: %s", exc)


def lean_request(req: Request) -> SimpleRequest:
    """What a pool process needs of a message: its id, name and arguments.

    celery-batches' ``SimpleRequest.from_request`` also copies the message's delivery
    info and every header (``request_dict``); the main process pickles all of it into
    the pool's pipe, about 1 kB per picture, and ``score`` reads none of it.
    """
    return SimpleRequest(
        req.id, req.name, req.args, req.kwargs, {}, req.hostname, True, None, None, None
    )


def acknowledge(requests: Sequence[Request]) -> None:
    """Acknowledge a batch's messages: on Redis in one round trip (the transport's
    ``QoS.ack_many``), else one by one (AMQP acks are frames without a reply)."""
    pending = [r for r in requests if not r.acknowledged]
    if not pending:
        return
    qos: Any = getattr(pending[0].message.channel, "qos", None)
    if not isinstance(qos, BatchQoS) or len(pending) == 1:
        for req in pending:
            req.acknowledge()
        return
    qos.ack_many([req.message.delivery_tag for req in pending])
    for req in pending:
        req.message._state = "ACK"  # as kombu's Message.ack marks it
        req.acknowledged = True


@app.task(
    base=ScoreBatches,
    name="genderscore.score",
    flush_every=settings.batch_size,
    flush_interval=settings.flush_interval,
    acks_late=True,
    ignore_result=True,
)
def score(requests: list[SimpleRequest]) -> dict[str, Any]:
    """Score one picture per request, a batch at a time (run in a pool process)."""
    reply = BatchReply()
    batch = []
    for r in requests:
        try:
            batch.append(ScoreRequest.from_args(r.id, r.args, r.kwargs))
        except MalformedMessage as exc:
            log.error("dropping malformed message %s: %s", describe(r.id), exc)
            reply.ack.append(str(r.id))
    done = score.scorer.process(batch)
    return {"ack": reply.ack + done.ack, "requeue": done.requeue, "progress": done.progress}


@signals.worker_process_init.connect
def preload_model(**_: Any) -> None:
    """Start loading the default model's compiled twin as soon as a scoring pool
    process exists.

    The load (OpenVINO's import, the compile and a warm-up pass) then runs while the
    main process still connects to the broker and waits for its first batch, instead
    of after it: the cold start's first batch finds the model ready, or waits on the
    cache's lock for the load in progress. In a thread, because Celery gives a pool
    process's start only ``worker_proc_alive_timeout`` (4 s). Only a twin is preloaded:
    TensorFlow imported in a thread while the pool process starts left a worker's
    ordinary tasks undispatched in the tests (tests/integration/test_nightly.py), and
    Keras is the fallback path anyway. A failed preload is logged and left: the first
    batch loads the model again and records why it cannot.
    """
    if is_training_worker() or not twin_recorded(settings.model):
        return
    threading.Thread(target=_preload, name="genderscore-preload", daemon=True).start()


def _preload() -> None:
    try:
        score.scorer.models.get(settings.model)
    except Exception as exc:  # the first batch records the model's error for its pictures
        log.warning("preloading %s failed: %s", settings.model, exc)
