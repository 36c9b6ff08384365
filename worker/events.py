"""What the scoring worker tells Flower: one task per batch (the default) or per picture.

Messages are published without Celery's sent event (``worker.broker``), and
celery-batches sends no task events of its own, so the worker sends them.

- ``batch`` (``GENDERSCORE_TASK_EVENTS=batch``): one task per batch of up to
  ``GENDERSCORE_BATCH_SIZE`` pictures, with its own id. Flower lists it as
  ``genderscore.score`` with arguments ``run=<run> userids=<a>,<b>,...`` (every userid of
  the batch), counts and rates batches, and its result says how far the run is
  (``run <run>: 1234/5000 settled``). A batch handed back to the queue is ``RETRY``.
  Three events per batch instead of three per picture, and the first two leave in one
  ``PUBLISH``: the worker's main process spends its time on the messages, not on
  reporting them.
- ``message``: one task per picture, under the message's own id, with arguments
  ``run=<run> userid=<userid>``, as Celery would show a plain task.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from uuid import uuid4

from celery.worker.request import Request

from worker.settings import settings

SCORE_TASK = "genderscore.score"


def batch_args(requests: Collection[Request]) -> str:
    """``run=<run> userids=<a>,<b>`` per run of the batch, ``; ``-separated."""
    by_run: dict[str, list[str]] = defaultdict(list)
    for req in requests:
        args = req.args if isinstance(req.args, list | tuple) else ()
        run, userid = (str(args[0]), str(args[1])) if len(args) >= 2 else ("?", "?")
        by_run[run[:64]].append(userid[:64])
    return "; ".join(f"run={run} userids={','.join(ids)}" for run, ids in by_run.items())


def progress_text(progress: Mapping[str, Sequence[int]]) -> str:
    """``run <run>: <settled>/<total> settled`` for each run the batch recorded."""
    return "; ".join(
        f"run {run}: {done}/{total} settled" for run, (done, total) in progress.items()
    )


class TaskEvents:
    """The task events of one flushed batch."""

    def __init__(self, requests: Collection[Request]) -> None:
        self.requests = list(requests)
        self.per_message = settings.task_events == "message"
        self.batch_id = str(uuid4())
        self.received_at: float | None = None
        first = self.requests[0] if self.requests else None
        eventer = first.eventer if first is not None else None
        self.eventer = eventer if eventer is not None and eventer.enabled else None

    def _send(self, type_: str, **fields: Any) -> None:
        if self.eventer is not None:
            self.eventer.send(type_, uuid=self.batch_id, **fields)

    def received(self) -> None:
        """The batch was handed to the pool: noted now, sent with ``started``.

        Sent together, the two events leave the worker in one ``PUBLISH`` (Celery sends
        a loop iteration's task events as one message) instead of two; the received
        event keeps the time it was noted.
        """
        self.received_at = time.time()

    def _send_received(self) -> None:
        if self.received_at is None:
            return
        at, self.received_at = self.received_at, None
        if self.per_message:
            for req in self.requests:
                req.send_event(
                    "task-received",
                    name=req.name,
                    args=req.argsrepr,
                    kwargs=req.kwargsrepr,
                    root_id=req.root_id,
                    parent_id=req.parent_id,
                    retries=0,
                    eta=None,
                    expires=None,
                    timestamp=at,
                )
            return
        self._send(
            "task-received",
            name=SCORE_TASK,
            args=batch_args(self.requests),
            kwargs="{}",
            root_id=self.batch_id,
            parent_id=None,
            retries=0,
            eta=None,
            expires=None,
            timestamp=at,
        )

    def started(self) -> None:
        """A pool process took the batch."""
        self._send_received()
        if self.per_message:
            for req in self.requests:
                req.send_event("task-started")
        else:
            self._send("task-started")

    def lost(self) -> None:
        """The batch's pool process died: every message goes back to the queue."""
        self.finished([], self.requests, 0.0, {})

    def finished(
        self,
        acked: Sequence[Request],
        requeued: Sequence[Request],
        runtime: float,
        progress: Mapping[str, Sequence[int]],
    ) -> None:
        """The batch came back: what was recorded, what goes back to the queue."""
        self._send_received()
        if self.per_message:
            for req in acked:
                req.send_event("task-succeeded", result=None, runtime=runtime)
            for req in requeued:
                req.send_event("task-retried", exception="requeued", traceback="")
        elif requeued and not acked:
            self._send("task-retried", exception=f"{len(requeued)} requeued", traceback="")
        else:
            result = progress_text(progress) + (f"; {len(requeued)} requeued" if requeued else "")
            self._send("task-succeeded", result=result, runtime=runtime)
        self._publish_now()

    def _publish_now(self) -> None:
        """Publish the worker's buffered task events (``worker.eventflush``) with this
        batch's outcome: a monitor learns a batch is recorded as soon as its messages are
        acknowledged, even from a worker that dies or is cut off right after."""
        if self.eventer is not None:
            self.eventer.flush()
