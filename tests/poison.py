"""A test-only Celery app: the real one, with faults injected by userid.

``celery -A tests.poison worker`` runs the real scoring task with four wrappers, each
triggered by a word in a userid: "poison" ends the pool process while decoding (as a
crashing native decoder would), "explode" makes the batch's scoring raise (a bug),
"flaky" meets refused Redis writes a few times, "sleepy" holds its process a few
seconds. Production code has no such hooks.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

import worker.batching as batching
import worker.keys as keys
import worker.scoring as scoring
import worker.tasks  # noqa: F401  (registers genderscore.score on the app)
from worker.celery import app

__all__ = ["app"]

_real_prepare = scoring.prepare_bytes


def _prepare(bundle: Any, userid: str, data: bytes, version: str = "") -> scoring.Prepared:
    if "poison" in userid:
        os._exit(137)
    return _real_prepare(bundle, userid, data, version)


scoring.prepare_bytes = _prepare


# A userid containing "explode" makes the scoring of its batch raise, as a bug would.
_real_score_fetched = batching.score_fetched


def _score_fetched(bundle: Any, items: Sequence[scoring.Fetched], size: int) -> Any:
    if any("explode" in userid for userid, _, _ in items):
        raise RuntimeError("a bug in scoring")
    return _real_score_fetched(bundle, items, size)


batching.score_fetched = _score_fetched

# A userid containing "flaky" meets a refused Redis write the first FLAKY_FAULTS times it
# is recorded (counted in Redis, across pool processes): requeues, not deaths.
FLAKY_FAULTS = 4
_real_record = batching.record_outcomes


def _record_outcomes(client: Any, run_id: str, sha: str, outcomes: Sequence[Any]) -> Any:
    flaky = any("flaky" in o.userid for o in outcomes)
    if flaky and int(client.incr(f"{keys.prefix()}flaky-faults")) <= FLAKY_FAULTS:
        raise redis.ResponseError("simulated: OOM command not allowed")
    return _real_record(client, run_id, sha, outcomes)


batching.record_outcomes = _record_outcomes


# A userid containing "sleepy" holds its pool process for SLEEPY_SECONDS while decoding,
# after writing the process's pid to <tmp>/<userid>.pids: a test can kill a busy process.
SLEEPY_SECONDS = 4.0


def sleepy_pids(userid: str) -> Path:
    """Where the pids of the processes that decoded ``userid`` are appended."""
    return Path(tempfile.gettempdir()) / f"{userid}.pids"


_prepare_before_sleepy = scoring.prepare_bytes


def _sleepy_prepare(bundle: Any, userid: str, data: bytes, version: str = "") -> scoring.Prepared:
    if "sleepy" in userid:
        with sleepy_pids(userid).open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(SLEEPY_SECONDS)
    return _prepare_before_sleepy(bundle, userid, data, version)


scoring.prepare_bytes = _sleepy_prepare
