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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.pictures import generate
from producer.sources import list_source
from tests.servers import S3Store, free_ports, s3_store, wait_port
from worker.fetch import Fetcher, FetchPolicy
from worker.preprocess import PictureError, preprocess
from worker.sources import FolderSource, PictureRef, PrefixSource

EXTS = (".jpg", ".jpeg", ".png", ".webp")
BUCKET = "benchpics"
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GENDERSCORE_BENCH_DIR", Path.home() / ".cache/genderscore-bench"))


def cpu_model() -> str:
    """The CPU model line of lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown")


def _use_store(store: S3Store) -> None:
    os.environ.update(store.env())


def bench_listing(objects: int) -> None:
    """Time listing N objects (and N files) into references."""
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
                chunk = names[start:start + step]
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
            print(f"{label:10s} {objects} pictures: listed {listed:.2f} s, "
                  f"+ wire form {total:.2f} s ({objects / total:,.0f}/s)")
        # One plain listing, page after page (s3fs, as fsspec lists any store), for the ratio.
        import fsspec

        stock, path = fsspec.core.url_to_fs(f"s3://{BUCKET}/profiles/image/",
                                            use_listings_cache=False, skip_instance_cache=True)
        started = time.perf_counter()
        assert len(stock.ls(path, detail=True)) == objects
        plain = time.perf_counter() - started
        print(f"s3fs ls alone, page after page: {plain:.2f} s "
              f"({plain / results['s3 prefix']:.1f}x the partitioned listing + wire form)")
        per_100k = results["s3 prefix"] * 100_000 / objects
        print(f"s3 prefix / folder time: {results['s3 prefix'] / results['folder']:.2f}x; "
              f"100,000 objects: {per_100k:.1f} s (target <= 10 s: "
              f"{'met' if per_100k <= 10 else 'NOT met'})")


@contextmanager
def delay_proxy(store: S3Store, delay_ms: float) -> Iterator[str]:
    """``bench.delayproxy`` before the store; yields its endpoint URL."""
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.delayproxy", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"{store.host}:{store.port}", "--delay-ms", str(delay_ms)],
        cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, 15, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fetch_and_prepare(
    source: object, refs: list[PictureRef], policy: FetchPolicy, store: S3Store
) -> tuple[float, float, float]:
    """Pictures/s, this process's CPU ms and the store's CPU ms per picture."""
    fetcher = Fetcher(policy)
    assert store.proc is not None
    store_cpu, own_cpu = _process_cpu(store.proc.pid), time.process_time()
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
    served = (_process_cpu(store.proc.pid) - store_cpu) * 1000 / done
    fetcher.close()
    assert done == len(refs)
    return len(refs) / elapsed, own, served


def bench_fetch(pictures: int, delay_ms: float, concurrency: int) -> None:
    """Pictures per second fetched and preprocessed: folder, S3, S3 with latency."""
    pics = generate(CACHE / "pictures-full", pictures)
    folder = FolderSource(pics.folder)
    listing = list_source(folder, (".jpg",))
    refs = listing.pictures[:pictures]
    print(f"{len(refs)} bench pictures, {pics.total_bytes / pics.count / 1024:.0f} KiB each "
          f"on average, preprocessed to 150x150")
    base = FetchPolicy.from_settings()
    with s3_store() as store:
        _use_store(store)
        fs = store.filesystem()
        fs.mkdir(BUCKET)
        fs.put([str(pics.folder / r.name) for r in refs],
               [f"{BUCKET}/image/{r.name}" for r in refs])
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
                    prefix, s3_refs, policy, store)
                os.environ["AWS_ENDPOINT_URL"] = store.endpoint
        print("(fetch + preprocess only; CPU: this process and the S3 server, per picture)")
        for workers in (concurrency, 1):
            ref_rate = rates[f"folder c={workers}"][0]
            for label, (rate, own, served) in rates.items():
                if label.endswith(f"c={workers}"):
                    print(f"{label:22s} {rate:8.1f} pictures/s   {rate / ref_rate:.2f}x folder   "
                          f"cpu {own:.2f} ms + store {served:.2f} ms")


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    listing = sub.add_parser("listing")
    listing.add_argument("--objects", type=int, default=100_000)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--pictures", type=int, default=1000)
    fetch.add_argument("--delay-ms", type=float, default=20.0)
    fetch.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores")
    if args.what == "listing":
        bench_listing(args.objects)
    else:
        bench_fetch(args.pictures, args.delay_ms, args.concurrency)


if __name__ == "__main__":
    main()
