"""Processes of a benchmark: real Celery workers and CLI commands, with their memory.

A worker is ``python -m celery -A <app> worker -Q <queue>`` in its own session (so the
whole group can be stopped); its pool processes are found through ``/proc`` and their
peak resident memory read from ``VmHWM`` before the worker stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
START_MARK = "bench-clirun-start"
LOADED_MARK = "bench-clirun-model-loaded"
PEAK_MARK = "bench-clirun-peak-kib"


def compile_bytecode() -> None:
    """Compile the project's modules to bytecode, as an installed package has them.

    ``pip install .`` (the image) writes them; an editable install writes them at first
    import, unless ``PYTHONDONTWRITEBYTECODE`` is set (as on some CI machines): then
    every command compiled the project's modules again, about 0.3 s of CPU per start
    on a 2-core Xeon, and the benchmark counted it as the producer's.
    """
    import compileall

    for package in ("worker", "producer", "training", "bench"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (the benchmark's settings) plus ``extra``."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def memory_kib(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak resident) and ``VmRSS`` of a process, in KiB."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def kib_to_mb(kib: float) -> float:
    """KiB (what /proc and getrusage report) to MB, the issue's unit."""
    return round(kib * 1024 / 1e6, 1)


@dataclass
class WorkerProcess:
    """A running Celery worker and where its log goes."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    name: str

    def pool_pids(self) -> list[int]:
        """The worker's pool processes (none for ``--pool solo`` or ``threads``)."""
        return children(self.proc.pid)

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak resident memory (MB, 10^6 bytes) of the main process and each pool process."""
        pids = {f"main:{self.proc.pid}": self.proc.pid}
        pids.update({f"pool:{pid}": pid for pid in self.pool_pids()})
        return {name: kib_to_mb(memory_kib(pid).get("VmHWM", 0)) for name, pid in pids.items()}

    def log_text(self) -> str:
        """The worker's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def celery_worker(
    app: str,
    queue: str,
    name: str,
    env: dict[str, str],
    log_path: Path,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 120,
) -> Iterator[WorkerProcess]:
    """Run ``celery -A app worker -Q queue`` until the block ends (SIGTERM, then SIGKILL)."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queue,
        "--loglevel=INFO",
        "-n",
        f"{name}-{os.getpid()}@%h",
        *extra_args,
    ]
    log.info("starting worker: %s", " ".join(cmd[2:]))
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(proc, log_path, name)
    try:
        _wait_ready(worker, ready_timeout)
        yield worker
    finally:
        stop(proc)


def _wait_ready(worker: WorkerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(
                f"worker {worker.name} exited with {worker.proc.returncode}:\n"
                f"{worker.log_text()[-3000:]}"
            )
        if " ready." in worker.log_text():
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"worker {worker.name} not ready after {timeout:.0f}s:\n{worker.log_text()[-3000:]}"
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Stop a process group: SIGTERM (warm shutdown), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        log.warning("worker %d ignored SIGTERM for %.0fs: killing it", proc.pid, timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass(frozen=True)
class CommandResult:
    """A finished ``genderscore`` command run through ``bench.clirun``."""

    returncode: int
    stdout: str
    stderr: str
    started: float  # unix time the command began (after Python's own start-up)
    model_loaded: float  # unix time ``score --local`` had its model loaded (else nan)
    ended: float  # unix time the process exited
    max_rss_mb: float  # its peak resident memory
    cpu_seconds: float = 0.0  # its CPU (user + system), from wait4, threads included
    startup_cpu_seconds: float = 0.0  # of which before the command began (imports)

    def check(self, what: str) -> CommandResult:
        """Raise with the command's output when it failed."""
        if self.returncode != 0:
            raise RuntimeError(f"{what} failed ({self.returncode}):\n{self.stderr[-3000:]}")
        return self


def genderscore(
    args: Sequence[str], env: dict[str, str], workdir: Path, timeout: float
) -> CommandResult:
    """Run ``genderscore ARGS`` (as ``python -m bench.clirun ARGS``) and wait for it."""
    stdout_path, stderr_path = workdir / "cmd.stdout", workdir / "cmd.stderr"
    log.info("running: genderscore %s", " ".join(args))
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clirun", *args], cwd=ROOT, env=env, stdout=out, stderr=err
        )
    deadline = time.monotonic() + timeout
    while True:
        # wait4 reaps the child and reports its CPU, its threads' included.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = stderr_path.read_text(errors="replace")
    marks = {
        line.split()[0]: [float(x) for x in line.split()[1:]]
        for line in stderr.splitlines()
        if line.startswith((START_MARK, LOADED_MARK, PEAK_MARK))
    }
    start = marks.get(START_MARK, [float("nan"), 0.0])
    # The command's own VmHWM as it exits. wait4's ru_maxrss is no substitute: Linux
    # starts an exec'd child's figure at the RSS of the process that spawned it (this
    # benchmark, 440 MB after the S3 upload), so it is used only for a command that was
    # killed before it could say (an upper bound).
    peak_kib = marks.get(PEAK_MARK, [float(usage.ru_maxrss)])[0]
    return CommandResult(
        proc.returncode,
        stdout_path.read_text(errors="replace"),
        stderr,
        start[0],
        marks.get(LOADED_MARK, [float("nan")])[0],
        ended,
        kib_to_mb(peak_kib),
        usage.ru_utime + usage.ru_stime,
        start[1] if len(start) > 1 else 0.0,
    )
