"""The genderscore benchmark, one command: ``python -m bench.run [--n 5000] [--quick]``.

On N generated profile-like JPEGs and a model of the origin's architecture (150x150,
kernel 4, trained once on other bench pictures and kept in ``bench/results/models``,
with its compiled twin: ``bench.modelfile``) it measures, one after the other:

(a) the in-process ceiling, ``genderscore score --local`` (every core, no broker),
    from its model loaded to the CSV written (and, cold, from the command's start),
    with Keras (``GENDERSCORE_RUNTIME=keras``) and with the default runtime (the twin),
    side by side, and how the two CSVs agree (labels, |dp|);
(cold) the cold start of a scoring worker, from the worker command's start to the
    first batch recorded, with a run waiting in the queue, for both runtimes;
(b) the pipeline, ``genderscore score --wait --out`` with real workers
    (``celery -A worker worker -Q score``, the project's default settings), from the
    run's creation (first enqueue) to the CSV written; fresh workers each time, first
    warmed up by a run of two batches per process (timed too: the cold start); again
    at each of ``--sizes``;
(c) the naive baseline (``bench.naive``: one task and one ``model.predict`` per
    picture), warmed up the same way, on the first ``--naive-n`` pictures;

then enqueueing ``--enqueue`` userids and collecting ``--collect`` predictions. It
prints one table and writes it as JSON to ``bench/results/<timestamp>.json``.
Everything lives under a private key prefix (``gsbench-<random>``) on
``GENDERSCORE_REDIS_URL``, deleted at the end; other ``GENDERSCORE_*`` settings in the
environment apply to the workers as they would in production."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from secrets import token_hex
from typing import TYPE_CHECKING, Any

from bench.cpu import CpuMeter, StartWhenRunExists, cpu_model, redis_server_pid
from bench.modelfile import make_in_subprocess
from bench.pictures import PictureSet, generate, subset, userids
from bench.procs import ROOT, bench_env, celery_worker, compile_bytecode, genderscore

if TYPE_CHECKING:
    import redis

log = logging.getLogger("bench")
RESULTS_DIR = ROOT / "bench" / "results"
MODELS_DIR = ROOT / "bench" / "results" / "models"  # trained once, reused (git-ignored)
TARGETS = {
    "b_over_a": 0.85,
    "b_over_c": 20.0,
    "worker_rss_mb": 250.0,
    "enqueue_per_s": 10_000,
    "collect_s": 15.0,
    "redis_bytes_per_prediction": 150.0,
    # issue 11: the twin against Keras, on a CPU with AMX or AVX-512 BF16/VNNI (else 1.0)
    "twin_over_keras": 2.0,
    "cold_start_s": 2.0,
    "label_agreement": 0.995,
    "median_abs_dp": 1e-3,
    # issue 12: the machinery's CPU per picture during the warm (b) run
    "b_over_a_default": 0.93,
    "worker_main_ms": 0.25,
    "idle_share": 0.03,
    "redis_producer_ms": 0.15,
    "d_over_b": 0.9,  # issue 10
}
KERAS = {"GENDERSCORE_RUNTIME": "keras"}


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures."""

    n: int = 5000
    sizes: tuple[int, ...] = (1000, 5000, 20000)
    naive_n: int = 500
    enqueue_n: int = 100_000
    collect_n: int = 1_000_000
    model_size: int = 150
    model_kernel: int = 4
    train_count: int = 1600  # bench pictures the model is trained on (a quarter validates)
    train_epochs: int = 6
    profile: str = "full"  # picture sizes: "full" (100x100..1024x768) or "quick"
    seed: int = 1
    peers: bool = False  # also Ray Data's recipe (bench.peers; the bench-peers extra)
    s3_delay_ms: float = 20.0  # (d): S3 with this latency per request; < 0: no (d)

    @classmethod
    def quick(cls) -> Plan:
        """A smoke run: tiny pictures and model, every figure, in under a minute.

        One scaling size only: each size costs a fresh worker and its TensorFlow import.
        """
        return cls(
            n=120,
            sizes=(120,),
            naive_n=30,
            enqueue_n=2000,
            collect_n=20_000,
            model_size=32,
            model_kernel=3,
            train_count=200,
            train_epochs=1,
            profile="quick",
        )


@dataclass
class Bench:
    """A benchmark run's shared state: where things are and what was measured."""

    plan: Plan
    workdir: Path
    client: redis.Redis
    model: Path
    model_sha: str
    pictures: PictureSet
    results: dict[str, Any] = field(default_factory=dict)

    def folder(self, count: int) -> Path:
        """A folder with the first ``count`` pictures."""
        return subset(self.pictures, count, self.workdir / f"pictures-{count}")

    def logs(self, name: str) -> Path:
        """Where a process of this run logs."""
        path = self.workdir / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


# --- the three measurements ---------------------------------------------------------


def csv_written_at(out: Path) -> float:
    """When a collected CSV and its errors file were both written (unix time)."""
    errors = out.with_name(f"{out.stem}.errors.csv")
    return max(out.stat().st_mtime, errors.stat().st_mtime if errors.exists() else 0.0)


def check_csv(out: Path, expected: list[str]) -> dict[str, int]:
    """Rows of a collected CSV; raise unless it has exactly one row per expected userid."""
    with out.open(newline="") as handle:
        rows = [row["userid"] for row in csv.DictReader(handle)]
    errors = out.with_name(f"{out.stem}.errors.csv")
    error_rows = max(0, sum(1 for _ in errors.open()) - 1) if errors.exists() else 0
    if len(rows) != len(set(rows)) or set(rows) != set(expected):
        raise RuntimeError(
            f"{out}: {len(rows)} rows ({len(set(rows))} distinct) for {len(expected)} pictures"
        )
    return {"rows": len(rows), "error_rows": error_rows}


def served_by(log_text: str) -> str:
    """``openvino bf16`` or ``keras f32``: what the last ``model loaded`` line says."""
    found = re.findall(r"model loaded: .* runtime=(\S+) precision=(\S+)", log_text)
    return " ".join(found[-1]) if found else "?"


def measure_local(
    bench: Bench, count: int, env: dict[str, str] | None = None, label: str = "local"
) -> dict[str, Any]:
    """(a) ``genderscore score --local``: model loaded (warm) or command start (cold) to CSV."""
    folder = bench.folder(count)
    out = bench.workdir / f"{label}-{count}.csv"
    meter = CpuMeter(None, None)
    meter.start()
    cmd = genderscore(
        ["score", str(folder), "--local", "--out", str(out)],
        bench_env(env),
        bench.workdir,
        timeout=120 + count,
    ).check("score --local")
    meter.stop()
    written = csv_written_at(out)
    seconds, cold = written - cmd.model_loaded, written - cmd.started
    cpu = meter.per_picture(count, cmd.cpu_seconds - cmd.startup_cpu_seconds)
    return {
        "pictures": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "cold_seconds": round(cold, 2),  # with the scan, TensorFlow's import and the model load
        "cold_images_per_s": round(count / cold, 1),
        "peak_rss_mb": cmd.max_rss_mb,
        # the one process, after its imports (model load and scan included); the idle
        # share is over the whole command, start-up included
        "cpu_ms_per_picture": cpu["ms_per_picture"]["producer"],
        "idle_share": cpu["idle_share"],
        "served_by": served_by(cmd.stderr),
        "csv": str(out),
        **check_csv(out, userids(bench.pictures, count)),
    }


def agreement(reference: Path, other: Path, threshold: float = 0.5) -> dict[str, Any]:
    """How ``other``'s predictions agree with ``reference``'s (collected CSVs, p_female to
    6 decimals): label agreement, median and max |dp|, over the userids both scored."""

    def read(path: Path) -> dict[str, float]:
        with path.open(newline="") as handle:
            return {row["userid"]: float(row["p_female"]) for row in csv.DictReader(handle)}

    ref, got = read(reference), read(other)
    common = sorted(set(ref) & set(got))
    diffs = sorted(abs(ref[u] - got[u]) for u in common)
    same = sum((ref[u] >= threshold) == (got[u] >= threshold) for u in common)
    return {
        "pictures": len(common),
        "label_agreement": round(same / max(1, len(common)), 6),
        "median_abs_dp": statistics.median(diffs) if diffs else 0.0,
        "max_abs_dp": max(diffs, default=0.0),
    }


def measure_cold_start(
    bench: Bench, label: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """(cold) A run waits in the queue; a scoring worker starts: seconds from the worker
    command's start to its first batch recorded (the run polled every 10 ms)."""
    from worker.keys import run_keys

    count = warmup_size(bench, 2)
    worker_env = bench_env(env)
    cmd = genderscore(
        ["score", str(bench.folder(count))], worker_env, bench.workdir, timeout=120
    ).check(f"score ({label})")
    run_id = cmd.stdout.strip().splitlines()[-1]
    keys = run_keys(run_id)
    started = time.monotonic()
    first = None
    with celery_worker(
        "worker", "score", f"bench-{label}", worker_env, bench.logs(label)
    ) as worker:
        deadline = started + 120
        # Polled every 10 ms (and by the ready wait every 50 ms): a prediction's own
        # time is in whole seconds, too coarse for a start of about one second.
        while (settled := bench.client.hlen(keys.pred) + bench.client.hlen(keys.err)) < count:
            if first is None and settled:
                first = time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"cold start ({label}): run {run_id} did not finish")
            time.sleep(0.01 if first is None else 0.1)
        log_text = worker.log_text()
    if bench.client.hlen(keys.err):
        raise RuntimeError(f"cold start ({label}): errors {bench.client.hgetall(keys.err)}")
    first = time.monotonic() if first is None else first
    return {
        "pictures": count,
        "seconds": round(first - started, 2),
        "served_by": served_by(log_text),
    }


def warmup_size(bench: Bench, processes: int) -> int:
    """Pictures of the warm-up run: two batches per pool process."""
    from worker.settings import settings

    return min(bench.pictures.count, 2 * settings.batch_size * max(1, processes))


def score_run(
    bench: Bench,
    folder: Path | str,
    count: int,
    label: str,
    env: dict[str, str],
    meter: CpuMeter | None = None,
) -> dict[str, Any]:
    """One ``genderscore score --wait --out`` run: first enqueue to CSV written.

    With a ``meter``, CPU per picture by component from the run's creation (seen in
    Redis) to the command's end; the producer's own CPU after its imports.
    """
    from producer.enqueue import new_run_id
    from worker.keys import run_keys

    out = bench.workdir / f"{label}.csv"
    wait_s = 120 + count / 5
    run_id = new_run_id()
    watch = StartWhenRunExists(bench.client, run_keys(run_id).meta, meter)
    with watch:
        cmd = genderscore(
            [
                "score",
                str(folder),
                "--wait",
                "--out",
                str(out),
                "--run-id",
                run_id,
                "--timeout",
                f"{wait_s:.0f}",
            ],
            env,
            bench.workdir,
            timeout=wait_s + 60,
        ).check(f"score --wait ({label})")
    meta = bench.client.hgetall(run_keys(run_id).meta)
    started, finished = float(meta["started_at"]), float(meta["finished_at"])
    written = csv_written_at(out)
    return {
        "pictures": count,
        "seconds": round(written - started, 2),
        "images_per_s": round(count / (written - started), 1),
        "scoring_seconds": round(finished - started, 2),  # first enqueue to last outcome
        "collect_seconds": round(written - finished, 2),  # with --wait's 0.5 s polling
        "command_seconds": round(written - cmd.started, 2),  # with the scan
        "producer_peak_rss_mb": cmd.max_rss_mb,
        **check_csv(out, userids(bench.pictures, count)),
    } | (
        {
            "cpu": meter.per_picture(count, cmd.cpu_seconds - cmd.startup_cpu_seconds)
            | {"producer_startup_ms": round(1000 * cmd.startup_cpu_seconds, 1)}
        }
        if meter and meter.snapshots
        else {}
    )


def measure_pipeline(
    bench: Bench,
    count: int,
    label: str = "",
    worker_env: dict[str, str] | None = None,
    worker_args: tuple[str, ...] = (),
    app: str = "worker",
    source: str | None = None,
) -> dict[str, Any]:
    """(b) fresh workers; a warm-up run loads the model (cold), then the timed run (warm)
    on the folder of ``count`` pictures, or on ``source`` (a URL prefix holding them)."""
    from worker.keys import model_loads

    label = label or f"pipeline-{count}"
    bench.client.delete(model_loads())
    env = bench_env(worker_env)
    with celery_worker(
        app, "score", f"bench-{label}", env, bench.logs(label), worker_args
    ) as worker:
        warm_n = warmup_size(bench, len(worker.pool_pids()))
        cold = score_run(bench, bench.folder(warm_n), warm_n, f"{label}-warmup", env)
        meter = CpuMeter(worker.proc.pid, redis_server_pid(bench.client))
        result = score_run(bench, source or bench.folder(count), count, label, env, meter)
        rss = worker.peak_rss_mb()
        processes = len(worker.pool_pids()) or 1  # solo and threads: the main process scores
    loads = {k: int(v) for k, v in bench.client.hgetall(model_loads()).items()}
    return result | {
        "warmup": {k: cold[k] for k in ("pictures", "seconds", "images_per_s")},
        "worker_peak_rss_mb": rss,
        "worker_processes": processes,
        "model_loads": sum(loads.values()),
        "model_loads_by_process": loads,
    }


def measure_s3(bench: Bench, count: int, delay_ms: float) -> dict[str, Any]:
    """(d) (b) with the pictures in a SeaweedFS S3 store behind a proxy that delays every
    request by ``delay_ms`` (``bench.sources.s3_with_latency``); the store and the proxy
    run on this machine, so their CPU is shown apart."""
    from bench.sources import s3_with_latency, serving_cpu

    with s3_with_latency(bench.folder(count), delay_ms) as (prefix, s3_env):
        before = serving_cpu()
        result = measure_pipeline(bench, count, f"s3-{count}", s3_env, source=prefix)
        served = serving_cpu() - before  # the warm-up run's pictures come from the folder
    return result | {
        "delay_ms": delay_ms,
        "store_and_proxy_cpu_ms_per_picture": round(1000 * served / count, 3),
    }


def measure_naive(bench: Bench, count: int) -> dict[str, Any]:
    """(c) one task and one ``model.predict`` per picture, on warmed-up workers."""
    from bench.naive import NAIVE_QUEUE, NAIVE_TASK, app, loads_key, results_key
    from worker.files import write_csv_atomic

    folder = bench.folder(count)
    uids = userids(bench.pictures, count)
    out = bench.workdir / f"naive-{count}.csv"

    def send(run: str, names: list[str]) -> None:
        for uid in names:  # one publish per task, as people write it first
            app.send_task(
                NAIVE_TASK,
                args=(run, uid, str(folder / f"{uid}.jpg"), str(bench.model)),
                queue=NAIVE_QUEUE,
            )

    def wait(run: str, total: int, started: float, limit: float) -> None:
        while bench.client.hlen(results_key(run)) < total:
            if time.time() - started > limit:
                raise RuntimeError(
                    f"naive baseline: {bench.client.hlen(results_key(run))} "
                    f"of {total} after {limit:.0f}s"
                )
            time.sleep(0.05)

    bench.client.delete(loads_key())
    with celery_worker(
        "bench.naive", NAIVE_QUEUE, "bench-naive", bench_env(), bench.logs("naive")
    ) as worker:
        processes = len(worker.pool_pids()) or 1
        warm_started = time.time()
        sent = 0
        while bench.client.hlen(loads_key()) < processes and time.time() - warm_started < 120:
            # One task at a time: a busy process (loading its model) leaves the next to another.
            send("naive-warmup", uids[sent % count : sent % count + 1])
            sent += 1
            time.sleep(0.5)
        # Userids wrap around past ``count``: a slow model load means more sends than pictures.
        wait("naive-warmup", min(sent, count), warm_started, 180)
        warmup_seconds = time.time() - warm_started
        run = f"naive-{token_hex(3)}"
        meter = CpuMeter(worker.proc.pid, redis_server_pid(bench.client))
        meter.start()
        started = time.time()
        send(run, uids)
        wait(run, count, started, 120 + count * 2)
        meter.stop()
        values = bench.client.hgetall(results_key(run))
        write_csv_atomic(out, ("userid", "p"), sorted(values.items()))
        seconds = csv_written_at(out) - started
        rss = worker.peak_rss_mb()
    loads = {k: int(v) for k, v in bench.client.hgetall(loads_key()).items()}
    return {
        "pictures": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "warmup": {"pictures": sent, "seconds": round(warmup_seconds, 2)},
        "worker_peak_rss_mb": rss,
        "worker_processes": processes,
        "model_loads": sum(loads.values()),
        "cpu": meter.per_picture(count),  # its producer is this process: not counted
        **check_csv(out, uids),
    }


def measure_ray(bench: Bench, count: int) -> dict[str, Any]:
    """The peer: Ray Data's ``map_batches`` recipe on the same pictures (``bench.peers``)."""
    from bench.peers import run_ray
    from worker.settings import settings

    out = bench.workdir / f"peer-ray-{token_hex(3)}"
    return run_ray(bench.folder(count), bench.model, out, settings.batch_size)


# --- the run ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Facts about this machine and the software measured."""
    mem_kib = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    versions = {}
    for package in (
        "tensorflow",
        "keras",
        "openvino",
        "celery",
        "celery-batches",
        "kombu",
        "redis",
        "pillow",
        "numpy",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
        "fast_cpu": fast_cpu(),
    }


def effective_settings(concurrency: int) -> dict[str, Any]:
    """The scoring settings that workers of ``concurrency`` processes run with."""
    from worker.model import default_tf_threads
    from worker.settings import settings

    return {
        "pool": "prefork",
        "concurrency": concurrency,
        "batch_size": settings.batch_size,
        "flush_interval_s": settings.flush_interval,
        "prefetch_batches": settings.prefetch_batches,
        "prefetch_per_process": settings.batch_size * settings.prefetch_batches,
        "tf_threads_per_process": default_tf_threads(concurrency),
        "redis_url": _redact(settings.redis_url),
        "key_prefix": settings.key_prefix,
    }


def _redact(url: str) -> str:
    from worker.results import redact

    return redact(url)


def fast_cpu() -> bool:
    """Whether this CPU has AMX or AVX-512 BF16/VNNI (where the twin must reach 2x Keras)."""
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    return bool({"amx_bf16", "avx512_bf16", "avx512_vnni"} & set(flags))


def setup(plan: Plan, workdir: Path) -> Bench:
    """Pictures, model and a Redis client under the benchmark's private prefix."""
    from worker.model import file_sha256
    from worker.results import connect

    client = connect()
    client.ping()
    model = Path(os.environ["GENDERSCORE_MODEL"])
    started = time.perf_counter()
    make_in_subprocess(
        model,
        plan.model_size,
        plan.model_kernel,
        plan.train_count,
        plan.train_epochs,
        plan.profile,
        bench_env(),
    )
    log.info("model %s ready (%.1fs)", model.name, time.perf_counter() - started)
    started = time.perf_counter()
    count = max(plan.n, plan.naive_n, *plan.sizes)
    pictures = generate(
        workdir / f"pictures-{plan.profile}-s{plan.seed}", count, plan.seed, plan.profile
    )
    log.info("%d pictures ready (%.1fs)", count, time.perf_counter() - started)
    return Bench(plan, workdir, client, model, file_sha256(model), pictures)


def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Every measurement of ``plan``; returns the results."""
    from bench.micro import collect, enqueue

    bench = setup(plan, workdir)
    results = bench.results
    results["plan"] = asdict(plan) | {"sizes": list(plan.sizes)}
    results["pictures"] = bench.pictures.summary() | {"used": plan.n}
    meta = json.loads(bench.model.with_suffix(".json").read_text())
    results["model"] = {
        "input": f"{plan.model_size}x{plan.model_size}",
        "kernel": plan.model_kernel,
        "sha256": bench.model_sha[:12],
        "val_accuracy": meta.get("val_accuracy"),
        "twin": {
            p: {
                k: c.get(k)
                for k in (
                    "passed",
                    "label_agreement",
                    "median_abs_dp",
                    "max_abs_dp",
                    "pictures",
                    "reason",
                )
            }
            for p, c in meta.get("twin", {}).get("precisions", {}).items()
        },
    }

    phases = [
        ("local_keras", lambda: measure_local(bench, plan.n, KERAS, "local-keras")),
        ("local", lambda: measure_local(bench, plan.n)),
        ("cold_keras", lambda: measure_cold_start(bench, "cold-keras", KERAS)),
        ("cold", lambda: measure_cold_start(bench, "cold")),
        ("pipeline", lambda: measure_pipeline(bench, plan.n)),
        # (a) again, right after (b): the machine's speed drifts from minute to minute by
        # more than the pipeline's overhead, so (b) is divided by the (a) around it.
        ("local_after", lambda: measure_local(bench, plan.n, label="local-after")),
        ("naive", lambda: measure_naive(bench, min(plan.naive_n, plan.n))),
    ]
    if plan.s3_delay_ms >= 0:
        phases.append(("s3", lambda: measure_s3(bench, plan.n, plan.s3_delay_ms)))
    if plan.peers:
        phases.append(("peer_ray", lambda: measure_ray(bench, plan.n)))
    for name, action in phases:
        results[name] = _phase(name, action)
    results["settings"] = effective_settings(results["pipeline"]["worker_processes"])
    scaling = []
    for size in plan.sizes:
        result = (
            results["pipeline"]
            if size == plan.n
            else _phase(f"pipeline at {size}", lambda size=size: measure_pipeline(bench, size))
        )
        scaling.append(result)
    results["scaling"] = scaling
    results["enqueue"] = _phase(
        "enqueue",
        lambda: enqueue(
            bench.client, plan.enqueue_n, bench.pictures.folder, bench.model, bench.model_sha
        ),
    )
    results["collect"] = _phase("collect", lambda: collect(bench.client, plan.collect_n))
    results["agreement"] = agreement(
        Path(results["local_keras"]["csv"]), Path(results["local"]["csv"])
    )
    results["ratios"] = {
        "twin_over_keras": round(
            results["local"]["images_per_s"] / results["local_keras"]["images_per_s"], 2
        ),
        "b_over_a": round(results["pipeline"]["images_per_s"] / a_around_b(results), 3),
        "b_over_c": round(
            results["pipeline"]["images_per_s"] / results["naive"]["images_per_s"], 2
        ),
    }
    if "s3" in results:
        results["ratios"]["d_over_b"] = round(
            results["s3"]["images_per_s"] / results["pipeline"]["images_per_s"], 3
        )
    results["marginal_cpu"] = marginal_cpu(scaling)
    results["targets"] = targets(results)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def a_around_b(results: dict[str, Any]) -> float:
    """(a) with the default runtime, img/s: the mean of its runs before and after (b)."""
    runs = [results[k]["images_per_s"] for k in ("local", "local_after") if k in results]
    return sum(runs) / len(runs)


def _phase(name: str, action: Any) -> Any:
    load = os.getloadavg()[0]
    quiet = "" if load < 0.5 else f" (load average {load:.2f}: the machine is not quiet)"
    log.info("--- %s%s", name, quiet)
    started = time.perf_counter()
    result = action()
    log.info(
        "--- %s done in %.1fs: %s",
        name,
        time.perf_counter() - started,
        {k: v for k, v in result.items() if not isinstance(v, dict)},
    )
    return result


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    pipeline, collected = results["pipeline"], results["collect"]
    worker_rss = max(v for run in results["scaling"] for v in run["worker_peak_rss_mb"].values())
    cpu = pipeline["cpu"]["ms_per_picture"]
    return [
        _target(
            "(a) default runtime / keras",
            results["ratios"]["twin_over_keras"],
            ">=",
            TARGETS["twin_over_keras"] if fast_cpu() else 1.0,
        ),
        _target(
            "cold start, worker command -> first batch (s)",
            results["cold"]["seconds"],
            "<=",
            TARGETS["cold_start_s"],
        ),
        _target(
            "label agreement with Keras f32 (a)",
            results["agreement"]["label_agreement"],
            ">=",
            TARGETS["label_agreement"],
        ),
        _target(
            "median |dp| against Keras f32 (a)",
            results["agreement"]["median_abs_dp"],
            "<=",
            TARGETS["median_abs_dp"],
        ),
        _target(
            "(b)/(a), default runtime",
            results["ratios"]["b_over_a"],
            ">=",
            TARGETS["b_over_a_default"],
        ),
        _target(
            "(b) worker main process, CPU ms per picture",
            cpu["worker_main"],
            "<=",
            TARGETS["worker_main_ms"],
        ),
        _target(
            "(b) Redis + producer, CPU ms per picture",
            round(cpu["redis_server"] + cpu["producer"], 3),
            "<=",
            TARGETS["redis_producer_ms"],
        ),
        _target(
            "(b) machine idle share (warm run)",
            pipeline["cpu"]["idle_share"],
            "<=",
            TARGETS["idle_share"],
        ),
        _target("(b)/(c)", results["ratios"]["b_over_c"], ">=", TARGETS["b_over_c"]),
        *(
            [
                _target(
                    f"(d)/(b): S3, {results['s3']['delay_ms']:g} ms per request",
                    results["ratios"]["d_over_b"],
                    ">=",
                    TARGETS["d_over_b"],
                )
            ]
            if "s3" in results
            else []
        ),
        _target("worker peak RSS per process (MB)", worker_rss, "<=", TARGETS["worker_rss_mb"]),
        _target(
            "model loads = worker processes",
            pipeline["model_loads"],
            "==",
            pipeline["worker_processes"],
        ),
        _target(
            f"enqueue {results['enqueue']['userids']:,} userids (/s)",
            results["enqueue"]["per_second"],
            ">=",
            TARGETS["enqueue_per_s"],
        ),
        _target(
            f"collect {collected['predictions']:,} predictions (s)",
            collected["seconds"],
            "<=",
            TARGETS["collect_s"],
        ),
        _target(
            "Redis bytes per prediction (INFO memory)",
            collected["info_bytes_per_prediction"],
            "<=",
            TARGETS["redis_bytes_per_prediction"],
        ),
    ]


def _target(name: str, value: float, op: str, goal: float) -> dict[str, Any]:
    met = {">=": value >= goal, "<=": value <= goal, "==": value == goal}[op]
    return {"name": name, "value": value, "target": f"{op} {goal:g}", "met": met}


# --- output -------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    """The results as a plain-text table (what the README shows)."""
    m, s, p = results["machine"], results["settings"], results["pictures"]
    local, pipe, naive = results["local"], results["pipeline"], results["naive"]
    lines = [
        f"genderscore benchmark {results['started_at']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']},"
        f" TensorFlow {m['versions']['tensorflow']}, Celery {m['versions']['celery']},"
        f" Redis {m.get('redis_server', '?')}; load average at start "
        f"{m['load_average_at_start'][0]}, at end {results['load_average_at_end'][0]}",
        f"pictures: a set of {p['count']:,} ({p['min_wh'][0]}x{p['min_wh'][1]} to "
        f"{p['max_wh'][0]}x{p['max_wh'][1]}, {p['progressive']} progressive, "
        f"{p['grayscale']} grayscale, mean {p['mean_kib']} KiB); model "
        f"{results['model']['input']}, kernel {results['model']['kernel']} (trained on other "
        f"bench pictures, validation accuracy {results['model']['val_accuracy']})",
        f"workers: {s['pool']} -c {s['concurrency']}, batch {s['batch_size']}, flush "
        f"{s['flush_interval_s']} s, prefetch {s['prefetch_per_process']}/process, TensorFlow "
        f"{s['tf_threads_per_process']} thread(s)/process",
        "",
        "warm: every process has its model loaded (as on any night after the first); cold: the",
        "model load and TensorFlow's import included.",
        f"{'measure (warm)':<52} {'pictures':>8} {'seconds':>8} {'img/s':>8}  cold",
        _row(
            f"(a) score --local, keras ({results['local_keras']['served_by']})",
            results["local_keras"],
        )
        + f"  {results['local_keras']['cold_seconds']:.2f} s, "
        f"{results['local_keras']['cold_images_per_s']} img/s",
        _row(f"(a) score --local, default ({local['served_by']})", local)
        + f"  {local['cold_seconds']:.2f} s, {local['cold_images_per_s']} img/s",
        _row("(b) score -> workers -> collect (first enqueue->CSV)", pipe) + f"  {_warmup(pipe)}",
        _row("(a) score --local, default, again right after (b)", results["local_after"]),
        _row("(c) naive: one task + model.predict per picture", naive) + f"  {_warmup(naive)}",
        *(
            [
                _row(
                    f"(d) (b) from S3, +{results['s3']['delay_ms']:g} ms per request", results["s3"]
                )
                + f"  {_warmup(results['s3'])}"
            ]
            if "s3" in results
            else []
        ),
        "",
        f"{'(b) at N, fresh workers each (warm)':<52} {'pictures':>8} {'seconds':>8} "
        f"{'img/s':>8}  collect s | worker peak RSS MB | cold",
    ]
    for run_result in results["scaling"]:
        rss = ", ".join(f"{v:.0f}" for v in run_result["worker_peak_rss_mb"].values())
        lines.append(
            _row("", run_result) + f"  {run_result['collect_seconds']:>9.2f} | "
            f"{rss} | {_warmup(run_result)}"
        )
    agree, ck, cd = results["agreement"], results["cold_keras"], results["cold"]
    lines += [
        "",
        f"(a) default / keras: {results['ratios']['twin_over_keras']}x; peak RSS "
        f"{results['local_keras']['peak_rss_mb']:.0f} MB (keras) vs {local['peak_rss_mb']:.0f} "
        f"MB (default); agreement on {agree['pictures']:,} pictures: labels "
        f"{agree['label_agreement']:.2%}, median |dp| {agree['median_abs_dp']:.1e}, max "
        f"{agree['max_abs_dp']:.1e}",
        f"cold start (worker command -> first batch recorded): keras {ck['seconds']:.2f} s "
        f"({ck['served_by']}), default {cd['seconds']:.2f} s ({cd['served_by']})",
        "twin precisions at export: "
        + "; ".join(
            f"{p} {'passed' if c['passed'] else 'refused'}"
            + (
                f" ({c['label_agreement']:.2%}, median {c['median_abs_dp']:.1e})"
                if c.get("label_agreement") is not None
                else ""
            )
            for p, c in results["model"]["twin"].items()
        ),
    ]
    if "peer_ray" in results:
        ray = results["peer_ray"]
        lines += [
            "",
            f"peer: Ray Data {ray['ray']} map_batches, {ray['actors']} actors: "
            f"{ray['images_per_s']} img/s on {ray['pictures']:,} pictures (its actors' "
            f"start and model loads included; ray.init {ray['ray_init_seconds']} s apart), "
            f"peak PSS {ray['peak_pss_mb']:.0f} MB"
            f"; (b) {pipe['images_per_s']} img/s = "
            f"{pipe['images_per_s'] / ray['images_per_s']:.2f}x the peer; peer / (a) = "
            f"{ray['images_per_s'] / local['images_per_s']:.2f}",
        ]
    lines += ["", *cpu_table(results)]
    lines += ["", f"{'target':<52} {'value':>12} {'goal':>10}  met"]
    for t in results["targets"]:
        value = (
            f"{t['value']:,}"
            if isinstance(t["value"], int)
            else f"{t['value']:.1e}"
            if abs(t["value"]) < 0.01
            else f"{t['value']:,.2f}"
        )
        lines.append(
            f"{t['name']:<52} {value:>12} {t['target']:>10}  {'yes' if t['met'] else 'NO'}"
        )
    c, e = results["collect"], results["enqueue"]
    lines += [
        "",
        f"enqueue: {e['userids']:,} userids in {e['seconds']} s; collect: "
        f"{c['predictions']:,} rows in {c['seconds']} s (HSCAN page {c['scan_count']})",
        f"Redis per prediction: {c['info_bytes_per_prediction']} B (INFO memory), "
        f"{c['key_bytes_per_prediction']} B (MEMORY USAGE of the hash); the run's id set adds "
        f"{c['key_bytes_per_userid_in_ids']} B per userid",
        f"(c) ran on the first {naive['pictures']:,} pictures only: it is slow.",
    ]
    return "\n".join(lines)


def cpu_table(results: dict[str, Any]) -> list[str]:
    """CPU milliseconds per picture by component, and the machine's idle share (/proc)."""
    local, pipe, naive = results["local"], results["pipeline"], results["naive"]
    parts = ("pool_processes", "worker_main", "redis_server", "producer")
    lines = [
        f"{'CPU ms per picture (warm run)':<36} {'pool':>7} {'main':>7} {'redis':>7} "
        f"{'producer':>9} {'total':>7} {'idle':>6}",
        f"{'(a) score --local (one process)':<36} {'':>7} {'':>7} {'':>7} "
        f"{local['cpu_ms_per_picture']:>9.3f} {local['cpu_ms_per_picture']:>7.3f} "
        f"{local['idle_share']:>6.1%}",
    ]
    rows = [("(b) pipeline", pipe), ("(c) naive (producer not counted)", naive)]
    if "s3" in results:
        rows.append(("(d) pipeline from S3", results["s3"]))
    for name, result in rows:
        ms = result["cpu"]["ms_per_picture"]
        lines.append(
            f"{name:<36} "
            + " ".join(f"{ms[k]:>{9 if k == 'producer' else 7}.3f}" for k in parts)
            + f" {sum(ms.values()):>7.3f} {result['cpu']['idle_share']:>6.1%}"
        )
    if "s3" in results:
        lines.append(
            f"(d) the S3 store and the delaying proxy, on the same cores: "
            f"{results['s3']['store_and_proxy_cpu_ms_per_picture']:.3f} ms per picture"
        )
    lines.append(
        f"(b) producer start-up (imports), not per picture: "
        f"{pipe['cpu']['producer_startup_ms']:.0f} ms of CPU, once per command"
    )
    marginal = marginal_cpu(results["scaling"])
    if marginal:
        lines.append(
            f"(b) marginal CPU ms per picture, {marginal['from']:,} -> {marginal['to']:,} "
            "pictures: " + ", ".join(f"{k} {v:.3f}" for k, v in marginal["ms_per_picture"].items())
        )
    return lines


def marginal_cpu(scaling: list[dict[str, Any]]) -> dict[str, Any] | None:
    """CPU per extra picture between the smallest and the largest (b) run: what each
    component costs per picture once the costs per run (a command's imports, the
    collector's, the first and last batches) are set aside."""
    runs = sorted((r for r in scaling if "cpu" in r), key=lambda r: r["pictures"])
    if len(runs) < 2 or runs[-1]["pictures"] <= runs[0]["pictures"]:
        return None
    small, large = runs[0], runs[-1]
    extra = large["pictures"] - small["pictures"]
    before, after = small["cpu"]["cpu_seconds"], large["cpu"]["cpu_seconds"]
    return {
        "from": small["pictures"],
        "to": large["pictures"],
        "ms_per_picture": {k: round(1000 * (after[k] - before[k]) / extra, 3) for k in after},
    }


def _warmup(result: dict[str, Any]) -> str:
    warm = result["warmup"]
    return f"first {warm['pictures']} after start: {warm['seconds']:.2f} s"


def _row(name: str, result: dict[str, Any]) -> str:
    return (
        f"{name:<52} {result['pictures']:>8,} {result['seconds']:>8.2f} "
        f"{result['images_per_s']:>8.1f}"
    )


def write_results(results: dict[str, Any], folder: Path) -> Path:
    """Write the results as ``<folder>/<timestamp>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{results['started_at'].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (unset ones come from the plan: full or --quick)."""
    full, quick = Plan(), Plan.quick()
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, help=f"pictures for (a) and (b) ({full.n})")
    parser.add_argument(
        "--sizes",
        help=f"picture counts for the scaling runs of (b) ({','.join(map(str, full.sizes))})",
    )
    parser.add_argument(
        "--naive-n", type=int, help=f"pictures for the naive baseline (c) ({full.naive_n})"
    )
    parser.add_argument(
        "--enqueue", type=int, help=f"userids for the enqueue micro-benchmark ({full.enqueue_n:,})"
    )
    parser.add_argument(
        "--collect",
        type=int,
        help=f"predictions for the collect micro-benchmark ({full.collect_n:,})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {quick.n} small pictures, a {quick.model_size}x"
        f"{quick.model_size} model, small counts",
    )
    parser.add_argument(
        "--s3-delay-ms",
        type=float,
        help="(d): latency added to every S3 request, ms (20; -1: no (d))",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run Ray Data's batch-inference recipe (needs the bench-peers extra)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep pictures, model, CSVs and logs here (reused by the next run)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes (bench/results)"
    )
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan the options ask for: --quick or the full defaults, with overrides."""
    base = Plan.quick() if args.quick else Plan()
    sizes = tuple(int(x) for x in args.sizes.split(",") if x) if args.sizes else base.sizes
    return replace(
        base,
        n=args.n or base.n,
        sizes=sizes,
        naive_n=args.naive_n or base.naive_n,
        enqueue_n=args.enqueue or base.enqueue_n,
        collect_n=args.collect or base.collect_n,
        peers=args.peers,
        s3_delay_ms=base.s3_delay_ms if args.s3_delay_ms is None else args.s3_delay_ms,
    )


def use_private_prefix(workdir: Path, plan: Plan) -> str:
    """Point this process (and every process it starts) at a private key prefix and model."""
    prefix = f"gsbench-{token_hex(4)}"
    os.environ["GENDERSCORE_KEY_PREFIX"] = prefix
    os.environ["GENDERSCORE_MODEL"] = str(
        MODELS_DIR / f"trained-{plan.profile}-{plan.model_size}-k{plan.model_kernel}"
        f"-n{plan.train_count}-e{plan.train_epochs}.h5"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "worker.settings" in sys.modules:
        raise RuntimeError("bench.run must set the environment before worker.settings loads")
    return prefix


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, write the JSON; 0 when it completed."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    plan = plan_from(args)
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="genderscore-bench-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = use_private_prefix(workdir, plan)
    compile_bytecode()

    from bench.micro import delete_prefix
    from worker.results import connect

    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    info = machine()
    client = connect()
    try:
        info["redis_server"] = client.info("server")["redis_version"]
        results = {"started_at": started_at, "machine": info} | run(plan, workdir)
    finally:
        deleted = delete_prefix(client, f"{prefix}:")
        log.info("deleted %d keys under %s:", deleted, prefix)
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    path = write_results(results, args.results_dir)
    print(table(results))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
