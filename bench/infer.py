"""Forward-pass cost and peak memory of one batch size, in a fresh process.

``python -m bench.infer MODEL --batch 64 --threads 1`` loads the model as a worker
does (``worker.model.load_bundle``), runs ``predict_on_batch`` on random inputs and
prints one JSON line: milliseconds per picture and the process's peak RSS (VmHWM) after
TensorFlow's import, after the load and after the passes. A fresh process per batch size
keeps each peak its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, kib_to_mb, memory_kib


def measure(model: Path, batch: int, threads: int, passes: int) -> dict[str, Any]:
    """Time ``passes`` forward passes of ``batch`` pictures after one warm-up pass."""
    import numpy as np

    from worker.model import configure_tensorflow, load_bundle

    configure_tensorflow(threads)
    after_import = memory_kib(os.getpid())["VmHWM"]
    bundle = load_bundle(model, tf_threads=threads)
    after_load = memory_kib(os.getpid())["VmHWM"]
    height, width = bundle.input_size
    inputs = np.random.default_rng(0).random((batch, height, width, 3), dtype=np.float32)
    bundle.model.predict_on_batch(inputs)
    started = time.perf_counter()
    for _ in range(passes):
        bundle.model.predict_on_batch(inputs)
    seconds = time.perf_counter() - started
    return {
        "batch": batch, "threads": threads,
        "ms_per_picture": round(seconds / (passes * batch) * 1000, 2),
        "rss_mb_tensorflow": kib_to_mb(after_import), "rss_mb_model": kib_to_mb(after_load),
        "peak_rss_mb": kib_to_mb(memory_kib(os.getpid())["VmHWM"]),
    }


def measure_in_subprocess(model: Path, batch: int, threads: int, env: dict[str, str],
                          pictures: int = 512) -> dict[str, Any]:
    """``measure`` in a fresh process, about ``pictures`` pictures' worth of passes."""
    cmd = [sys.executable, "-m", "bench.infer", str(model), "--batch", str(batch),
           "--threads", str(threads), "--passes", str(max(2, pictures // batch))]
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
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(json.dumps(measure(args.model, args.batch, args.threads, args.passes)))


if __name__ == "__main__":
    main()
