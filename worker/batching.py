"""What a worker process does with one buffered batch of scoring requests.

Plain functions and a small class, called by the Celery task in ``worker.tasks`` and
testable without a broker. A batch may mix runs; each run's group is scored with one
forward pass. The guarantees:

- Every field of a message is checked, in size and form, before anything is logged or
  stored; a malformed message is acknowledged and dropped with a short log line.
- A message of a run Redis does not know (deleted, expired, lost) or of a cancelled run
  is acknowledged and dropped.
- Each delivery is counted; a userid already settled (a redelivery after the work was
  done) is skipped; a userid that appears twice in a batch is worked on once.
- Pictures are fetched concurrently (``worker.fetch``: a folder's files, an object
  store's objects, a manifest's URLs). Every failure of one picture (missing, forbidden,
  too large, unreadable, not a picture, not a regular file...) and of the model
  (missing, tampered, unloadable, replaced since the run was enqueued) becomes that
  picture's typed error record. A store that does not answer is an outage: those
  messages go back to the queue (a manifest URL's host that never answers becomes the
  picture's error after ``MAX_UNAVAILABLE`` deliveries).
- A worker process that dies (SIGKILL, OOM, hard time limit) is counted against its
  userids by the worker's main process (``worker.results.record_deaths``), as is an
  unexpected exception here: a userid suspected once is scored alone on its next
  delivery, and blamed alone if its process dies again; after ``max_deliveries`` deaths
  it becomes a ``worker_crash`` error. So no message is delivered without bound.
- Infrastructure faults (Redis unreachable, full, loading) are retried with backoff and,
  if they last, the requests are handed back for requeueing. They are not deaths and
  never become error records.
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

from worker.fetch import Fetcher, Unavailable
from worker.ids import RUN_ID_RE, USERID_RE, describe
from worker.keys import model_loads
from worker.model import ModelBundle, ModelCache, ModelError, default_tf_threads
from worker.results import (
    CancelledRun,
    UnknownRun,
    count_unavailable,
    mark_solo,
    record_deaths,
    record_outcomes,
    start_batch,
)
from worker.scoring import Failed, Fetched, Outcome, score_fetched
from worker.settings import settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Faults of Redis itself: the messages go back to the queue, nothing is recorded.
REDIS_FAULTS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.ResponseError,  # OOM and other refusals of a write
)
MAX_REFERENCE = 4096  # characters of a picture reference or model path
ARG_NAMES = ("run_id", "userid", "picture", "model_path", "model_sha", "version")
MAX_UNAVAILABLE = 3  # deliveries of a manifest URL whose host never answered, then an error


class MalformedMessage(ValueError):
    """A scoring message whose fields are missing, of the wrong type, size or form."""


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring message: which picture of which run, with which model.

    Built only through ``from_args``, which checks every field.
    """

    request_id: str
    run_id: str
    userid: str
    picture: str  # an absolute path (a folder's picture) or a URL
    model_path: str
    model_sha: str
    version: str  # the store's version token of the picture ("" for folders)

    @classmethod
    def from_args(
        cls, request_id: Any, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> ScoreRequest:
        """Check a task's ``(run_id, userid, picture, model_path, model_sha[, version])``."""
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise MalformedMessage("arguments are not a list and a mapping")
        if len(args) > len(ARG_NAMES) or set(kwargs) - set(ARG_NAMES):
            raise MalformedMessage("unexpected arguments")
        values = dict(zip(ARG_NAMES, args, strict=False))
        values.update(kwargs)
        values.setdefault("version", "")  # optional: only object stores have one
        for name in ARG_NAMES:
            value = values.get(name)
            if not isinstance(value, str):
                raise MalformedMessage(f"{name} is {describe(value)}, not a string")
        if RUN_ID_RE.fullmatch(values["run_id"]) is None:
            raise MalformedMessage(f"invalid run id {describe(values['run_id'])}")
        if USERID_RE.fullmatch(values["userid"]) is None:
            raise MalformedMessage(f"invalid userid {describe(values['userid'])}")
        for name in ("picture", "model_path"):
            if not 0 < len(values[name]) <= MAX_REFERENCE or "\0" in values[name]:
                raise MalformedMessage(f"invalid {name} {describe(values[name])}")
        if not values["model_path"].endswith(".h5"):
            raise MalformedMessage(f"model_path {describe(values['model_path'])} is not a .h5")
        sha = values["model_sha"]
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise MalformedMessage(f"invalid model_sha {describe(sha)}")
        if len(values["version"]) > 256:
            raise MalformedMessage(f"invalid version {describe(values['version'])}")
        return cls(str(request_id), **{name: values[name] for name in ARG_NAMES})


@dataclass
class BatchReply:
    """Which requests to acknowledge and which to hand back to the queue, and how far
    each run of the batch is (settled, total) after it."""

    ack: list[str] = field(default_factory=list)
    requeue: list[str] = field(default_factory=list)
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)


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


def group_by_run(
    requests: Sequence[ScoreRequest],
) -> dict[tuple[str, str, str], list[ScoreRequest]]:
    """Requests by (run, model path, model sha256): each group is scored together."""
    groups: dict[tuple[str, str, str], list[ScoreRequest]] = defaultdict(list)
    for req in requests:
        groups[(req.run_id, req.model_path, req.model_sha)].append(req)
    return groups


class BatchScorer:
    """Scores batches in one worker process; holds its model cache and Redis client."""

    def __init__(self, client: redis.Redis, processes: int = 1) -> None:
        self.client = client
        self.models = ModelCache(
            tf_threads=None if processes <= 0 else default_tf_threads(processes)
        )
        self._reported_loads = 0
        self._batches = 0
        self._fetcher: Fetcher | None = None

    def process(self, requests: Sequence[ScoreRequest]) -> BatchReply:
        """Score a batch and record every outcome; return what to ack and to requeue."""
        reply = BatchReply()
        for (run_id, model_path, model_sha), group in group_by_run(requests).items():
            ids = [r.request_id for r in group]
            try:
                progress, unavailable = self._process_group(
                    run_id, Path(model_path), model_sha, group
                )
                reply.ack += [r.request_id for r in group if r.userid not in unavailable]
                reply.requeue += [r.request_id for r in group if r.userid in unavailable]
                if progress:
                    reply.progress[run_id] = progress
            except (UnknownRun, CancelledRun) as exc:
                what = "is cancelled" if isinstance(exc, CancelledRun) else "is not in Redis"
                log.warning("run %s %s: dropping %d messages", run_id, what, len(group))
                reply.ack += ids
            except REDIS_FAULTS as exc:
                # Infrastructure, not the pictures: hand the messages back.
                log.error("run %s: Redis fault, requeueing %d requests: %s", run_id, len(ids), exc)
                reply.requeue += ids
            except Exception:
                # A bug, not a picture: count it like a death, so that it is bounded.
                log.exception("run %s: batch of %d failed: requeueing", run_id, len(ids))
                with contextlib.suppress(*REDIS_FAULTS):
                    record_deaths(self.client, run_id, [r.userid for r in group], os.getpid())
                reply.requeue += ids
        self._batches += 1
        if self._batches % TRIM_EVERY == 0:
            release_free_memory()
        return reply

    def _model(self, model_path: Path, model_sha: str) -> ModelBundle | Failed:
        """The run's model, or why it cannot score (every picture's error)."""
        try:
            bundle = self.models.get(model_path, model_sha)
        except ModelError as exc:
            return Failed("", exc.kind, str(exc))
        except Exception as exc:  # any failure to load is the model's, not a crash
            return Failed("", "model_error", f"{type(exc).__name__}: {exc}")
        finally:
            self._report_loads()
        return bundle

    def _process_group(
        self, run_id: str, model_path: Path, model_sha: str, group: list[ScoreRequest]
    ) -> tuple[tuple[int, int] | None, set[str]]:
        """Score one run's requests and record them.

        Returns the run's (settled, total) after, and the userids to hand back to the
        queue because their store did not answer.
        """
        budget = settings.score_time_limit / 3
        pictures = {r.userid: r for r in group}  # a userid twice: worked on once
        start = with_redis_retry(
            lambda: start_batch(self.client, run_id, list(pictures)), "starting a batch", budget
        )
        outcomes: list[Outcome] = []
        fresh: list[ScoreRequest] = []
        suspects: list[ScoreRequest] = []
        for userid, req in pictures.items():
            delivery = start.deliveries[userid]
            if delivery.settled:
                continue  # redelivered after the work was done: counted, not redone
            if delivery.deaths >= settings.max_deliveries:
                log.error(
                    "%s killed its worker %d times: recorded as an error", userid, delivery.deaths
                )
                outcomes.append(
                    Failed(
                        userid,
                        "worker_crash",
                        f"the worker process died {delivery.deaths} times scoring this picture",
                    )
                )
                continue
            (suspects if delivery.deaths else fresh).append(req)
        model: ModelBundle | Failed | None = None
        if fresh or suspects:
            model = self._model(model_path, model_sha)
        if isinstance(model, Failed):
            outcomes += [Failed(r.userid, model.kind, model.message) for r in fresh + suspects]
            fresh, suspects = [], []
        sha = model.sha256 if isinstance(model, ModelBundle) else model_sha
        unavailable: set[str] = set()
        if fresh and isinstance(model, ModelBundle):
            fetched, failed, unavailable = self._fetch(run_id, start.source, fresh, budget)
            outcomes += failed + score_fetched(model, fetched, settings.batch_size)
        progress = None
        if outcomes:
            progress = with_redis_retry(
                lambda: record_outcomes(self.client, run_id, sha, outcomes), "recording", budget
            )
        for req in suspects:
            assert isinstance(model, ModelBundle)  # suspects are cleared without a model
            progress, lost = self._score_alone(run_id, start.source, model, req, budget)
            unavailable |= lost
        return progress, unavailable

    def _fetch(
        self, run_id: str, source: str, requests: Sequence[ScoreRequest], budget: float
    ) -> tuple[list[Fetched], list[Outcome], set[str]]:
        """The requests' pictures, fetched concurrently: what to score, what failed, and
        the userids whose store did not answer (handed back to the queue).

        A store that does not answer is an outage, never the picture's error; but a
        manifest's URL may name any host, so after ``max_deliveries`` deliveries of a
        URL that never answered, that picture gets the error.
        """
        items = [(r.userid, r.picture) for r in requests]
        versions = {r.userid: r.version for r in requests}
        fetched: list[Fetched] = []
        down: list[tuple[str, Unavailable]] = []
        for userid, _, got in self.fetcher.fetch_pictures(items):
            if isinstance(got, Unavailable):
                down.append((userid, got))
            else:
                fetched.append((userid, got, versions[userid]))
        failed: list[Outcome] = []
        if down and source.startswith("manifest:"):
            counts = with_redis_retry(
                lambda: count_unavailable(self.client, run_id, [u for u, _ in down]),
                "counting",
                budget,
            )
            given_up = {u for (u, _), n in zip(down, counts, strict=True) if n >= MAX_UNAVAILABLE}
            failed = [Failed(u, exc.kind, exc.message) for u, exc in down if u in given_up]
            down = [(u, exc) for u, exc in down if u not in given_up]
        if down:
            log.warning(
                "run %s: %d pictures unavailable (%s): handed back to the queue",
                run_id,
                len(down),
                down[0][1],
            )
        return fetched, failed, {u for u, _ in down}

    def _score_alone(
        self, run_id: str, source: str, bundle: ModelBundle, req: ScoreRequest, budget: float
    ) -> tuple[tuple[int, int] | None, set[str]]:
        """Score a suspected picture on its own, marked so that a death blames it alone."""
        with_redis_retry(lambda: mark_solo(self.client, run_id, req.userid), "marking", budget)
        fetched, failed, unavailable = self._fetch(run_id, source, [req], budget)
        outcome = failed + score_fetched(bundle, fetched, 1)
        if not outcome:
            return None, unavailable
        progress = with_redis_retry(
            lambda: record_outcomes(self.client, run_id, bundle.sha256, outcome),
            "recording",
            budget,
        )
        return progress, unavailable

    @property
    def fetcher(self) -> Fetcher:
        """This process's fetcher (created on first use, after the pool forked)."""
        if self._fetcher is None:
            self._fetcher = Fetcher()
        return self._fetcher

    def _report_loads(self) -> None:
        """Count model loads per process in Redis (the benchmark checks one per process)."""
        new = self.models.loads - self._reported_loads
        if new:
            self._reported_loads = self.models.loads
            try:
                self.client.hincrby(model_loads(), f"{os.uname().nodename}:{os.getpid()}", new)
            except redis.RedisError:
                log.warning("could not record the model load in Redis")
