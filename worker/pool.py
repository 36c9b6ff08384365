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

It also hands each pool process its next batch while the process still scores one
(``GENDERSCORE_POOL_BATCHES``, 2 by default). Celery's fair scheduling writes a job only
to a process that has returned its last, so each process waited for the main process to
read its result and write the next batch: about 2 ms per batch, 2.5 % of the machine
(docs/performance.md, issue 12). A batch waiting in a pipe is not yet accepted: if its
process dies, Celery writes it to another (``AsynPool.on_partial_read``), and its time
limit starts when a process takes it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool
from celery.worker import state as worker_state

log = logging.getLogger(__name__)


def shutting_down() -> bool:
    """Whether this worker is shutting down (warm or cold)."""
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


class JobsInHand:
    """How many jobs each pool process holds, by its inqueue fd; full at ``depth``.

    Stands in for ``AsynPool._busy_workers``, a set of the fds of busy processes, which
    the fair strategy reads with ``in`` (may this process get a job?) and ``len`` (are
    all busy?) and fills with ``add``. A process counts as busy when it is full, or
    while another process (of ``inqueues``, the pool's live ones) holds fewer jobs: the
    emptiest processes are filled first, so no batch waits behind another while a
    process is idle. Its ``discard`` means the process's queues are gone, so it forgets
    the fd; a returned job is :meth:`done`.
    """

    def __init__(self, depth: int, inqueues: set[int]) -> None:
        self.depth = depth
        self._inqueues = inqueues
        self._jobs: Counter[int] = Counter()

    def add(self, fd: int) -> None:
        """A job was written to the process."""
        self._jobs[fd] += 1

    def done(self, fd: int) -> None:
        """The process returned a job."""
        if self._jobs[fd] > 1:
            self._jobs[fd] -= 1
        else:
            self._jobs.pop(fd, None)

    def discard(self, fd: int) -> None:
        """The process is gone (or its inqueue closed): it holds nothing any more."""
        self._jobs.pop(fd, None)

    def clear(self) -> None:
        """Forget every process."""
        self._jobs.clear()

    def __contains__(self, fd: object) -> bool:
        if not isinstance(fd, int):
            return False
        jobs = self._jobs[fd]
        return jobs >= self.depth or any(self._jobs[other] < jobs for other in self._inqueues)

    def __len__(self) -> int:
        """How many processes are full (a process with room makes Celery offer jobs)."""
        return sum(1 for jobs in self._jobs.values() if jobs >= self.depth)


class FinishingAsynPool(AsynPool):
    """``AsynPool`` that hands over the next batch early and finishes what it handed over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from worker.settings import settings

        super().__init__(*args, **kwargs)
        # Before register_with_event_loop, whose write handlers capture it.
        inqueues: set[int] = self._all_inqueues  # type: ignore[attr-defined]  # Celery's
        self._busy_workers = JobsInHand(settings.pool_batches, inqueues)

    def on_job_ready(self, job: Any, i: int, obj: Any, inqW_fd: int) -> None:
        """A pool process returned a job: it has room for one more."""
        self._busy_workers.done(inqW_fd)

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
