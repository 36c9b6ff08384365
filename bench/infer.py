"""Forward-pass cost and peak memory of one batch size, in a fresh process.

``python -m bench.infer MODEL --batch 64 --threads 1 [--runtime keras] [--precision f32]``
loads the model as a worker does (``worker.model.load_bundle``: the twin under the
default runtime, Keras under ``--runtime keras``), runs the scoring path
(``worker.scoring.predict_pixels``: uint8 pixels, scaled for Keras, scaled inside the
twin's graph) on random pictures and prints one JSON line: milliseconds per picture
(median of ``--rounds`` rounds; the best too), the runtime and precision served, and
the process's peak RSS (VmHWM) before the load (``rss_mb_tensorflow``: with TensorFlow
imported for Keras), after the load and after the passes. A fresh process per
measurement keeps each peak its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, kib_to_mb, memory_kib


def measure(model: Path, batch: int, threads: int, passes: int, rounds: int = 3) -> dict[str, Any]:
    """Time ``rounds`` x ``passes`` forward passes of ``batch`` pictures after a warm-up."""
    import numpy as np

    from worker.model import configure_tensorflow, load_bundle
    from worker.scoring import predict_pixels
    from worker.settings import settings

    if settings.runtime == "keras":
        configure_tensorflow(threads)
    after_import = memory_kib(os.getpid())["VmHWM"]
    started = time.perf_counter()
    bundle = load_bundle(model, tf_threads=threads)
    height, width = bundle.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), np.uint8)
    predict_pixels(bundle.model, pixels, batch)
    load_seconds = time.perf_counter() - started
    after_load = memory_kib(os.getpid())["VmHWM"]
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(passes):
            predict_pixels(bundle.model, pixels, batch)
        times.append((time.perf_counter() - started) / (passes * batch) * 1000)
    return {
        "batch": batch,
        "threads": threads,
        "runtime": bundle.runtime,
        "precision": bundle.precision,
        "ms_per_picture": round(statistics.median(times), 2),
        "best_ms_per_picture": round(min(times), 2),
        "load_and_first_batch_s": round(load_seconds, 2),
        "rss_mb_tensorflow": kib_to_mb(after_import),
        "rss_mb_model": kib_to_mb(after_load),
        "peak_rss_mb": kib_to_mb(memory_kib(os.getpid())["VmHWM"]),
        "tensorflow_loaded": "tensorflow" in sys.modules,
    }


def measure_in_subprocess(
    model: Path, batch: int, threads: int, env: dict[str, str], pictures: int = 512
) -> dict[str, Any]:
    """``measure`` in a fresh process, about ``pictures`` pictures' worth of passes."""
    cmd = [
        sys.executable,
        "-m",
        "bench.infer",
        str(model),
        "--batch",
        str(batch),
        "--threads",
        str(threads),
        "--passes",
        str(max(2, pictures // batch)),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.infer failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Command line: one measurement, printed as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--runtime",
        choices=("auto", "keras", "openvino"),
        help="GENDERSCORE_RUNTIME for this measurement",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "f32", "bf16", "int8"),
        help="GENDERSCORE_PRECISION for this measurement",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.runtime:  # before worker.settings reads the environment
        os.environ["GENDERSCORE_RUNTIME"] = args.runtime
    if args.precision:
        os.environ["GENDERSCORE_PRECISION"] = args.precision
    print(json.dumps(measure(args.model, args.batch, args.threads, args.passes, args.rounds)))


if __name__ == "__main__":
    main()
