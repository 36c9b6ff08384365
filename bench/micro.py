"""Micro-benchmarks of the producer's two Redis-bound steps: enqueueing and collecting.

Both run the project's own functions against the benchmark's private key prefix with
nothing consuming, and delete what they wrote. Redis memory is read two ways:
``INFO memory`` (``used_memory`` before and after: what the issue asks for, but it
also counts anything other clients do meanwhile) and ``MEMORY USAGE`` of the key
itself (exact, immune to other clients).

On its own, the collector (target: 1,000,000 predictions in 3 s or less), with the
write of the same frame by ``DataFrame.to_csv`` timed beside the collector's writer:

    python -m bench.micro --collect 1000000 [--repeat 3]
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


def collect(
    client: redis.Redis, count: int, scan_counts: tuple[int, ...] = (), repeat: int = 1
) -> dict[str, Any]:
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
        timings, cpu = [], []
        for _ in range(repeat):
            started, cpu_started = time.perf_counter(), time.process_time()
            written = collect_module.collect(client, run_id, out)
            timings.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        seconds = min(timings)
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
        "seconds_each": [round(t, 3) for t in timings],
        "cpu_seconds_each": [round(t, 3) for t in cpu],
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


def writers(count: int) -> dict[str, float]:
    """The collector's CSV writer against ``DataFrame.to_csv`` on one frame of ``count`` rows."""
    import pandas as pd

    from worker.files import write_frame_atomic

    ids = synthetic_userids(count, "writers")
    frame = pd.DataFrame(
        {
            "userid": pd.array(ids, dtype="str"),
            "gender": pd.array(
                ["female", "male"] * (count // 2) + ["female"] * (count % 2), dtype="str"
            ),
            "p_female": pd.array(
                [f"{(n * 7919 % 1_000_003) / 1_000_003:.6f}" for n in range(count)], dtype="str"
            ),
            "model": "0" * 12,
            "scored_at": "2026-11-25T02:00:00Z",
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_frame_atomic(Path(tmp) / "a.csv", frame)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        frame.to_csv(Path(tmp) / "b.csv", index=False, lineterminator="\n")
        plain = time.perf_counter() - started
        same = (Path(tmp) / "a.csv").read_bytes() == (Path(tmp) / "b.csv").read_bytes()
    if not same:
        raise RuntimeError("the two writers wrote different bytes")
    return {
        "write_frame_atomic_s": round(ours, 3),
        "to_csv_s": round(plain, 3),
        "to_csv_over_ours": round(plain / ours, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.micro --collect N``: the collector on N predictions."""
    import argparse
    import json
    import os
    import platform
    from secrets import token_hex

    parser = argparse.ArgumentParser(description="genderscore collect micro-benchmark")
    parser.add_argument("--collect", type=int, default=1_000_000, help="predictions")
    parser.add_argument("--repeat", type=int, default=3, help="collections (the best counts)")
    args = parser.parse_args(argv)
    prefix = f"gsbench-{token_hex(4)}"
    os.environ["GENDERSCORE_KEY_PREFIX"] = prefix  # read when the settings first load

    from worker.results import connect

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    client = connect()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
        result = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load_average": load}
        result |= collect(client, args.collect, repeat=args.repeat)
        result["writers"] = writers(args.collect)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        delete_prefix(client, f"{prefix}:")
    print(json.dumps(result, indent=2))
    print(
        f"collect {args.collect:,} predictions: {result['seconds']} s (best of {args.repeat}; "
        f"target <= 3 s) on {cpu}; to_csv / collector's writer: "
        f"{result['writers']['to_csv_over_ours']}x"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
