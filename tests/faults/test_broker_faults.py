"""Faults on each broker (Redis and RabbitMQ): the run completes with workers alone.

Each test kills or stops something mid-run, then only watches: the workers (and the
broker) must bring the run to exactly one row per userid, none twice. The repairs the
product made (userids re-published after Redis lost their messages in transit) are
counted; RabbitMQ must need none.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.faults.conftest import BrokerWorld
from tests.helpers import make_pictures, userid, wait_until
from worker.settings import settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _complete_csv(world: BrokerWorld, run_id: str, count: int, tmp_path: Path) -> None:
    """Collect the run: exactly the userids 0..count-1, one row each."""
    out = tmp_path / f"{run_id}.csv"
    world.cli("collect", run_id, "--out", str(out))
    userids = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert len(userids) == len(set(userids)) == count
    assert sorted(userids) == sorted(userid(n) for n in range(count))


def _check_repairs(world: BrokerWorld, run_id: str) -> int:
    repairs = world.repairs(run_id)
    if world.broker == "rabbitmq":
        assert repairs == 0, "RabbitMQ lost nothing in transit: there was nothing to repair"
    return repairs


def test_worker_sigkill_with_1000_in_flight_then_a_new_worker(
    broker_world: BrokerWorld, tmp_path: Path
) -> None:
    world = broker_world
    folder = tmp_path / "pictures"
    make_pictures(folder, 1000, size=(48, 48))
    run_id = "sigkill-run"
    with world.worker("victim") as victim:
        world.cli("score", str(folder), "--run-id", run_id)
        keys = world.keys(run_id)
        wait_until(lambda: world.client.hlen(keys.pred) >= 150, 90, "150 predictions")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
    pred, err = world.settled(run_id)
    assert len(pred) + len(err) < 1000, "the worker finished before it was killed"
    with world.worker("rescuer"):
        # Redis: reserved messages come back after the visibility timeout (40 s here);
        # RabbitMQ returns them as soon as the killed worker's connection closes.
        world.wait_settled(run_id, 1000, timeout=150)
    _complete_csv(world, run_id, 1000, tmp_path)
    deliveries = world.deliveries(run_id)
    extra = sum(deliveries.values()) - 1000
    prefetch = settings.batch_size * settings.prefetch_batches * 2  # x concurrency
    assert 0 <= extra <= prefetch + _check_repairs(world, run_id), extra


def test_pool_process_killed_its_batch_runs_again(
    broker_world: BrokerWorld, tmp_path: Path
) -> None:
    from tests.poison import sleepy_pids

    world = broker_world
    folder = tmp_path / "pictures"
    make_pictures(folder, 300, size=(48, 48))
    sleepy = f"sleepy-{uuid.uuid4().hex[:8]}"
    (folder / f"{sleepy}.jpg").write_bytes((folder / f"{userid(0)}.jpg").read_bytes())
    pids = sleepy_pids(sleepy)
    run_id = "childkill-run"
    try:
        with world.worker("w", app="tests.poison") as worker:
            world.cli("score", str(folder), "--run-id", run_id)
            wait_until(lambda: pids.exists() and pids.read_text().strip(), 90, "a busy process")
            busy = int(pids.read_text().split()[0])
            assert busy in _children(worker.pid)
            os.kill(busy, signal.SIGKILL)  # mid-batch: its batch holds the sleepy picture
            world.wait_settled(run_id, 301, timeout=120)
            assert worker.poll() is None
        pred, err = world.settled(run_id)
        assert len(pred) == 301 and not err
        # The batch was lost (its userids were blamed once) and ran again elsewhere.
        tries = world.client.hgetall(world.keys(run_id).tries)
        assert int(tries[f"{sleepy}:deaths"]) == 1
        runs = [int(p) for p in pids.read_text().split()]
        assert len(runs) == 2 and runs[1] != busy
        _check_repairs(world, run_id)
    finally:
        pids.unlink(missing_ok=True)


def test_warm_shutdown_mid_run_then_restart(broker_world: BrokerWorld, tmp_path: Path) -> None:
    world = broker_world
    folder = tmp_path / "pictures"
    make_pictures(folder, 800, size=(48, 48))
    run_id = "sigterm-run"
    limit = float(world.env["GENDERSCORE_SCORE_TIME_LIMIT"])
    with world.worker("first") as first:
        world.cli("score", str(folder), "--run-id", run_id)
        keys = world.keys(run_id)
        wait_until(lambda: world.client.hlen(keys.pred) >= 100, 90, "100 predictions")
        started = time.monotonic()
        os.kill(first.pid, signal.SIGTERM)  # the main process only, as docker stop does
        # A warm shutdown finishes the batches in hand and exits by itself, cleanly,
        # within the batch time limit: no SIGKILL is needed.
        returncode = first.wait(limit + 10)
        took = time.monotonic() - started
    assert returncode == 0, f"the worker exited with {returncode}"
    assert took < limit, f"the warm shutdown took {took:.1f}s"
    pred, _ = world.settled(run_id)
    assert len(pred) < 800
    with world.worker("second"):
        world.wait_settled(run_id, 800, timeout=90)
    _complete_csv(world, run_id, 800, tmp_path)
    # Messages whose ack was lost in the shutdown may come back; the worker must see
    # they are settled and not score them again.
    tries = {k: int(v) for k, v in world.client.hgetall(world.keys(run_id).tries).items()}
    delivered = sum(v for k, v in tries.items() if ":" not in k)
    skipped = sum(v for k, v in tries.items() if k.endswith(":skipped"))
    assert delivered - skipped == 800, "a picture was scored twice"
    _check_repairs(world, run_id)


def _queued(world: BrokerWorld) -> dict[str, int]:
    """The broker's queue lengths, as ``genderscore status --json`` reports them."""
    queues: dict[str, int] = json.loads(world.cli("status", "--json").stdout)["queues"]
    return queues


def test_warm_shutdown_finishes_a_batch_handed_over_but_not_yet_taken(
    broker_world: BrokerWorld, tmp_path: Path
) -> None:
    """SIGTERM while batches are in their pool process's pipe, not yet taken: the process
    runs them anyway, so the warm shutdown waits for their outcomes and acknowledges them.

    Celery's pool forgot such a batch at shutdown: its messages came back although its
    outcomes were recorded, and the pool process waited 30 s at exit for the main
    process to read the result it sent (worker.pool). The process holds its next batch
    too (GENDERSCORE_POOL_BATCHES): handed over while it could take none, it finishes.
    """
    world = broker_world
    count = settings.batch_size * settings.pool_batches  # the batches one process holds
    warm, folder = tmp_path / "warm", tmp_path / "pictures"
    make_pictures(warm, 4, size=(48, 48))
    make_pictures(folder, count, size=(48, 48))
    run_id = "handed-over"
    with world.worker("first", concurrency=1) as worker:
        world.cli("score", str(warm), "--run-id", "warm-up")  # the model is loaded
        world.wait_settled("warm-up", 4, timeout=90)
        time.sleep(1)  # the last warm-up batch's reply reaches the main process
        (process,) = _children(worker.pid)
        os.kill(process, signal.SIGSTOP)  # it cannot take the next batch
        try:
            world.cli("score", str(folder), "--run-id", run_id)
            wait_until(lambda: _queued(world)["score"] == 0, 30, "the batch delivered")
            time.sleep(1)  # flushed to the pool (0.2 s) and written to the pipe
            os.kill(worker.pid, signal.SIGTERM)
            started = time.monotonic()
            time.sleep(1)  # the main process flushes its pool
        finally:
            os.kill(process, signal.SIGCONT)
        returncode = worker.wait(60)
        took = time.monotonic() - started
    assert returncode == 0
    assert took < 15, f"the warm shutdown took {took:.1f}s"
    pred, err = world.settled(run_id)
    assert len(pred) == count and not err
    queues = _queued(world)
    assert queues["score"] == 0, "the batch's messages came back: they were not acknowledged"
    assert queues.get("unacked (score)", 0) == 0


@pytest.mark.parametrize("down_for", [0, 30], ids=["restart", "outage-30s"])
def test_broker_restart_or_outage_mid_run(
    broker_world: BrokerWorld, tmp_path: Path, down_for: float
) -> None:
    world = broker_world
    folder = tmp_path / "pictures"
    make_pictures(folder, 600, size=(48, 48))
    run_id = "broker-run"
    with world.worker("w") as worker:
        # Someone follows the run with --wait: it rides out the restart too.
        follower = world.cli_background(
            "score", str(folder), "--run-id", run_id, "--wait", "--out",
            str(tmp_path / "out.csv"), "--timeout", "300",
        )  # fmt: skip
        keys = world.keys(run_id)
        wait_until(lambda: world.client.hlen(keys.pred) >= 100, 90, "100 predictions")
        world.restart_broker(down_for)
        back = time.monotonic()
        wait_until(lambda: world.client.hlen(keys.pred) >= 500, 90, "consuming again")
        consuming_again_in = time.monotonic() - back
        world.wait_settled(run_id, 600, timeout=150)
        _, stderr = follower.communicate(timeout=120)
        assert follower.returncode == 0, stderr[-2000:]
        assert worker.poll() is None, "the worker died with its broker"
    pred, err = world.settled(run_id)
    assert len(pred) == 600 and not err, list(err.values())[:3]  # no fault became an error
    assert consuming_again_in < 60
    _complete_csv(world, run_id, 600, tmp_path)
    _check_repairs(world, run_id)
