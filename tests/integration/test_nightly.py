"""Nightly scoring: a real beat (two of them) and a real worker, on a schedule of seconds.

The first run scores the whole folder; the second scores only the pictures added or
changed in between; a run that finds nothing new ends with a log line and no CSV; the
second scheduler sends its tasks too, but the lock lets only one run at a time.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from producer.nightly import (
    ScheduleError,
    acquire_lock,
    beat_schedule,
    lock_holder,
    parse_schedule,
    release_lock,
)
from tests.helpers import (
    ROOT,
    background,
    jpeg_bytes,
    make_pictures,
    picture,
    userid,
    worker_env,
)
from worker.keys import nightly_lock, runs_index
from worker.settings import Settings

BASE = 7_000_000  # userids no other test of the session uses
TICK = 2  # seconds between beat's nightly tasks


def test_schedule_is_cron_or_seconds() -> None:
    cron = parse_schedule("0 2 * * *")
    assert cron.hour == {2} and cron.minute == {0}  # type: ignore[union-attr]
    assert parse_schedule("30").run_every.total_seconds() == 30  # type: ignore[union-attr]
    for bad in ("every night", "61 2 * * *", "0 2 * *", "-1"):
        with pytest.raises(ScheduleError, match="GENDERSCORE_NIGHTLY_CRON"):
            parse_schedule(bad)


def test_no_entry_without_a_folder(tmp_path: Path) -> None:
    assert beat_schedule(Settings(nightly_images_dir=None)) == {}
    (entry,) = beat_schedule(
        Settings(
            nightly_images_dir=tmp_path,
            nightly_cron="15 3 * * *",
            nightly_output_dir=tmp_path / "out",
        )
    ).values()
    assert entry["task"] == "genderscore.nightly"
    assert entry["kwargs"]["images_dir"] == str(tmp_path)
    assert entry["kwargs"]["output_dir"] == str(tmp_path / "out")


def test_lock_is_exclusive_and_resumable(redis_client: redis.Redis) -> None:
    key = nightly_lock()
    redis_client.delete(key)
    try:
        assert acquire_lock(redis_client, "run-a", "task-1", 60) == "run-a"
        assert 0 < redis_client.ttl(key) <= 60
        assert acquire_lock(redis_client, "run-b", "task-2", 60) is None
        # The same task, redelivered, resumes its run.
        assert acquire_lock(redis_client, "run-c", "task-1", 60) == "run-a"
        assert lock_holder(redis_client) == "run-a"
        assert not release_lock(redis_client, "run-a", "task-2")
        assert release_lock(redis_client, "run-a", "task-1")
        assert lock_holder(redis_client) is None
    finally:
        redis_client.delete(key)


def test_beat_refuses_a_bad_schedule(tmp_path: Path) -> None:
    env = worker_env(
        {"GENDERSCORE_NIGHTLY_CRON": "every night", "GENDERSCORE_NIGHTLY_IMAGES_DIR": str(tmp_path)}
    )
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "beat", "-s", str(tmp_path / "s")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "GENDERSCORE_NIGHTLY_CRON='every night'" in result.stdout + result.stderr


@contextmanager
def celery_beat(env: dict[str, str], folder: Path) -> Iterator[Path]:
    """``celery -A worker beat`` as a subprocess with its own schedule file; yields its log."""
    folder.mkdir(parents=True)
    log = folder / "beat.log"
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "beat",
        "--loglevel=INFO",
        "-s",
        str(folder / "schedule"),
    ]
    with background(cmd, log, env):
        yield log


def dated_csvs(out: Path) -> list[Path]:
    """The nightly CSVs, oldest first (run ids sort by time)."""
    return sorted(p for p in out.glob("*-nightly-*.csv") if not p.name.endswith(".errors.csv"))


def wait_for(condition: object, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def csv_userids(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return [row["userid"] for row in csv.DictReader(handle)]


@contextmanager
def holding_lock(client: redis.Redis) -> Iterator[None]:
    """Hold the nightly lock, as a run would: no nightly run starts meanwhile."""
    wait_for(
        lambda: client.set(nightly_lock(), "test holder", nx=True, ex=60),
        "the nightly lock",
        timeout=60,
    )
    try:
        yield
    finally:
        if client.get(nightly_lock()) == "test holder":
            client.delete(nightly_lock())


@pytest.mark.slow
def test_nightly_runs_score_only_new_pictures_once(
    score_worker: Path,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    pictures, out = tmp_path / "pictures", tmp_path / "out"
    # Userids of its own: the session's other runs fill the same model's scored index.
    first = make_pictures(pictures, 10, start=BASE)
    (pictures / "notes.txt").write_text("not a picture")
    env = {
        "GENDERSCORE_NIGHTLY_CRON": str(TICK),
        "GENDERSCORE_NIGHTLY_IMAGES_DIR": str(pictures),
        "GENDERSCORE_NIGHTLY_OUTPUT_DIR": str(out),
        "GENDERSCORE_NIGHTLY_POLL_SECONDS": "0.5",
        "GENDERSCORE_NIGHTLY_LOCK_SECONDS": "120",
    }
    redis_client.delete(nightly_lock())
    runs_before = set(redis_client.zrange(runs_index(), 0, -1))
    # The session's worker runs the nightly tasks: beat sends the folders as arguments.
    log_start = score_worker.stat().st_size

    def worker_log() -> str:
        with score_worker.open("rb") as handle:
            handle.seek(log_start)
            return handle.read().decode(errors="replace")

    with (
        celery_beat(env, tmp_path / "beat1") as beat1,
        celery_beat(env, tmp_path / "beat2") as beat2,
    ):
        wait_for(lambda: len(dated_csvs(out)) >= 1, "the first nightly CSV", timeout=240)
        (first_csv,) = dated_csvs(out)
        assert csv_userids(first_csv) == sorted(first)
        assert (out / "latest.csv").read_bytes() == first_csv.read_bytes()
        assert (out / "latest.errors.csv").read_text() == "userid,error\n"

        # Change the folder under the lock, so that no run sees half of the change.
        with holding_lock(redis_client):
            added = make_pictures(pictures, 3, start=BASE + 10)
            changed = userid(BASE + 2)
            (pictures / f"{changed}.jpg").write_bytes(jpeg_bytes(picture("male", seed=999)))
        wait_for(lambda: len(dated_csvs(out)) == 2, "the second nightly CSV")
        second_csv = dated_csvs(out)[1]
        assert csv_userids(second_csv) == sorted([*added, changed])
        assert (out / "latest.csv").read_bytes() == second_csv.read_bytes()

        # With nothing new, later runs end quietly: a log line, no run, no CSV.
        def nothing_new() -> int:
            return worker_log().count("nightly: nothing new in")

        seen = nothing_new()
        wait_for(lambda: nothing_new() >= seen + 2, "two nightly runs with nothing new", timeout=60)
        assert len(dated_csvs(out)) == 2

    nightly_runs = [
        r
        for r in redis_client.zrange(runs_index(), 0, -1)
        if r not in runs_before and r.startswith("nightly-")
    ]
    assert len(nightly_runs) == 2
    # Both schedulers sent tasks; those that met a held lock were skipped.
    for beat_log in (beat1, beat2):
        assert beat_log.read_text().count("Sending due task genderscore-nightly") >= 3
    log = worker_log()
    assert "still holds the lock; this one is skipped" in log
    assert log.count("nightly: run nightly-") >= 4  # 2 started, 2 done
    assert "Traceback" not in log
