"""An untrained origin-architecture model with metadata, for timing (weights do not matter).

Run as ``python -m bench.modelfile PATH [--size 150] [--kernel 4]`` so that TensorFlow
is imported in a short-lived process, never in the benchmark driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def make(path: Path, size: int, kernel: int, seed: int = 0) -> None:
    """Build ``training.network.make_model(size, kernel)`` and save it with metadata."""
    from training.network import make_model
    from worker.model import save_model
    from worker.preprocess import PREPROCESSING_ID

    model = make_model(image_size=size, kernel_size=kernel, seed=seed)
    save_model(model, path, {
        "positive_class": "female", "threshold": 0.5, "preprocessing": PREPROCESSING_ID,
        "note": "untrained: genderscore benchmark",
    })


def make_in_subprocess(path: Path, size: int, kernel: int, env: dict[str, str]) -> None:
    """``make`` in a child process (keeps TensorFlow out of the caller)."""
    if path.exists() and path.with_suffix(".json").exists():
        return
    cmd = [sys.executable, "-m", "bench.modelfile", str(path), "--size", str(size),
           "--kernel", str(kernel)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"could not build the benchmark model:\n{proc.stderr[-3000:]}")


def main() -> None:
    """Command line: build one model file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--kernel", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)
    make(args.path, args.size, args.kernel)


if __name__ == "__main__":
    main()
