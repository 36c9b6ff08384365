"""Test helpers: generated pictures with a learnable signal, tiny models, a real worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from training.sample import jpeg_bytes, make_pictures, picture, userid, write_profiles

__all__ = ["jpeg_bytes", "make_pictures", "picture", "userid", "write_profiles"]

ROOT = Path(__file__).resolve().parents[1]


def make_model_file(
    path: Path, image_size: int = 32, seed: int = 0, positive_class: str = "female"
) -> Path:
    """A small untrained genderscore CNN saved with metadata (random but fixed weights)."""
    from training.network import make_model
    from worker.model import save_model

    model = make_model(image_size=image_size, kernel_size=3, seed=seed)
    save_model(
        model,
        path,
        {
            "positive_class": positive_class,
            "threshold": 0.5,
            "preprocessing": "rgb-exif-bilinear-div255-v2",
        },
    )
    return path


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker subprocess: this test session's settings."""
    env = {k: v for k, v in os.environ.items()}
    env.update(extra or {})
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextmanager
def celery_worker(
    queues: str = "score",
    concurrency: int = 2,
    extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
    name: str = "w1",
    extra_args: Sequence[str] = (),
    app: str = "worker",
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``celery -A <app> worker`` as a real subprocess until the block ends."""
    env = worker_env(extra_env)
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--loglevel=INFO",
        "-n",
        f"{name}-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        *extra_args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_ready(proc, log_path)
        yield proc
    finally:
        stop_process(proc)
        if log_path:
            log_file.close()  # type: ignore[union-attr]


@contextmanager
def background(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess of this session's environment, logging to ``log``, stopped at the end."""
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=worker_env(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop_process(proc)


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path | None, timeout: float = 60) -> None:
    """Wait until the worker logs 'ready' (or fail with its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace") if log_path else ""
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{text[-3000:]}")
        if log_path and " ready." in log_path.read_text(errors="replace"):
            return
        if not log_path:
            time.sleep(5)
            return
        time.sleep(0.2)
    raise RuntimeError("worker not ready in time")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    """Stop a process: ``sig`` to the main process only (as ``docker stop`` or systemd
    do: a Celery worker's pool processes must not get it), then SIGKILL to the whole
    group if it lingers."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
    if proc.poll() is None:
        proc.wait(10)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail (never just go on) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def run_setup(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python3 docker/setup-secrets.py --root ROOT ARGS`` with only ``env`` set."""
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "setup-secrets.py"), "--root", str(root), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
