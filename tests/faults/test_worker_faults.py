"""Pictures and bugs that kill or trip a worker, Redis faults, bad settings: all bounded.

(Worker and broker faults on both brokers: ``test_broker_faults.py``.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultEnv
from tests.helpers import make_pictures, userid

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


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


def test_worker_refuses_time_limit_above_visibility(world: FaultEnv) -> None:
    env = dict(world.env, GENDERSCORE_SCORE_TIME_LIMIT="1000", GENDERSCORE_VISIBILITY_TIMEOUT="900")
    from tests.helpers import worker_env

    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "score"],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "must be below" in proc.stderr + proc.stdout


def test_a_bug_in_scoring_is_bounded_like_a_crash(world: FaultEnv, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 20, size=(48, 48))
    (folder / "explode-1.jpg").write_bytes((folder / f"{userid(0)}.jpg").read_bytes())
    run_id = "bug-run"
    with world.worker("w", app="tests.poison"):
        world.cli("score", str(folder), "--run-id", run_id)
        world.wait_settled(run_id, 21, timeout=120)
    pred, err = world.settled(run_id)
    assert len(pred) == 20 and list(err) == ["explode-1"]
    assert err["explode-1"].startswith("worker_crash: the worker process died 3 times")
    # Blamed once with its batch, then alone twice; the fourth delivery records it.
    assert world.deliveries(run_id)["explode-1"] == 4


def test_redis_faults_are_requeues_not_deaths(world: FaultEnv, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 10, size=(48, 48))
    (folder / "flaky-1.jpg").write_bytes((folder / f"{userid(0)}.jpg").read_bytes())
    run_id = "flaky-run"
    with world.worker("w", app="tests.poison"):
        world.cli("score", str(folder), "--run-id", run_id)
        world.wait_settled(run_id, 11, timeout=120)
    pred, err = world.settled(run_id)
    assert not err and len(pred) == 11  # four refused writes did not make it a crash
    tries = world.client.hgetall(world.keys(run_id).tries)
    assert int(world.client.get(f"{world.prefix}:flaky-faults") or 0) >= 5
    assert not any(key.endswith(":deaths") for key in tries), tries


def test_unexpected_failures_of_a_picture_or_model_are_typed_errors(
    world: FaultEnv, tmp_path: Path
) -> None:
    import json

    folder = tmp_path / "pictures"
    make_pictures(folder, 9, size=(48, 48))
    model = tmp_path / "model" / "m.h5"
    model.parent.mkdir()
    model.write_bytes(Path(world.env["GENDERSCORE_MODEL"]).read_bytes())
    model.with_suffix(".json").write_text(
        Path(world.env["GENDERSCORE_MODEL"]).with_suffix(".json").read_text()
    )
    world.cli("score", str(folder), "--run-id", "loop-run")
    # Swapped after enqueue: a picture becomes a link to itself, another a FIFO.
    (folder / f"{userid(3)}.jpg").unlink()
    os.symlink(f"{userid(3)}.jpg", folder / f"{userid(3)}.jpg")
    (folder / f"{userid(4)}.jpg").unlink()
    os.mkfifo(folder / f"{userid(4)}.jpg")
    world.cli("score", str(folder), "--run-id", "meta-run", "--model", str(model))
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["threshold"] = "abc"  # broken after the run was enqueued
    model.with_suffix(".json").write_text(json.dumps(meta))
    with world.worker("w"):
        world.wait_settled("loop-run", 9, timeout=60)
        world.wait_settled("meta-run", 7, timeout=60)  # the producer skipped the link and FIFO
    pred, err = world.settled("loop-run")
    assert len(pred) == 7
    assert {u: e.split(":")[0] for u, e in err.items()} == {
        userid(3): "not_a_file",
        userid(4): "not_a_file",
    }
    pred, err = world.settled("meta-run")
    assert not pred and len(err) == 7
    assert all(e.startswith("model_error: invalid model metadata") for e in err.values())
    for run_id in ("loop-run", "meta-run"):
        assert set(world.deliveries(run_id).values()) == {1}, run_id


def test_a_userid_twice_in_one_batch_is_worked_on_once(world: FaultEnv, tmp_path: Path) -> None:
    from worker.broker import ScoreTask, publish_scores
    from worker.celery import app
    from worker.model import check_model_file

    folder = tmp_path / "pictures"
    (uid,) = make_pictures(folder, 1, size=(48, 48))
    model = Path(world.env["GENDERSCORE_MODEL"])
    world.cli("score", str(folder), "--run-id", "twice-run")
    task = ScoreTask(
        "twice-run", uid, str(folder / f"{uid}.jpg"), str(model), check_model_file(model)
    )
    with world.patched():
        publish_scores(app, [task, task, task])  # three more copies, one batch
    with world.worker("w"):
        world.wait_settled("twice-run", 1, timeout=60)
        deadline = time.monotonic() + 30
        while world.client.llen(f"{world.prefix}:score") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    tries = world.client.hgetall(world.keys("twice-run").tries)
    assert not any(key.endswith((":deaths", ":solo")) for key in tries), tries
    assert world.client.llen(f"{world.prefix}:score") == 0
    assert world.client.hlen(f"{world.prefix}:unacked") == 0
