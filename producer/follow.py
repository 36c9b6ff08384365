"""Following a run: a live progress line until every userid is settled."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

import redis
from celery import Celery

from worker.results import RunCounts, run_counts
from worker.runs import repair_stalled

log = logging.getLogger(__name__)
# Without progress for this long, userids lost in transit are enqueued again (only when
# the queue is empty and no delivered message of the run is unacknowledged).
STALL_SECONDS = 60.0


def format_progress(counts: RunCounts, rate: float) -> str:
    """``done 120 | errors 3 | pending 377 / 500 | 85.2 img/s | ETA 0:04``."""
    settled = counts.done + counts.errors
    total = max(counts.total, counts.enqueued)
    eta = "--:--"
    if rate > 0 and total > settled:
        seconds = int((total - settled) / rate)
        eta = f"{seconds // 60}:{seconds % 60:02d}"
    width = 24
    filled = int(width * settled / total) if total else width
    bar = "#" * filled + "." * (width - filled)
    return (
        f"[{bar}] {settled}/{total}  done {counts.done}  errors {counts.errors}  "
        f"pending {counts.pending}  {rate:.1f} img/s  ETA {eta}"
    )


def wait_for_run(
    client: redis.Redis,
    run_id: str,
    timeout: float | None = None,
    interval: float = 0.5,
    stream: TextIO | None = None,
    repair: Callable[[], int] | None = None,
    stall_after: float | None = None,
) -> RunCounts:
    """Poll a run until it finishes (or ``timeout``), drawing a progress line on a TTY.

    When nothing has settled for ``stall_after`` seconds, ``repair`` is called (it
    re-enqueues userids lost in transit, see ``worker.runs.repair_stalled``).
    """
    out = stream or sys.stderr
    live = out.isatty()
    start = time.monotonic()
    first = run_counts(client, run_id)
    base = first.done + first.errors
    last_print = 0.0
    counts = first
    last_settled, last_change = base, time.monotonic()
    while True:
        try:
            counts = run_counts(client, run_id)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            # Redis restarting: keep following; the run's state is in Redis, not here.
            out.write(f"\nRedis unavailable ({exc}); still waiting\n")
            time.sleep(2)
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s") from None
            continue
        elapsed = time.monotonic() - start
        rate = (counts.done + counts.errors - base) / elapsed if elapsed > 0 else 0.0
        line = format_progress(counts, rate)
        if live:
            out.write("\r" + line + "\x1b[K")
            out.flush()
        elif elapsed - last_print >= 10 or counts.finished:
            out.write(line + "\n")
            last_print = elapsed
        settled = counts.done + counts.errors
        if settled != last_settled:
            last_settled, last_change = settled, time.monotonic()
        elif repair and stall_after and time.monotonic() - last_change > stall_after:
            requeued = repair()
            if requeued:
                out.write(f"\nno progress for {stall_after:.0f}s: {requeued} userids re-enqueued\n")
            last_change = time.monotonic()
        if counts.finished:
            if live:
                out.write("\n")
            return counts
        if timeout is not None and elapsed > timeout:
            if live:
                out.write("\n")
            raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s: {line}")
        time.sleep(interval)


def follow_run(
    app: Celery, client: redis.Redis, run_id: str, timeout: float | None = None
) -> RunCounts:
    """``wait_for_run`` with the stall repair: how ``score --wait`` and the demo follow."""
    return wait_for_run(
        client,
        run_id,
        timeout=timeout,
        repair=lambda: repair_stalled(app, client, run_id),
        stall_after=STALL_SECONDS,
    )
