"""Where the CPU goes during a measured run: per component, read from ``/proc``.

``CpuMeter(worker_pid, redis_pid)`` takes a snapshot at ``start()`` and at ``stop()``:
CPU seconds (user + system) of the worker's main process, of its pool processes
(children of the main process, as listed at each snapshot), of the Redis server, and
the machine's idle share (``/proc/stat``, all cores). The producer's own CPU comes from
its ``wait4`` rusage (``bench.procs.CommandResult.cpu_seconds``). ``per_picture()``
turns the differences into milliseconds per picture.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import children

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), printed with every figure."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_jiffies() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values[:8])


@dataclass
class Snapshot:
    """CPU seconds of each component, and the machine's jiffies, at one moment."""

    main: float
    pool: dict[int, float]
    redis: float
    idle: int
    total: int


@dataclass
class CpuMeter:
    """CPU per component between ``start()`` and ``stop()``."""

    worker_pid: int | None
    redis_pid: int | None
    snapshots: list[Snapshot] = field(default_factory=list)

    def snapshot(self) -> Snapshot:
        """The components' CPU seconds now."""
        idle, total = machine_jiffies()
        pool = {pid: process_cpu_seconds(pid) for pid in children(self.worker_pid or -1)}
        return Snapshot(
            process_cpu_seconds(self.worker_pid) if self.worker_pid else 0.0,
            pool,
            process_cpu_seconds(self.redis_pid) if self.redis_pid else 0.0,
            idle,
            total,
        )

    def start(self) -> None:
        """The first snapshot."""
        self.snapshots = [self.snapshot()]

    def stop(self) -> None:
        """The second snapshot."""
        self.snapshots.append(self.snapshot())

    def per_picture(self, pictures: int, producer_seconds: float = 0.0) -> dict[str, Any]:
        """Milliseconds of CPU per picture by component, and the machine's idle share."""
        first, last = self.snapshots[0], self.snapshots[-1]
        # A pool process present at both snapshots counts its difference; one started
        # in between counts all its CPU (it started at 0).
        pool = sum(cpu - first.pool.get(pid, 0.0) for pid, cpu in last.pool.items())
        seconds = {
            "worker_main": last.main - first.main,
            "pool_processes": pool,
            "redis_server": last.redis - first.redis,
            "producer": producer_seconds,
        }
        total = last.total - first.total
        per_picture = {k: round(1000 * v / max(1, pictures), 3) for k, v in seconds.items()}
        return {
            "ms_per_picture": per_picture,
            "cpu_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "idle_share": round((last.idle - first.idle) / total, 3) if total else None,
        }


def redis_server_pid(client: Any) -> int | None:
    """The Redis server's pid, when it runs on this machine (``INFO server``)."""
    try:
        pid = int(client.info("server")["process_id"])
    except Exception:  # another host, or INFO refused
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


class StartWhenRunExists:
    """A block that starts ``meter`` when ``key`` (a run's metadata) appears in Redis and
    stops it when the block ends: the measured span is the run's, from its creation, not
    the producer's start-up. Polls every 5 ms on a thread; with no meter, does nothing."""

    def __init__(self, client: Any, key: str, meter: CpuMeter | None) -> None:
        self.client, self.key, self.meter = client, key, meter
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        assert self.meter is not None
        while not self.done.is_set():
            if self.client.exists(self.key):
                self.meter.start()
                return
            self.done.wait(0.005)

    def __enter__(self) -> StartWhenRunExists:
        if self.meter is not None:
            self.meter.snapshots = []
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.meter is None:
            return
        self.done.set()
        self.thread.join()
        if self.meter.snapshots:
            self.meter.stop()
