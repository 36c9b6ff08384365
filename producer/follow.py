"""Following a run: a live progress line until every userid is settled.

While it waits it asks the workers which of them consume the score queue, and says so
when none does (a run with no worker never ends, and silence is the worst answer); it
keeps waiting. It asks only while the run makes no progress: first after
``FIRST_ASK_AFTER`` seconds, then every ``CONSUMERS_EVERY`` seconds. A run that
progresses has a worker, and each question blocks the wait for Celery's reply timeout:
asked at once, it made every ``score --wait`` see a run that finished within its first
second a second late, and cost 50 ms of the producer's CPU. A run cancelled meanwhile
ends the wait (``RunCancelled``).

Between two looks at the run it listens on the run's Pub/Sub channel, where the worker
that records the last outcome announces the finish: the wait ends within a round trip
of the finish, not up to a polling interval later (with every core idle meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

import redis
from celery import Celery

from worker.celery import SCORE_QUEUE
from worker.keys import run_finished_channel
from worker.logs import json_logging
from worker.results import RunCounts, run_counts
from worker.runs import repair_stalled

log = logging.getLogger(__name__)
# Without progress for this long, userids lost in transit are enqueued again (only when
# the queue is empty and no delivered message of the run is unacknowledged).
STALL_SECONDS = 60.0
# How often the workers are asked whether one consumes the queue while the run makes no
# progress: the first time after a few seconds without progress, so that "no worker" is
# said within seconds, well inside 30 s.
FIRST_ASK_AFTER = 3.0
CONSUMERS_EVERY = 20.0
NO_CONSUMER = (
    f"no worker consumes the '{SCORE_QUEUE}' queue: start one "
    f"(`celery -A worker worker -Q {SCORE_QUEUE}`); still waiting"
)


class RunCancelled(RuntimeError):
    """The run was cancelled while it was followed."""


def no_consumer_notice(consumers: Callable[[], list[str]]) -> str | None:
    """NO_CONSUMER when no worker consumes the score queue; None when one does or the
    broker cannot tell."""
    try:
        found = consumers()
    except Exception as exc:  # the broker is down: following goes on, Redis has the run
        log.debug("cannot ask the workers: %s", exc)
        return None
    return None if found else NO_CONSUMER


class FinishSignal:
    """Sleeps until a run's finish is announced or the time is up; ``close()`` it.

    Subscribed when made, before the first look at the run, so an announcement cannot
    fall between a look and the sleep. Without Pub/Sub (Redis unreachable, or an ACL
    without the channel), it sleeps the whole interval: the polling still sees the finish.
    """

    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.pubsub: redis.client.PubSub | None = client.pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True
        )
        try:
            self.pubsub.subscribe(run_finished_channel(run_id))
        except redis.RedisError as exc:
            log.debug("no finish announcements (%s): polling only", exc)
            self.close()

    def close(self) -> None:
        """Leave the channel and free the connection."""
        if self.pubsub is not None:
            pubsub, self.pubsub = self.pubsub, None
            with contextlib.suppress(redis.RedisError):
                pubsub.close()

    def wait(self, seconds: float) -> None:
        """Return after ``seconds``, or sooner when the finish is announced."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.pubsub is None:
                time.sleep(left)
                return
            try:
                if self.pubsub.get_message(timeout=left) is not None:
                    return
            except redis.RedisError as exc:
                log.debug("finish announcements lost (%s): polling only", exc)
                self.close()


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
    consumers: Callable[[], list[str]] | None = None,
) -> RunCounts:
    """Poll a run until it finishes (or ``timeout``), drawing a progress line on a TTY.

    When nothing has settled for ``stall_after`` seconds, ``repair`` is called (it
    re-enqueues userids lost in transit, see ``worker.runs.repair_stalled``).
    ``consumers`` lists the workers consuming the score queue; when it finds none,
    a line says so (once, until one appears).
    """
    out = stream or sys.stderr
    live = out.isatty()

    def say(text: str) -> None:
        if json_logging():
            log.warning("%s", text)
        else:
            out.write(("\n" if live else "") + text + "\n")
            out.flush()

    with contextlib.closing(FinishSignal(client, run_id)) as finish:
        next_ask, told = time.monotonic() + FIRST_ASK_AFTER, False
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
                say(f"Redis unavailable ({exc}); still waiting")
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
                if json_logging():
                    log.info("run %s: %s", run_id, line)
                else:
                    out.write(line + "\n")
                last_print = elapsed
            if counts.meta.get("cancelled"):
                if live:
                    out.write("\n")
                raise RunCancelled(f"run {run_id} was cancelled: {line}")
            settled = counts.done + counts.errors
            progressed = settled != last_settled
            if progressed:
                last_settled, last_change = settled, time.monotonic()
                next_ask, told = last_change + CONSUMERS_EVERY, False  # a worker is there
            if consumers is not None and not counts.finished and time.monotonic() >= next_ask:
                next_ask = time.monotonic() + CONSUMERS_EVERY
                notice = no_consumer_notice(consumers)
                if notice and not told:
                    say(notice)
                told = notice is not None
            if (
                not progressed
                and repair
                and stall_after
                and time.monotonic() - last_change > stall_after
            ):
                requeued = repair()
                if requeued:
                    say(f"no progress for {stall_after:.0f}s: {requeued} userids re-enqueued")
                last_change = time.monotonic()
            if counts.finished:
                if live:
                    out.write("\n")
                return counts
            if timeout is not None and elapsed > timeout:
                if live:
                    out.write("\n")
                raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s: {line}")
            finish.wait(interval)


def follow_run(
    app: Celery, client: redis.Redis, run_id: str, timeout: float | None = None
) -> RunCounts:
    """``wait_for_run`` with the stall repair and the consumer check: how ``score
    --wait`` and the demo follow."""
    from producer.status import score_consumers

    return wait_for_run(
        client,
        run_id,
        timeout=timeout,
        repair=lambda: repair_stalled(app, client, run_id),
        stall_after=STALL_SECONDS,
        consumers=score_consumers,
    )
