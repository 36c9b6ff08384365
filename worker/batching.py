"""What a worker process does with one buffered batch of scoring requests.

Plain functions, called by the Celery task in ``worker.tasks`` and testable without a
broker. A batch may mix runs and models; each group is scored with one forward pass.

Delivery accounting makes redelivery safe and bounded:
- every request's delivery is counted in Redis before any work;
- a userid already settled (predicted or errored) is skipped: its message was
  redelivered after the work was done;
- a userid delivered before (its worker died, or it was requeued) is scored alone and
  recorded at once, so one picture that kills its process cannot take a batch with it;
  after ``max_deliveries`` solo attempts it becomes a ``worker_crash`` error.
Infrastructure faults (Redis unreachable) are retried with backoff and, if they last,
the requests are handed back for requeueing: they never become error records.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from worker.ids import InvalidUserid, check_run_id, check_userid, picture_path
from worker.keys import model_loads
from worker.model import ModelCache, ModelError, default_tf_threads
from worker.results import count_skips, count_solo_attempt, record_outcomes, start_batch
from worker.scoring import Failed, Outcome, score_pictures
from worker.settings import settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Test-only fault hook: a picture whose name contains this marker kills its process.
CRASH_MARKER_ENV = "GENDERSCORE_TEST_CRASH_MARKER"


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring message: which picture of which run, with which model."""

    request_id: str
    run_id: str
    userid: str
    images_dir: str
    model_path: str

    @classmethod
    def from_args(
        cls, request_id: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> ScoreRequest:
        """Build from a task's ``(run_id, userid, images_dir, model_path)`` arguments."""
        values = dict(zip(("run_id", "userid", "images_dir", "model_path"), args, strict=False))
        values.update(kwargs)
        return cls(
            request_id,
            str(values.get("run_id", "")),
            str(values.get("userid", "")),
            str(values.get("images_dir", "")),
            str(values.get("model_path", "")),
        )


@dataclass
class BatchReply:
    """Which requests to acknowledge and which to hand back to the queue."""

    ack: list[str] = field(default_factory=list)
    requeue: list[str] = field(default_factory=list)


def with_redis_retry(action: Callable[[], T], what: str, budget_s: float) -> T:
    """Run ``action``, retrying Redis connection faults with exponential backoff."""
    delay, deadline = 0.2, time.monotonic() + budget_s
    while True:
        try:
            return action()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("Redis unavailable while %s (%s): retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# Decoding pictures of many sizes fragments glibc's heap: a pool process's peak RSS
# grew from 760 to 817 MB over 20,000 pictures (bench) until freed pages were returned.
TRIM_EVERY = 32


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _maybe_crash_for_tests(userid: str) -> None:
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker and marker in userid:
        log.error("test hook: killing this process on %s", userid)
        os._exit(137)


class BatchScorer:
    """Scores batches in one worker process; holds its model cache and Redis client."""

    def __init__(self, client: redis.Redis, processes: int = 1) -> None:
        self.client = client
        self.models = ModelCache(
            tf_threads=None if processes <= 0 else default_tf_threads(processes)
        )
        self._reported_loads = 0
        self._batches = 0

    def process(self, requests: Sequence[ScoreRequest]) -> BatchReply:
        """Score a batch and record every outcome; return what to ack and to requeue."""
        reply = BatchReply()
        groups: dict[tuple[str, str, str], list[ScoreRequest]] = defaultdict(list)
        for req in requests:
            try:
                check_run_id(req.run_id)
            except ValueError as exc:
                log.error("dropping malformed message %s: %s", req.request_id, exc)
                reply.ack.append(req.request_id)
                continue
            groups[(req.run_id, req.model_path, req.images_dir)].append(req)
        for (run_id, model_path, images_dir), group in groups.items():
            try:
                self._process_group(run_id, Path(model_path), Path(images_dir), group)
                reply.ack += [r.request_id for r in group]
            except (
                redis.ConnectionError,
                redis.TimeoutError,
                redis.BusyLoadingError,
                redis.ResponseError,
            ) as exc:
                # Infrastructure, not the pictures: hand the messages back.
                log.error(
                    "run %s: Redis fault, requeueing %d requests: %s", run_id, len(group), exc
                )
                reply.requeue += [r.request_id for r in group]
        self._batches += 1
        if self._batches % TRIM_EVERY == 0:
            release_free_memory()
        return reply

    def _process_group(
        self, run_id: str, model_path: Path, images_dir: Path, group: list[ScoreRequest]
    ) -> None:
        budget = settings.score_time_limit / 3
        state = with_redis_retry(
            lambda: start_batch(self.client, run_id, [r.userid for r in group]),
            "counting deliveries",
            budget,
        )
        fresh: list[tuple[str, Path]] = []
        suspects: list[tuple[str, Path]] = []
        failures: list[Outcome] = []
        already_done = [u for u, (_, settled) in state.items() if settled]
        if already_done:  # redelivered after the work was done: counted, not redone
            with_redis_retry(
                lambda: count_skips(self.client, run_id, already_done), "counting", budget
            )
        for req in group:
            tries, settled = state[req.userid]
            if settled:
                continue
            try:
                check_userid(req.userid)
                path = picture_path(images_dir, req.userid)
            except InvalidUserid as exc:
                failures.append(Failed(req.userid[:80], "invalid_userid", str(exc)))
                continue
            (fresh if tries <= 1 else suspects).append((req.userid, path))
        try:
            bundle = self.models.get(model_path)
        except ModelError as exc:
            failures += [Failed(uid, "model_error", str(exc)) for uid, _ in fresh + suspects]
            bundle, fresh, suspects = None, [], []
        sha = bundle.sha256 if bundle else "-"
        self._report_loads()
        outcomes: list[Outcome] = list(failures)
        if fresh and bundle is not None:
            for userid, _ in fresh:
                _maybe_crash_for_tests(userid)
            outcomes += score_pictures(bundle, fresh, settings.batch_size)
        if outcomes:
            with_redis_retry(
                lambda: record_outcomes(self.client, run_id, sha, outcomes), "recording", budget
            )
        for userid, path in suspects:
            self._score_alone(run_id, bundle, userid, path, budget)

    def _score_alone(
        self, run_id: str, bundle: Any, userid: str, path: Path, budget: float
    ) -> None:
        """Score a redelivered picture on its own, giving up after max_deliveries deaths."""
        attempts = with_redis_retry(
            lambda: count_solo_attempt(self.client, run_id, userid), "counting", budget
        )
        outcome: list[Outcome]
        if attempts > settings.max_deliveries:
            log.error("%s killed its worker %d times: recorded as an error", userid, attempts - 1)
            outcome = [
                Failed(
                    userid,
                    "worker_crash",
                    f"the worker process died {attempts - 1} times scoring this picture",
                )
            ]
        else:
            _maybe_crash_for_tests(userid)
            outcome = list(score_pictures(bundle, [(userid, path)], 1))
        with_redis_retry(
            lambda: record_outcomes(self.client, run_id, bundle.sha256, outcome),
            "recording",
            budget,
        )

    def _report_loads(self) -> None:
        """Count model loads per process in Redis (the benchmark checks one per process)."""
        new = self.models.loads - self._reported_loads
        if new:
            self._reported_loads = self.models.loads
            try:
                self.client.hincrby(model_loads(), f"{os.uname().nodename}:{os.getpid()}", new)
            except redis.RedisError:
                log.warning("could not record the model load in Redis")
