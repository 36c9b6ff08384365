"""Micro-benchmarks of the producer's two Redis-bound steps: enqueueing and collecting.

Both run the project's own functions against the benchmark's private key prefix with
nothing consuming, and delete what they wrote. Redis memory is read two ways:
``INFO memory`` (``used_memory`` before and after: what the issue asks for, but it
also counts anything other clients do meanwhile) and ``MEMORY USAGE`` of the key
itself (exact, immune to other clients).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

log = logging.getLogger(__name__)
WRITE_CHUNK = 10_000


def synthetic_userids(count: int, tag: str) -> list[str]:
    """``count`` distinct course-like userids (32 hex digits)."""
    import hashlib

    return [hashlib.md5(f"{tag}:{i}".encode()).hexdigest() for i in range(count)]


def used_memory(client: redis.Redis) -> int:
    """Redis ``used_memory`` in bytes (INFO memory)."""
    return int(client.info("memory")["used_memory"])


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (which ends with ':'); return how many."""
    deleted = 0
    batch: list[str] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


@contextmanager
def _cleanup(client: redis.Redis, keys: list[str]) -> Iterator[list[str]]:
    try:
        yield keys
    finally:
        if keys:
            client.unlink(*keys)


def enqueue(
    client: redis.Redis, count: int, images_dir: Path, model: Path, model_sha: str
) -> dict[str, Any]:
    """Time ``producer.enqueue.enqueue_run`` on ``count`` userids (nobody consumes)."""
    from producer.enqueue import enqueue_run
    from worker.celery import SCORE_QUEUE, app
    from worker.keys import prefix, run_keys, runs_index

    run_id = f"bench-enqueue-{int(time.time())}"
    userids = synthetic_userids(count, run_id)
    queue_key = f"{prefix()}{SCORE_QUEUE}"
    if client.exists(queue_key):
        raise RuntimeError(f"{queue_key} is not empty: is a worker of this prefix running?")
    with _cleanup(client, [*run_keys(run_id).all(), queue_key]):
        started = time.perf_counter()
        pictures = [(u, f"{u}.jpg") for u in userids]
        source = f"folder:{images_dir}"
        result = enqueue_run(app, client, source, pictures, model, model_sha, run_id)
        seconds = time.perf_counter() - started
        queued = int(client.llen(queue_key))
        client.zrem(runs_index(), run_id)
    if result.published != count or queued != count:
        raise RuntimeError(
            f"enqueue: published {result.published}, queued {queued}, expected {count}"
        )
    return {
        "userids": count,
        "seconds": round(seconds, 3),
        "per_second": round(count / seconds),
        "queued": queued,
    }


def collect(client: redis.Redis, count: int, scan_counts: tuple[int, ...] = ()) -> dict[str, Any]:
    """Store ``count`` synthetic predictions as a finished run, then time ``collect``.

    With ``scan_counts``, also time the collector at each HSCAN page size.
    """
    from producer import collect as collect_module
    from worker.keys import run_keys, runs_index
    from worker.results import create_run, encode_prediction, seal_run
    from worker.scoring import Scored

    run_id = f"bench-collect-{int(time.time())}"
    keys = run_keys(run_id)
    userids = synthetic_userids(count, run_id)
    now = time.time()
    with _cleanup(client, list(keys.all())), tempfile.TemporaryDirectory() as tmp:
        create_run(
            client, run_id, {"model_sha": "0" * 64, "model": "bench.h5", "source": "folder:/b"}
        )
        memory_before = used_memory(client)
        write_started = time.perf_counter()
        for start in range(0, count, WRITE_CHUNK):
            chunk = userids[start : start + WRITE_CHUNK]
            mapping: dict[Any, Any] = {}
            for n, uid in enumerate(chunk, start):
                p = (n * 7919 % 1_000_003) / 1_000_003
                mapping[uid] = encode_prediction(
                    Scored(uid, round(p, 6), "female" if p >= 0.5 else "male"), now
                )
            client.hset(keys.pred, mapping=mapping)
        write_seconds = time.perf_counter() - write_started
        memory_pred = used_memory(client)
        pipe = client.pipeline(transaction=False)
        for start in range(0, count, WRITE_CHUNK):
            chunk = userids[start : start + WRITE_CHUNK]
            pipe.hset(keys.ids, mapping={u: f"{u}.jpg" for u in chunk})
        pipe.execute()
        memory_ids = used_memory(client)
        seal_run(client, run_id, count)
        client.zrem(runs_index(), run_id)
        pred_usage = int(client.memory_usage(keys.pred, samples=0) or 0)
        ids_usage = int(client.memory_usage(keys.ids, samples=0) or 0)

        out = Path(tmp) / "collect.csv"
        started = time.perf_counter()
        written = collect_module.collect(client, run_id, out)
        seconds = time.perf_counter() - started
        rows = sum(1 for _ in out.open()) - 1
        if written.scored != count or rows != count:
            raise RuntimeError(f"collect wrote {rows} rows ({written.scored} scored) of {count}")
        pages = {}
        default_count = collect_module.SCAN_COUNT
        try:
            for page in scan_counts:
                collect_module.SCAN_COUNT = page
                started = time.perf_counter()
                collect_module.collect(client, run_id, out)
                pages[str(page)] = round(time.perf_counter() - started, 3)
        finally:
            collect_module.SCAN_COUNT = default_count
    result: dict[str, Any] = {
        "predictions": count,
        "seconds": round(seconds, 3),
        "rows_per_second": round(count / seconds),
        "scan_count": default_count,
        "write_seconds": round(write_seconds, 3),
        "info_bytes_per_prediction": round((memory_pred - memory_before) / count, 1),
        "info_bytes_per_userid_in_ids": round((memory_ids - memory_pred) / count, 1),
        "key_bytes_per_prediction": round(pred_usage / count, 1),
        "key_bytes_per_userid_in_ids": round(ids_usage / count, 1),
    }
    if pages:
        result["seconds_by_scan_count"] = pages
    return result
