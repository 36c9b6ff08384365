"""Nightly scoring: a real beat (two of them) and a real worker, on a schedule of seconds.

The first run scores the whole folder; the second scores only the pictures added or
changed in between; a run that finds nothing new ends with a log line and no CSV; the
second scheduler sends its tasks too, but the lock lets only one run at a time.
"""

from __future__ import annotations

import csv
import os
import re
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
from tests.faults.conftest import FaultEnv
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
    # The worker reads its folders from its own settings: no path travels in a message.
    assert "kwargs" not in entry and "args" not in entry


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


def night_written(out: Path, nights: int) -> bool:
    """Whether ``nights`` dated CSVs exist and ``latest.csv`` is a copy of the newest.

    The dated CSV is written first and ``latest.csv`` copied from it after, so a reader
    can see the new dated CSV beside the previous night's ``latest.csv`` for a moment.
    """
    dated = dated_csvs(out)
    latest = out / "latest.csv"
    return (
        len(dated) >= nights
        and latest.exists()
        and latest.read_bytes() == dated[nights - 1].read_bytes()
    )


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
def holding_lock(client: redis.Redis, key: str) -> Iterator[None]:
    """Hold the nightly lock, as a run would: no nightly run starts meanwhile."""
    wait_for(
        lambda: client.set(key, "test holder", nx=True, ex=60),
        "the nightly lock",
        timeout=60,
    )
    try:
        yield
    finally:
        if client.get(key) == "test holder":
            client.delete(key)


@pytest.mark.slow
def test_nightly_runs_score_only_new_pictures_once(
    redis_client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    pictures, out = tmp_path / "pictures", tmp_path / "out"
    first = make_pictures(pictures, 10, start=BASE)
    (pictures / "notes.txt").write_text("not a picture")
    # A world of its own (key prefix, queues): its worker is the one with nightly settings.
    world = FaultEnv(
        tmp_path,
        os.environ["GENDERSCORE_REDIS_URL"],
        tiny_model,
        nightly_cron=TICK,
        nightly_images_dir=pictures,
        nightly_output_dir=out,
        nightly_poll_seconds=0.5,
        nightly_lock_seconds=120,
    )
    client = world.client
    with world.patched():
        lock_key, runs_key = nightly_lock(), runs_index()
    try:
        with (
            world.worker("nightly") as _,
            celery_beat(world.env, tmp_path / "beat1") as beat1,
            celery_beat(world.env, tmp_path / "beat2") as beat2,
        ):
            worker_log = world.logs[-1]
            wait_for(lambda: night_written(out, 1), "the first nightly CSV", timeout=240)
            (first_csv,) = dated_csvs(out)
            assert csv_userids(first_csv) == sorted(first)
            assert (out / "latest.csv").read_bytes() == first_csv.read_bytes()
            assert (out / "latest.errors.csv").read_text() == "userid,error\n"

            # Change the folder under the lock, so that no run sees half of the change.
            with holding_lock(client, lock_key):
                added = make_pictures(pictures, 3, start=BASE + 10)
                changed = userid(BASE + 2)
                (pictures / f"{changed}.jpg").write_bytes(jpeg_bytes(picture("male", seed=999)))
            wait_for(lambda: night_written(out, 2), "the second nightly CSV")
            second_csv = dated_csvs(out)[1]
            assert csv_userids(second_csv) == sorted([*added, changed])
            assert len(dated_csvs(out)) == 2

            # With nothing new, later runs end quietly: a log line, no run, no CSV.
            def nothing_new() -> int:
                return worker_log.read_text(errors="replace").count("nightly: nothing new in")

            seen = nothing_new()
            wait_for(lambda: nothing_new() >= seen + 2, "two nightly runs with nothing new", 60)
            assert len(dated_csvs(out)) == 2
            success = float(client.get(f"{world.prefix}:nightly:last_success") or 0)
            assert time.time() - 30 < success <= time.time()

        nightly_runs = [r for r in client.zrange(runs_key, 0, -1) if r.startswith("nightly-")]
        assert len(nightly_runs) == 2
        # Both schedulers sent tasks; those that met a held lock were skipped.
        for beat_log in (beat1, beat2):
            assert beat_log.read_text().count("Sending due task genderscore-nightly") >= 3
        log = worker_log.read_text(errors="replace")
        assert "still holds the lock; this one is skipped" in log
        assert log.count("nightly: run nightly-") >= 4  # 2 started, 2 done
        assert "Traceback" not in log
    finally:
        world.cleanup()


def test_pictures_scored_after_the_deadline_are_in_the_next_nights_csv(
    redis_client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    from producer.nightly import NightlyConfig, finish_nightly, start_nightly
    from worker.celery import app

    pictures, out = tmp_path / "pictures", tmp_path / "out"
    late = make_pictures(pictures, 8, start=BASE + 100)
    world = FaultEnv(tmp_path, os.environ["GENDERSCORE_REDIS_URL"], tiny_model)
    config = NightlyConfig(pictures, out, tiny_model, 120, 0.5, 0.5)
    try:
        with world.patched():
            # Night 1: no worker consumes yet; the finisher reaches its deadline.
            night1 = start_nightly(app, world.client, config, "task-1")
            assert night1.status == "started" and night1.enqueued == 8
            assert night1.run_id is not None
            written = finish_nightly(world.client, night1.run_id, "task-1", out, deadline=0)
            assert written is not None and written.scored == 0 and written.missing == 8
            failure = world.client.hgetall(f"{world.prefix}:nightly:last_failure")
            assert "8 pending pictures" in failure["reason"]
        # The worker scores night 1's messages after its CSV was written.
        with world.worker("late"):
            world.wait_settled(night1.run_id, 8, timeout=120)
        with world.patched():
            # Night 2: nothing new to score, but night 1's late results are delivered.
            night2 = start_nightly(app, world.client, config, "task-2")
            assert (night2.status, night2.delivered_late) == ("nothing_new", 8)
            assert csv_userids(out / "latest.csv") == sorted(late)
            # Night 3: nothing is owed any more.
            night3 = start_nightly(app, world.client, config, "task-3")
            assert (night3.status, night3.delivered_late) == ("nothing_new", 0)
        assert len(dated_csvs(out)) == 2
    finally:
        world.cleanup()


def test_nightly_source_that_shrank_is_refused(
    redis_client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    from producer.nightly import NightlyConfig, SourceRefused, start_nightly
    from worker.celery import app

    pictures = tmp_path / "pictures"
    make_pictures(pictures, 10, start=BASE + 200)
    world = FaultEnv(tmp_path, os.environ["GENDERSCORE_REDIS_URL"], tiny_model)
    config = NightlyConfig(pictures, tmp_path / "out", tiny_model, 120, 0.5, 0.5)
    try:
        with world.patched():
            world.client.set(f"{world.prefix}:nightly:count", 25)
            with pytest.raises(SourceRefused, match="shrank from 25 to 10"):
                start_nightly(app, world.client, config, "task-1")
            failure = world.client.hgetall(f"{world.prefix}:nightly:last_failure")
            assert "shrank from 25 to 10" in failure["reason"]
            assert not world.client.exists(f"{world.prefix}:lock:nightly")  # released
            for path in pictures.iterdir():
                path.unlink()
            with pytest.raises(SourceRefused, match="holds no picture"):
                start_nightly(app, world.client, config, "task-2")
    finally:
        world.cleanup()


def test_nightly_finish_takes_no_path_from_its_message(
    score_worker: Path, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from worker.celery import app

    target = tmp_path / "pwn"
    log_start = score_worker.stat().st_size
    climb = f"x/../../../..{target}"
    hostile = [
        (climb, "task", 0.0),  # a run id that climbs out of the output folder
        (climb, "task", str(tmp_path), 0.0, 0.5),  # and an output folder in the message
        ("nightly-20260101-000000-abcd", "task", str(tmp_path), 0.0, 0.5),
        ("nightly-20260101-000000-abcd", "../../etc", 0.0),
    ]
    for args in hostile:
        app.send_task("genderscore.nightly_finish", args=args)

    def refused() -> int:
        with score_worker.open("rb") as handle:
            handle.seek(log_start)
            text = handle.read().decode(errors="replace")
        return len(re.findall(r"nightly_finish\[[^\]]+\] raised unexpected", text))

    wait_for(lambda: refused() >= len(hostile), "the worker to refuse every message", 60)
    assert not list(tmp_path.glob("**/*.csv")) and not Path(f"{target}.csv").exists()
