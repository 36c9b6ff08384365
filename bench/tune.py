"""Tuning runs: the pipeline (b) at a few settings, to choose the defaults from measurements.

``python -m bench.tune [--n 1000] [--configs default,c1,...] [--repeat 1]`` measures
(a) once for reference, then (b) with fresh workers for each configuration below, plus
two in-process measurements: JPEG decoding with and without draft (DCT-scaled) mode,
and the collector at several HSCAN page sizes. Same pictures, model, private prefix
and clean-up as ``bench.run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import compile_bytecode
from bench.run import (
    RESULTS_DIR,
    Bench,
    Plan,
    machine,
    measure_local,
    measure_pipeline,
    setup,
    use_private_prefix,
)

log = logging.getLogger("bench.tune")


@dataclass(frozen=True)
class Config:
    """One worker configuration: environment overrides and ``celery worker`` options."""

    name: str
    why: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    app: str = "worker"  # the ``celery -A`` module


def configs(cores: int) -> list[Config]:
    """The configurations compared, for a machine with ``cores`` cores."""
    all_cores = str(cores)
    return [
        Config("default", "the project's defaults (prefork, one process per core)"),
        Config("c1", "one process using every core for TensorFlow", args=("-c", "1")),
        Config(
            "tf-oversubscribed",
            f"{cores} TensorFlow threads in each of {cores} processes",
            env={"GENDERSCORE_TF_THREADS": all_cores},
        ),
        Config(
            "batch16", "small forward passes (less memory)", env={"GENDERSCORE_BATCH_SIZE": "16"}
        ),
        Config("batch32", "smaller forward passes", env={"GENDERSCORE_BATCH_SIZE": "32"}),
        Config("batch128", "larger forward passes", env={"GENDERSCORE_BATCH_SIZE": "128"}),
        Config(
            "prefetch2",
            "2 batches prefetched per process, one in the pool",
            env={"GENDERSCORE_PREFETCH_BATCHES": "2", "GENDERSCORE_POOL_BATCHES": "1"},
        ),
        Config(
            "prefetch6",
            "6 batches prefetched per process",
            env={"GENDERSCORE_PREFETCH_BATCHES": "6"},
        ),
        Config(
            "pool1",
            "one batch per pool process at a time (Celery's -O fair)",
            env={"GENDERSCORE_POOL_BATCHES": "1"},
        ),
        Config(
            "pool2-prefetch4",
            "the next batch in hand and 4 batches prefetched per process",
            env={"GENDERSCORE_PREFETCH_BATCHES": "4"},
        ),
        Config(
            "flush0.1",
            "partial batches flushed after 0.1 s",
            env={"GENDERSCORE_FLUSH_INTERVAL": "0.1"},
        ),
        Config(
            "flush2", "partial batches flushed after 2 s", env={"GENDERSCORE_FLUSH_INTERVAL": "2"}
        ),
        Config(
            "events-message",
            "three Celery task events per picture (Flower's per-task "
            "view), instead of one summary per batch",
            env={"GENDERSCORE_TASK_EVENTS": "message"},
        ),
        Config(
            "kombu-transport",
            "kombu's stock Redis transport (one BRPOP per message)",
            app="bench.plainkombu",
        ),
        Config(
            "solo",
            "no pool: the main process scores",
            env={"GENDERSCORE_TF_THREADS": all_cores},
            args=("--pool", "solo"),
        ),
        Config(
            "threads",
            f"a thread pool of {cores}, one TensorFlow runtime",
            env={"GENDERSCORE_TF_THREADS": all_cores},
            args=("--pool", "threads"),
        ),
    ]


@contextmanager
def _no_draft() -> Iterator[None]:
    """Pillow's JPEG draft mode switched off (full-size decode, then resize)."""
    from PIL import JpegImagePlugin

    original = JpegImagePlugin.JpegImageFile.draft

    def full_size(self: Any, mode: str | None, size: tuple[int, int] | None) -> None:
        return None

    JpegImagePlugin.JpegImageFile.draft = full_size  # type: ignore[method-assign]
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = original  # type: ignore[method-assign]


def decode_cost(bench: Bench, count: int = 300) -> dict[str, Any]:
    """Milliseconds per picture for ``worker.preprocess.preprocess``, with and without draft."""
    from bench.pictures import userids
    from worker.preprocess import preprocess

    size = (bench.plan.model_size, bench.plan.model_size)
    names = userids(bench.pictures, min(count, bench.pictures.count))
    blobs = [(bench.pictures.folder / f"{uid}.jpg").read_bytes() for uid in names]

    def per_picture() -> float:
        started = time.perf_counter()
        for data in blobs:
            preprocess(data, size)
        return (time.perf_counter() - started) / len(blobs) * 1000

    with_draft = min(per_picture() for _ in range(2))
    with _no_draft():
        without = min(per_picture() for _ in range(2))
    return {
        "pictures": len(blobs),
        "ms_with_draft": round(with_draft, 2),
        "ms_without_draft": round(without, 2),
        "speedup": round(without / with_draft, 2),
    }


def inference_cost(bench: Bench, batches: tuple[int, ...], threads: tuple[int, ...]) -> list[Any]:
    """Forward-pass cost and peak RSS by batch size and TensorFlow threads."""
    from bench.infer import measure_in_subprocess
    from bench.procs import bench_env

    return [
        measure_in_subprocess(bench.model, batch, count, bench_env())
        for count in threads
        for batch in batches
    ]


def tune(
    bench: Bench,
    chosen: list[Config],
    repeat: int,
    collect_n: int,
    batches: tuple[int, ...],
    threads: tuple[int, ...],
    pipeline_only: bool = False,
) -> dict[str, Any]:
    """Measure every chosen configuration; return the results."""
    from bench.micro import collect

    n = bench.plan.n
    locals_ = [measure_local(bench, n) for _ in range(repeat)]
    rates = [r["images_per_s"] for r in locals_]
    local = locals_[rates.index(sorted(rates)[len(rates) // 2])] | {"images_per_s_runs": rates}
    log.info("(a) local: %s img/s", rates)
    # Round by round, every configuration in each: a drift of the machine's speed
    # spreads over all of them instead of favouring the first.
    by_config: dict[str, list[dict[str, Any]]] = {config.name: [] for config in chosen}
    for attempt in range(repeat):
        for config in chosen:
            log.info("--- %s (%d/%d): %s", config.name, attempt + 1, repeat, config.why)
            try:
                by_config[config.name].append(
                    measure_pipeline(
                        bench,
                        n,
                        f"tune-{config.name}-{attempt}",
                        config.env,
                        config.args,
                        config.app,
                    )
                )
            except RuntimeError as exc:
                log.error("%s failed: %s", config.name, str(exc)[-500:])
    rows = []
    for config in chosen:
        runs = by_config[config.name]
        row: dict[str, Any] = {
            "name": config.name,
            "why": config.why,
            "env": config.env,
            "args": list(config.args),
        }
        if runs:
            rates = [r["images_per_s"] for r in runs]
            best = runs[rates.index(max(rates))]
            row |= {
                "images_per_s": round(statistics.median(rates), 1),
                "images_per_s_runs": rates,
                "b_over_a": round(statistics.median(rates) / local["images_per_s"], 3),
                "max_worker_rss_mb": max(max(r["worker_peak_rss_mb"].values()) for r in runs),
                "model_loads": best["model_loads"],
                "worker_processes": best["worker_processes"],
                "collect_seconds": best["collect_seconds"],
                # CPU ms per picture by component (the median run's figures)
                "cpu_ms": statistics_by_key([r["cpu"]["ms_per_picture"] for r in runs]),
                "idle_share": statistics.median(r["cpu"]["idle_share"] for r in runs),
            }
        else:
            row["failed"] = True
        rows.append(row)
    if pipeline_only:
        return {"local": local, "configs": rows}
    return {
        "local": local,
        "configs": rows,
        "inference": inference_cost(bench, batches, threads),
        "decode": decode_cost(bench),
        "collect_pages": collect(bench.client, collect_n, scan_counts=(100, 1000, 5000, 20000)),
    }


def statistics_by_key(rows: list[dict[str, float]]) -> dict[str, float]:
    """The median of each key over several runs."""
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def table(results: dict[str, Any]) -> str:
    """The tuning results as a plain-text table."""
    m, local = results["machine"], results["local"]
    lines = [
        f"genderscore tuning {results['started_at']}: {m['cpu']}, {m['cores']} cores, load "
        f"average {m['load_average_at_start'][0]} at start; {local['pictures']:,} pictures, "
        f"model {results['model_input']}",
        f"(a) score --local: {local['images_per_s']} img/s",
        "",
        f"{'config':<18} {'img/s':>7} {'(b)/(a)':>8} {'RSS MB':>7} {'loads':>6} "
        f"{'main ms':>7} {'redis ms':>8} {'idle':>5}  settings",
    ]
    for row in results["configs"]:
        settings = (
            " ".join(
                [
                    *(f"{k.removeprefix('GENDERSCORE_')}={v}" for k, v in row["env"].items()),
                    *row["args"],
                ]
            )
            or "-"
        )
        if row.get("failed"):
            lines.append(f"{row['name']:<18} {'failed':>7}  {settings}")
            continue
        loads = f"{row['model_loads']}/{row['worker_processes']}"
        lines.append(
            f"{row['name']:<18} {row['images_per_s']:>7.1f} {row['b_over_a']:>8.2f} "
            f"{row['max_worker_rss_mb']:>7.0f} {loads:>6} "
            f"{row['cpu_ms']['worker_main']:>7.3f} {row['cpu_ms']['redis_server']:>8.3f} "
            f"{row['idle_share']:>5.1%}  {settings}"
        )
    if "inference" not in results:
        return "\n".join(lines)
    lines += [
        "",
        f"{'forward pass':<18} {'ms/picture':>10} {'peak RSS MB':>12}  "
        "(TensorFlow alone / with the model)",
    ]
    for row in results["inference"]:
        lines.append(
            f"{'batch ' + str(row['batch']) + ', ' + str(row['threads']) + ' thr':<18} "
            f"{row['ms_per_picture']:>10.2f} {row['peak_rss_mb']:>12.0f}  "
            f"({row['rss_mb_tensorflow']:.0f} / {row['rss_mb_model']:.0f})"
        )
    d, c = results["decode"], results["collect_pages"]
    pages = ", ".join(f"{k}: {v} s" for k, v in c["seconds_by_scan_count"].items())
    lines += [
        "",
        f"decode+resize to {results['model_input']}: {d['ms_with_draft']} ms/picture with "
        f"JPEG draft, {d['ms_without_draft']} without (x{d['speedup']})",
        f"collect {c['predictions']:,} predictions by HSCAN page size: {pages}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the tuning measurements; print the table, write the JSON."""
    cores = len(os.sched_getaffinity(0))
    known = {c.name: c for c in configs(cores)}
    parser = argparse.ArgumentParser(
        prog="python -m bench.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=1000, help="pictures per run (1000)")
    parser.add_argument(
        "--configs", default=",".join(known), help=f"which configurations ({','.join(known)})"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    parser.add_argument(
        "--collect",
        type=int,
        default=200_000,
        help="predictions for the HSCAN page-size runs (200,000)",
    )
    parser.add_argument(
        "--batches",
        default="16,32,64,128",
        help="batch sizes for the forward-pass measurements (16,32,64,128)",
    )
    parser.add_argument(
        "--tf-threads",
        default=",".join(map(str, sorted({1, cores}))),
        help="TensorFlow threads for the forward-pass measurements "
        f"({','.join(map(str, sorted({1, cores})))})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny pictures and model")
    parser.add_argument(
        "--pipeline-only",
        action="store_true",
        help="only (a) and the configurations: no forward-pass, decoding or collect measurements",
    )
    parser.add_argument("--workdir", type=Path, help="keep pictures and model here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.configs.split(",")) - known.keys()
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}: choose from {sorted(known)}")
    chosen = [known[name] for name in args.configs.split(",")]
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    base = Plan.quick() if args.quick else Plan()
    plan = Plan(
        n=args.n,
        sizes=(args.n,),
        naive_n=1,
        model_size=base.model_size,
        model_kernel=base.model_kernel,
        profile=base.profile,
    )
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="genderscore-tune-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = use_private_prefix(workdir, plan)
    compile_bytecode()

    from bench.micro import delete_prefix
    from worker.results import connect

    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    client = connect()
    try:
        info = machine()
        bench = setup(plan, workdir)
        results = {
            "started_at": started_at,
            "machine": info,
            "key_prefix": prefix,
            "model_input": f"{plan.model_size}x{plan.model_size}",
        }
        batches = tuple(int(b) for b in args.batches.split(",") if b)
        threads = tuple(int(t) for t in args.tf_threads.split(",") if t)
        results |= tune(
            bench, chosen, args.repeat, args.collect, batches, threads, args.pipeline_only
        )
    finally:
        delete_prefix(client, f"{prefix}:")
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"tune-{started_at.replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
