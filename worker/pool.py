"""The prefork pool, which at a warm shutdown finishes the batches its processes hold.

At a warm shutdown, Celery's ``AsynPool.flush`` forgets every job that no pool process
has acknowledged yet. That includes a job already written into a process's pipe, or
taken by the process before the main process read its acknowledgement. The process
still runs such a job. But the pool's join stops reading results once its job cache is
empty. Since billiard 4.3, a pool process at exit waits for the main process to read
its last result, up to 30 s (``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT`` times its
interval). So a warm shutdown took 30 s more than its batches. The batch's outcomes were
in Redis but its messages were never acknowledged: they came back and were skipped.

At a warm shutdown, this pool keeps, in the cache, the jobs written whole to a live
process. The join then reads their acknowledgements and results, and their messages are
acknowledged, as for any batch a process had already started. (Celery also flushes the
pool when the broker connection is lost; the worker goes on then, reads those results
later, and the batch's messages come back on the new connection, as before.)
"""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool
from celery.worker import state as worker_state

log = logging.getLogger(__name__)


def shutting_down() -> bool:
    """Whether this worker is shutting down (warm or cold)."""
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


class FinishingAsynPool(AsynPool):
    """``AsynPool`` whose flush keeps the jobs a pool process will run anyway."""

    def flush(self) -> None:
        """Flush as Celery does; shutting down, put back the jobs written to a live process.

        A job's ``_write_to`` is set when its write starts. Celery's flush completes
        every write it finds started (or drops the job, if its process died), and
        discards the jobs whose write had not started.
        """
        cache: dict[int, Any] = self._cache  # type: ignore[attr-defined]  # billiard's
        written = [job for job in cache.values() if not job._accepted and job._write_to]
        super().flush()
        if not shutting_down():
            return
        kept = [job for job in written if job._write_to._is_alive()]
        for job in kept:
            cache.setdefault(job._job, job)
        if kept:
            log.info("shutting down: %d batches already in pool processes finish first", len(kept))


class FinishingTaskPool(TaskPool):
    """Celery's prefork pool (``-P prefork``) with :class:`FinishingAsynPool`."""

    Pool = FinishingAsynPool
