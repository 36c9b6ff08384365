"""The peer, side by side: Ray Data's batch-inference recipe on the same pictures and model.

``python -m bench.run --peers`` calls ``run_ray(folder, model, out)`` after (b). The
recipe is Ray Data's documented one for offline batch inference: a dataset of the
pictures, ``map_batches`` with a callable class (one model per actor), one actor per
core (``concurrency=cores``, ``num_cpus=1``), the project's batch size, and the result
written to CSV. The actor uses genderscore's own preprocessing and model loading
(``worker.scoring.prepare`` and ``infer``, ``worker.model.load_bundle``), so the only
difference from (b) is the machinery around them.

Measured: pictures per second from the dataset's creation to the CSV written. Ray
starts first (``ray.init``, timed apart) and a first dataset of one batch per actor
runs before the timed one, but each dataset execution starts its own actor pool, so
the timed figure includes the actors' start and model load: Ray Data keeps no warm
actors between datasets, and a nightly job runs one dataset. The table says so. And
the peak total PSS of Ray's processes and the driver, sampled every 0.2 s from
``/proc/<pid>/smaps_rollup``. Ray is an optional extra (``pip install
'genderscore[bench-peers]'``), never needed by the product or its tests.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Scorer:
    """Ray Data's callable class: one model per actor, a batch of paths in, rows out."""

    def __init__(self, model: str, batch_size: int) -> None:
        from worker.model import load_bundle

        self.bundle = load_bundle(Path(model), tf_threads=1)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from worker.scoring import Failed, infer, prepare

        items = list(zip(batch["userid"], batch["path"], strict=True))
        prepared = [prepare(self.bundle, (str(u), Path(str(p)))) for u, p in items]
        outcomes = infer(self.bundle, [str(u) for u, _ in items], prepared, self.batch_size)
        rows: dict[str, list[Any]] = {"userid": [], "p_female": [], "gender": [], "error": []}
        for outcome in outcomes:
            rows["userid"].append(outcome.userid)
            failed = isinstance(outcome, Failed)
            rows["p_female"].append(None if failed else round(outcome.p_female, 6))
            rows["gender"].append(None if failed else outcome.gender)
            rows["error"].append(outcome.reason if failed else None)
        return rows


def pss_kib(pid: int) -> int:
    """Proportional set size of one process, KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_pids() -> list[int]:
    """This process and every process of a Ray session (raylet, GCS, workers, ...)."""
    found = [os.getpid()]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray" in cmdline and (
            b"ray::" in cmdline
            or b"/ray/" in cmdline
            or b"raylet" in cmdline
            or b"gcs_server" in cmdline
        ):
            found.append(int(entry))
    return found


class PeakPss:
    """Samples the total PSS of Ray's processes on a thread; ``peak_mb`` when stopped."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_kib = interval, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, sum(pss_kib(pid) for pid in ray_pids()))
            self.done.wait(self.interval)

    def __enter__(self) -> PeakPss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        """The peak, MB (10^6 bytes)."""
        return round(self.peak_kib * 1024 / 1e6, 1)


def run_ray(folder: Path, model: Path, out_dir: Path, batch_size: int) -> dict[str, Any]:
    """Ray Data's recipe on every ``<userid>.jpg`` of ``folder``: figures and the CSV."""
    import ray

    cores = len(os.sched_getaffinity(0))
    items = [{"userid": p.stem, "path": str(p)} for p in sorted(folder.glob("*.jpg"))]
    started = time.perf_counter()
    with PeakPss() as memory:
        ray.init(
            num_cpus=cores,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
        )
        ray_start = time.perf_counter() - started
        try:

            def run(rows: list[dict[str, str]], target: Path) -> float:
                began = time.perf_counter()
                ray.data.from_items(rows).map_batches(
                    Scorer,
                    fn_constructor_args=(str(model), batch_size),
                    batch_size=batch_size,
                    concurrency=cores,
                    num_cpus=1,
                ).write_csv(str(target))
                return time.perf_counter() - began

            warmup = run(items[: batch_size * cores], out_dir / "ray-warmup")
            seconds = run(items, out_dir / "ray")
        finally:
            ray.shutdown()
    rows = _read_rows(out_dir / "ray")
    if sorted(rows) != sorted(item["userid"] for item in items):
        raise RuntimeError(
            f"ray: {len(rows)} rows ({len(set(rows))} distinct) for {len(items)} pictures"
        )
    return {
        "pictures": len(items),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(items) / seconds, 1),
        "warmup": {"pictures": min(len(items), batch_size * cores), "seconds": round(warmup, 2)},
        "ray_init_seconds": round(ray_start, 2),
        "actors": cores,
        "peak_pss_mb": memory.peak_mb,
        "ray": _version(),
    }


def _read_rows(folder: Path) -> list[str]:
    userids: list[str] = []
    for part in sorted(folder.glob("*.csv")):
        with part.open(newline="") as handle:
            userids += [row["userid"] for row in csv.DictReader(handle)]
    return userids


def _version() -> str:
    from importlib import metadata

    return metadata.version("ray")
