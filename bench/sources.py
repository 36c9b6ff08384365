"""Sources benchmark (issue 10): listing 100,000 objects, fetching with added latency.

``python -m bench.sources listing --objects 100000``
    Puts N small objects under a prefix of a fresh SeaweedFS S3 store (``weed mini``)
    and N files in a folder, then times, side by side, ``list_source`` (listing, the
    picture rules, references with their version tokens) plus each reference's wire
    form (what a message will carry). Target: <= 10 s for 100,000 objects.

``python -m bench.sources fetch --pictures 1000 --delay-ms 20``
    The bench's generated pictures in a folder and under an S3 prefix; fetches them
    with ``Fetcher.fetch_all`` and preprocesses each to 150x150 as it arrives (what a
    worker process does before inference), from (a) the folder, (b) S3, (c) S3 behind
    a proxy adding ``--delay-ms`` to every request, each at ``--concurrency`` and at 1.
    Prints pictures per second and the ratio to the folder.

``python -m bench.sources pipeline --pictures 1000 --delay-ms 20 [--quick]``
    Issue 10's (d) against (b): ``genderscore score --wait --out`` with a real worker,
    from the bench's pictures in a folder (b) and from the same pictures in S3 with
    ``--delay-ms`` added to every request (d), alternating ``--repeats`` times on one
    warm worker. Target: (d) >= 0.9x (b). ``s3_with_latency`` is the part ``bench.run``
    can use for its own (d).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.cpu import cpu_model, process_cpu_seconds
from bench.pictures import generate
from tests.servers import S3Store, free_ports, s3_store, wait_port

if TYPE_CHECKING:
    from bench.run import Bench
    from worker.fetch import FetchPolicy
    from worker.sources import PictureRef

# The project's modules are imported inside the functions: ``pipeline`` must set the
# benchmark's environment (key prefix, model) before worker.settings is first imported.

EXTS = (".jpg", ".jpeg", ".png", ".webp")
BUCKET = "benchpics"
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GENDERSCORE_BENCH_DIR", Path.home() / ".cache/genderscore-bench"))


def _use_store(store: S3Store) -> None:
    os.environ.update(store.env())


def bench_listing(objects: int) -> None:
    """Time listing N objects (and N files) into references."""
    from producer.sources import list_source
    from worker.sources import FolderSource, PrefixSource

    workdir = CACHE / f"listing-{objects}"
    folder = workdir / "image"
    folder.mkdir(parents=True, exist_ok=True)
    payload = b"\xff\xd8\xff" + b"x" * 97
    names = [f"{i:032x}.jpg" for i in range(objects)]
    for name in names:
        if not (folder / name).exists():
            (folder / name).write_bytes(payload)
    with s3_store(keep=workdir / "s3") as store:
        _use_store(store)
        fs = store.filesystem()
        done = workdir / "s3" / "uploaded"
        if not done.exists():  # uploading takes minutes: once, kept under the cache
            if not fs.exists(BUCKET):
                fs.mkdir(BUCKET)
            started = time.perf_counter()
            step = 5000
            for start in range(0, objects, step):
                chunk = names[start : start + step]
                fs.pipe({f"{BUCKET}/profiles/image/{n}": payload for n in chunk}, batch_size=256)
            print(f"uploaded {objects} objects in {time.perf_counter() - started:.1f} s")
            done.touch()
        results = {}
        for label, source in (
            ("folder", FolderSource(folder)),
            ("s3 prefix", PrefixSource(f"s3://{BUCKET}/profiles/image/")),
        ):
            started = time.perf_counter()
            listing = list_source(source, EXTS)
            listed = time.perf_counter() - started
            wire = [json.dumps(p.to_wire()) for p in listing.pictures]
            total = time.perf_counter() - started
            assert len(listing.pictures) == objects == len(wire), (label, len(listing.pictures))
            assert all(p.version for p in listing.pictures)
            results[label] = total
            print(
                f"{label:10s} {objects} pictures: listed {listed:.2f} s, "
                f"+ wire form {total:.2f} s ({objects / total:,.0f}/s)"
            )
        # One plain listing, page after page (s3fs, as fsspec lists any store), for the ratio.
        import fsspec

        stock, path = fsspec.core.url_to_fs(
            f"s3://{BUCKET}/profiles/image/", use_listings_cache=False, skip_instance_cache=True
        )
        started = time.perf_counter()
        assert len(stock.ls(path, detail=True)) == objects
        plain = time.perf_counter() - started
        print(
            f"s3fs ls alone, page after page: {plain:.2f} s "
            f"({plain / results['s3 prefix']:.1f}x the partitioned listing + wire form)"
        )
        enqueue_s = _time_enqueue(store, f"s3://{BUCKET}/profiles/image/", objects)
        per_100k = results["s3 prefix"] * 100_000 / objects
        print(
            f"s3 prefix / folder time: {results['s3 prefix'] / results['folder']:.2f}x; "
            f"100,000 objects: {per_100k:.1f} s (target <= 10 s: "
            f"{'met' if per_100k <= 10 else 'NOT met'})"
        )
        print(
            f"genderscore score <prefix> (listed and enqueued, no worker), {objects:,} "
            f"objects: {enqueue_s:.1f} s, the command's start included "
            f"(target <= 10 s for 100,000: "
            f"{'met' if enqueue_s * 100_000 / objects <= 10 else 'NOT met'})"
        )


def _time_enqueue(store: S3Store, prefix: str, objects: int) -> float:
    """Seconds of ``genderscore score PREFIX`` (list, publish, seal; nothing consumes),
    under a private key prefix deleted afterwards, with a small model of the bench's."""
    from bench.micro import delete_prefix
    from bench.modelfile import make_in_subprocess
    from bench.procs import bench_env
    from worker.results import connect

    model = CACHE / "listing-model" / "tiny.h5"
    make_in_subprocess(model, 32, 3, 200, 1, "quick", bench_env())  # reused when complete
    key_prefix = f"gsbench-list-{os.getpid()}"
    env = bench_env(
        store.env() | {"GENDERSCORE_KEY_PREFIX": key_prefix, "GENDERSCORE_MODEL": str(model)}
    )
    client = connect()
    meta = f"{key_prefix}:run:listing:meta"
    started = time.perf_counter()
    try:
        # Timed to the run's seal (every message published); the command then looks for
        # a consumer for 2 s, which is not enqueueing.
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "score", prefix, "--run-id", "listing"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        while client.hget(meta, "sealed") is None:
            if proc.poll() not in (None, 0) or time.perf_counter() - started > 600:
                raise RuntimeError(
                    f"score {prefix} failed: {proc.stderr.read()[-2000:]!r}"
                    if proc.stderr
                    else "score failed"
                )
            time.sleep(0.02)
        sealed = time.perf_counter() - started
        proc.wait(60)
        return sealed
    finally:
        delete_prefix(client, f"{key_prefix}:")


@contextmanager
def delay_proxy(store: S3Store, delay_ms: float) -> Iterator[str]:
    """``bench.delayproxy`` before the store; yields its endpoint URL."""
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.delayproxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{store.host}:{store.port}",
            "--delay-ms",
            str(delay_ms),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port, 15, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


@contextmanager
def s3_with_latency(
    folder: Path, delay_ms: float = 20.0, bucket: str = BUCKET
) -> Iterator[tuple[str, dict[str, str]]]:
    """Benchmark (d) of issue 10: ``folder``'s pictures in S3, every request ``delay_ms`` late.

    Starts a fresh SeaweedFS store (``weed mini``), uploads every file of ``folder``
    under ``s3://<bucket>/image/`` and starts ``bench.delayproxy`` before the store.
    Yields ``(prefix_url, env)``: ``env`` holds the standard AWS_* variables with the
    proxy as the endpoint, for the producer (``genderscore score <prefix_url> --wait``)
    and the workers alike. Everything is stopped and removed when the block ends.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTS)
    with s3_store() as store:
        fs = store.filesystem()
        fs.mkdir(bucket)
        started = time.perf_counter()
        fs.put([str(p) for p in files], [f"{bucket}/image/{p.name}" for p in files])
        print(f"uploaded {len(files)} pictures to S3 in {time.perf_counter() - started:.1f} s")
        with delay_proxy(store, delay_ms) as endpoint:
            yield f"s3://{bucket}/image/", store.env() | {"AWS_ENDPOINT_URL": endpoint}


def score_source(
    bench: Bench, source: str, count: int, label: str, env: dict[str, str]
) -> dict[str, Any]:
    """One ``genderscore score SOURCE --wait --out`` run, timed as ``bench.run`` times (b):
    from the run's creation (first enqueue) to the CSV written."""
    from bench.pictures import userids
    from bench.procs import genderscore
    from bench.run import check_csv, csv_written_at
    from worker.keys import run_keys

    out = bench.workdir / f"{label}.csv"
    wait_s = 120 + count / 5
    cmd = genderscore(
        ["score", source, "--wait", "--out", str(out), "--timeout", f"{wait_s:.0f}"],
        env,
        bench.workdir,
        timeout=wait_s + 60,
    )
    cmd.check(f"score --wait ({label})")
    run_id = cmd.stdout.strip().splitlines()[-1]
    meta = bench.client.hgetall(run_keys(run_id).meta)
    started = float(meta["started_at"])
    seconds = csv_written_at(out) - started
    return {
        "pictures": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        **check_csv(out, userids(bench.pictures, count)),
    }


def bench_pipeline(
    pictures: int, delay_ms: float, quick: bool, repeats: int, concurrency: int | None
) -> None:
    """(b) the pipeline from the folder against (d) from S3 with latency, side by side.

    One worker (the project's default settings, plus the AWS_* variables of the store)
    serves every run: a warm-up run loads the model, then (b) and (d) alternate
    ``repeats`` times, so that a change of the machine's load hits both.
    """
    import tempfile
    from dataclasses import replace

    from bench.procs import bench_env, celery_worker
    from bench.run import Plan, setup, use_private_prefix, warmup_size

    plan = replace(Plan.quick() if quick else Plan(), n=pictures, sizes=(pictures,))
    workdir = CACHE / f"pipeline-{plan.profile}"
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = use_private_prefix(workdir, plan)
    bench = setup(plan, workdir)
    folder = bench.folder(pictures)
    args = (f"--concurrency={concurrency}",) if concurrency else ()
    runs: dict[str, list[dict[str, Any]]] = {"b": [], "d": []}
    try:
        with s3_with_latency(folder, delay_ms) as (url, s3_env):
            env = bench_env(s3_env)
            with (
                tempfile.TemporaryDirectory() as logs,
                celery_worker(
                    "worker", "score", "bench-sources", env, Path(logs) / "worker.log", args
                ) as worker,
            ):
                warm_n = warmup_size(bench, len(worker.pool_pids()))
                score_source(bench, str(bench.folder(warm_n)), warm_n, "warmup", env)
                for n in range(repeats):
                    runs["b"].append(score_source(bench, str(folder), pictures, f"b{n}", env))
                    serving = serving_cpu()
                    runs["d"].append(score_source(bench, url, pictures, f"d{n}", env))
                    runs["d"][-1]["serving_cpu_ms"] = (serving_cpu() - serving) * 1000 / pictures
                processes = len(worker.pool_pids()) or 1
    finally:
        from bench.micro import delete_prefix

        delete_prefix(bench.client, f"{prefix}:")
    from worker.settings import settings

    print(
        f"{pictures} pictures ({plan.profile} profile, model {plan.model_size}x"
        f"{plan.model_size}), one worker of {processes} pool processes, fetch concurrency "
        f"{settings.fetch_concurrency} per process; load average {os.getloadavg()[0]:.2f}"
    )
    for kind, label in (("b", "(b) folder"), ("d", f"(d) S3 + {delay_ms:g} ms/request")):
        rates = ", ".join(f"{r['images_per_s']:.1f}" for r in runs[kind])
        print(f"{label:28s} pictures/s per run: {rates}")
    # Each (d) against the (b) just before it: a change of load hits a pair less than two
    # runs far apart.
    serving = statistics.median(r["serving_cpu_ms"] for r in runs["d"])
    print(
        f"(d): the store and the proxy, on the same cores, took {serving:.1f} ms of CPU "
        "per picture (median of the runs): a store on its own host would not"
    )
    pairs = zip(runs["b"], runs["d"], strict=True)
    ratios = [d["images_per_s"] / b["images_per_s"] for b, d in pairs]
    middle = statistics.median(ratios)
    print(
        f"(d)/(b) per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median {middle:.2f} "
        f"(target >= 0.9: {'met' if middle >= 0.9 else 'NOT met'})"
    )


def serving_cpu() -> float:
    """CPU seconds so far of this process's store (weed) and delaying proxy children."""
    from bench.procs import children

    total = 0.0
    for pid in children(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"weed" in command or b"bench.delayproxy" in command:
                total += process_cpu_seconds(pid)
        except OSError:
            continue  # gone meanwhile
    return total


def _fetch_and_prepare(
    source: object, refs: list[PictureRef], policy: FetchPolicy, store: S3Store
) -> tuple[float, float, float]:
    """Pictures/s, this process's CPU ms and the store's CPU ms per picture."""
    from worker.fetch import Fetcher
    from worker.preprocess import PictureError, preprocess

    fetcher = Fetcher(policy)
    assert store.proc is not None
    store_cpu, own_cpu = process_cpu_seconds(store.proc.pid), time.process_time()
    started = time.perf_counter()
    done = 0
    for _, data in fetcher.fetch_all(source, refs):  # type: ignore[arg-type]
        if not isinstance(data, bytes):
            raise RuntimeError(f"fetch failed: {data}")
        try:
            preprocess(data, (150, 150))
        except PictureError as exc:
            raise RuntimeError(f"decode failed: {exc}") from None
        done += 1
    elapsed = time.perf_counter() - started
    own = (time.process_time() - own_cpu) * 1000 / done
    served = (process_cpu_seconds(store.proc.pid) - store_cpu) * 1000 / done
    fetcher.close()
    assert done == len(refs)
    return len(refs) / elapsed, own, served


def bench_fetch(pictures: int, delay_ms: float, concurrency: int) -> None:
    """Pictures per second fetched and preprocessed: folder, S3, S3 with latency."""
    from producer.sources import list_source
    from worker.fetch import FetchPolicy
    from worker.sources import FolderSource, PrefixSource

    pics = generate(CACHE / "pictures-full", pictures)
    folder = FolderSource(pics.folder)
    listing = list_source(folder, (".jpg",))
    refs = listing.pictures[:pictures]
    print(
        f"{len(refs)} bench pictures, {pics.total_bytes / pics.count / 1024:.0f} KiB each "
        f"on average, preprocessed to 150x150"
    )
    base = FetchPolicy.from_settings()
    with s3_store() as store:
        _use_store(store)
        fs = store.filesystem()
        fs.mkdir(BUCKET)
        fs.put(
            [str(pics.folder / r.name) for r in refs], [f"{BUCKET}/image/{r.name}" for r in refs]
        )
        prefix = PrefixSource(f"s3://{BUCKET}/image/")
        s3_refs = list_source(prefix, (".jpg",)).pictures
        rates: dict[str, tuple[float, float, float]] = {}
        for workers in (concurrency, 1):
            policy = dataclasses.replace(base, concurrency=workers)
            rates[f"folder c={workers}"] = _fetch_and_prepare(folder, refs, policy, store)
            rates[f"s3 c={workers}"] = _fetch_and_prepare(prefix, s3_refs, policy, store)
            with delay_proxy(store, delay_ms) as endpoint:
                os.environ["AWS_ENDPOINT_URL"] = endpoint
                rates[f"s3+{delay_ms:g}ms c={workers}"] = _fetch_and_prepare(
                    prefix, s3_refs, policy, store
                )
                os.environ["AWS_ENDPOINT_URL"] = store.endpoint
        print("(fetch + preprocess only; CPU: this process and the S3 server, per picture)")
        for workers in (concurrency, 1):
            ref_rate = rates[f"folder c={workers}"][0]
            for label, (rate, own, served) in rates.items():
                if label.endswith(f"c={workers}"):
                    print(
                        f"{label:22s} {rate:8.1f} pictures/s   {rate / ref_rate:.2f}x folder   "
                        f"cpu {own:.2f} ms + store {served:.2f} ms"
                    )


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.sources",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    listing = sub.add_parser("listing")
    listing.add_argument("--objects", type=int, default=100_000)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--pictures", type=int, default=1000)
    fetch.add_argument("--delay-ms", type=float, default=20.0)
    fetch.add_argument("--concurrency", type=int, default=16)
    pipeline = sub.add_parser("pipeline")
    pipeline.add_argument("--pictures", type=int, default=1000)
    pipeline.add_argument("--delay-ms", type=float, default=20.0)
    pipeline.add_argument("--repeats", type=int, default=2)
    pipeline.add_argument("--quick", action="store_true", help="bench.run's quick profile")
    pipeline.add_argument("--worker-concurrency", type=int, help="pool processes (cores)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores")
    if args.what == "listing":
        bench_listing(args.objects)
    elif args.what == "fetch":
        bench_fetch(args.pictures, args.delay_ms, args.concurrency)
    else:
        bench_pipeline(
            args.pictures, args.delay_ms, args.quick, args.repeats, args.worker_concurrency
        )


if __name__ == "__main__":
    main()
