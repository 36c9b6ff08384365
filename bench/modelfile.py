"""The benchmark's model: the origin's architecture, trained, with its compiled twin.

Run as ``python -m bench.modelfile PATH [--size 150] [--kernel 4]`` so that TensorFlow
is imported in a short-lived process, never in the benchmark driver. The weights do not
change the speed, but they decide whether a lower precision of the twin agrees with
Keras: an untrained model's outputs all sit near 0.5, a trained one's spread like a
real model's. So the model is trained (``training.train.train``, which also exports
and checks the twin on its validation split) on bench-style pictures
(``bench.pictures``, another seed than the measured ones) labelled by what they show
(a warm or a cool face-like ellipse) with ``LABEL_NOISE`` of the labels flipped, so
that, like the origin's model (0.62 to 0.75 accuracy), it is unsure of many pictures.
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


TRAIN_SEED = 7  # pictures of another seed than the measured ones (bench.run uses 1)
LABEL_NOISE = 0.10


def label_pictures(folder: Path, size: tuple[int, int], seed: int = 0) -> dict[str, str]:
    """userid -> gender: the warmer half of the pictures' centres is "female", then
    ``LABEL_NOISE`` of the labels are flipped (seeded)."""
    import numpy as np

    from worker.preprocess import preprocess_file

    files = sorted(folder.glob("*.jpg"))
    warmth = []
    for path in files:
        array = preprocess_file(path, size)
        h, w = array.shape[:2]
        centre = array[h * 3 // 10 : h * 7 // 10, w * 3 // 10 : w * 7 // 10]
        warmth.append(float((centre[..., 0] - centre[..., 2]).mean()))
    median = float(np.median(warmth))
    flips = np.random.default_rng(seed).random(len(files)) < LABEL_NOISE
    return {
        path.stem: "female" if (value > median) != bool(flip) else "male"
        for path, value, flip in zip(files, warmth, flips, strict=True)
    }


def make(path: Path, size: int, kernel: int, count: int, epochs: int, profile: str) -> None:
    """Train ``training.network.make_model(size, kernel)`` on ``count`` labelled bench
    pictures; ``train`` writes the .h5, its metadata and its twin."""
    from bench.pictures import generate
    from training.sample import write_profiles
    from training.train import train

    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent / f"{path.stem}-pictures"
    generate(folder, count, seed=TRAIN_SEED, profile=profile)
    labels = path.parent / f"{path.stem}-labels.csv"
    write_profiles(labels, label_pictures(folder, (size, size)))
    result = train(
        folder,
        labels,
        path,
        epochs=epochs,
        image_size=size,
        kernel_size=kernel,
        val_fraction=0.25,
        patience=2,
        seed=0,
    )
    log.info("benchmark model: %s", result.summary())


def make_in_subprocess(
    path: Path, size: int, kernel: int, count: int, epochs: int, profile: str, env: dict[str, str]
) -> None:
    """``make`` in a child process (keeps TensorFlow out of the caller); a model already
    there with its metadata and its twin is reused (a run that failed at the export left
    the .h5 and its metadata: made again, or every later run would measure Keras alone)."""
    if all(path.with_suffix(suffix).exists() for suffix in (".h5", ".json", ".onnx")):
        return
    cmd = [
        sys.executable,
        "-m",
        "bench.modelfile",
        str(path),
        "--size",
        str(size),
        "--kernel",
        str(kernel),
        "--count",
        str(count),
        "--epochs",
        str(epochs),
        "--profile",
        profile,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"could not build the benchmark model:\n{proc.stderr[-3000:]}")


def main() -> None:
    """Command line: build one model file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--kernel", type=int, default=4)
    parser.add_argument("--count", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--profile", default="full")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)
    make(args.path, args.size, args.kernel, args.count, args.epochs, args.profile)


if __name__ == "__main__":
    main()
