"""Workers killed, pool processes killed, poison pictures, warm shutdown: nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultEnv
from tests.helpers import make_pictures, stop_process, userid
from worker.settings import settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_worker_sigkill_then_new_worker_loses_nothing(world: FaultEnv, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 1000, size=(48, 48))
    run_id = "sigkill-run"
    with world.worker("victim") as victim:
        world.cli("score", str(folder), "--run-id", run_id)
        keys = world.keys(run_id)
        deadline = time.monotonic() + 60
        while world.client.hlen(keys.pred) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
    pred, err = world.settled(run_id)
    assert len(pred) + len(err) < 1000, "the worker finished before it was killed"
    with world.worker("rescuer"):
        # The killed worker's reserved messages come back after the visibility timeout.
        world.wait_settled(run_id, 1000, timeout=120)
        out = tmp_path / "out.csv"
        world.cli("collect", run_id, "--out", str(out))
    rows = out.read_text().splitlines()[1:]
    userids = [r.split(",")[0] for r in rows]
    assert len(userids) == len(set(userids)) == 1000
    assert sorted(userids) == sorted(userid(n) for n in range(1000))
    deliveries = world.deliveries(run_id)
    extra = sum(deliveries.values()) - 1000
    prefetch = settings.batch_size * settings.prefetch_batches * 2  # x concurrency
    assert 0 <= extra <= prefetch, extra


def test_pool_process_killed_its_batch_runs_again(world: FaultEnv, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 600, size=(48, 48))
    run_id = "childkill-run"
    with world.worker("w") as worker:
        world.cli("score", str(folder), "--run-id", run_id)
        keys = world.keys(run_id)
        deadline = time.monotonic() + 60
        while world.client.hlen(keys.pred) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        children = _children(worker.pid)
        assert children
        os.kill(children[0], signal.SIGKILL)
        world.wait_settled(run_id, 600, timeout=120)
        assert worker.poll() is None
    pred, err = world.settled(run_id)
    assert len(pred) == 600 and not err


def test_poison_picture_becomes_an_error_after_bounded_deliveries(
    world: FaultEnv, tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 60, size=(48, 48))
    (folder / "poison-pill.jpg").write_bytes((folder / f"{userid(0)}.jpg").read_bytes())
    run_id = "poison-run"
    # A generous time limit: each death costs a new pool process a TensorFlow start.
    with world.worker(
        "w",
        app="tests.poison",
        GENDERSCORE_SCORE_TIME_LIMIT="60",
        GENDERSCORE_VISIBILITY_TIMEOUT="120",
    ):
        out = tmp_path / "out.csv"
        world.cli(
            "score",
            str(folder),
            "--run-id",
            run_id,
            "--wait",
            "--out",
            str(out),
            "--timeout",
            "150",
            timeout=180,
        )
    pred, err = world.settled(run_id)
    assert len(pred) == 60
    assert list(err) == ["poison-pill"] and err["poison-pill"].startswith("worker_crash:")
    deliveries = world.deliveries(run_id)
    # The first (batch) delivery, max_deliveries solo attempts that died, the one recording it.
    assert deliveries["poison-pill"] <= 1 + 3 + 1
    assert "poison-pill,worker_crash" in (tmp_path / "out.errors.csv").read_text()


def test_warm_shutdown_mid_run_then_restart(world: FaultEnv, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 800, size=(48, 48))
    run_id = "sigterm-run"
    with world.worker("first") as first:
        world.cli("score", str(folder), "--run-id", run_id)
        keys = world.keys(run_id)
        deadline = time.monotonic() + 60
        while world.client.hlen(keys.pred) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        stop_process(first, signal.SIGTERM, timeout=30)
        assert first.returncode is not None
        assert time.monotonic() - started < 30 + 5  # within the task time limit
    pred, _ = world.settled(run_id)
    assert len(pred) < 800
    with world.worker("second"):
        world.wait_settled(run_id, 800, timeout=60)
    pred, err = world.settled(run_id)
    assert len(pred) == 800 and not err
    # Messages whose ack was lost in the shutdown may come back; the worker must see
    # they are settled and not score them again.
    tries = {k: int(v) for k, v in world.client.hgetall(world.keys(run_id).tries).items()}
    delivered = sum(v for k, v in tries.items() if ":" not in k)
    skipped = sum(v for k, v in tries.items() if k.endswith(":skipped"))
    assert delivered - skipped == 800, "a picture was scored twice"


def test_worker_refuses_time_limit_above_visibility(world: FaultEnv) -> None:
    env = dict(world.env, GENDERSCORE_SCORE_TIME_LIMIT="1000", GENDERSCORE_VISIBILITY_TIMEOUT="900")
    from tests.helpers import worker_env

    proc = subprocess.run(
        ["python", "-m", "celery", "-A", "worker", "worker", "-Q", "score"],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "must be below" in proc.stderr + proc.stdout
