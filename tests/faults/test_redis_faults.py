"""Redis killed without persistence, or full, mid-run: the run ends complete, nothing evicted.

(Redis restarted with AOF and unreachable for 30 s, on both brokers: test_broker_faults.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultEnv, redis_server
from tests.helpers import make_pictures, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _world(tmp_path: Path, port: int, model: Path, **overrides: str) -> FaultEnv:
    return FaultEnv(tmp_path, f"redis://127.0.0.1:{port}/0", model, **overrides)


def _wait_progress(world: FaultEnv, run_id: str, count: int, timeout: float = 60) -> None:
    keys = world.keys(run_id)
    wait_until(lambda: world.client.hlen(keys.pred) >= count, timeout, f"{count} predictions")


def test_redis_lost_without_persistence_then_reconcile(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 400, size=(48, 48))
    data = tmp_path / "redis-data"
    with redis_server(data) as (port, server):
        world = _world(tmp_path, port, tiny_model)
        with world.worker("w"):
            world.cli("score", str(folder), "--run-id", "lost-run")
            _wait_progress(world, "lost-run", 80)
            server.kill()  # kill -9: no persistence, everything is gone
            server.wait(10)
            with redis_server(data, port):
                time.sleep(1)
                out = tmp_path / "out.csv"
                short = world.cli("collect", "lost-run", "--out", str(out), check=False)
                assert short.returncode != 0 and not out.exists()
                # Redis lost the run: collect says so, it does not write a short CSV.
                assert "lost-run" in short.stderr and "Traceback" not in short.stderr
                fixed = world.cli(
                    "reconcile",
                    "lost-run",
                    "--recreate",
                    "--images",
                    str(folder),
                    "--model",
                    str(tiny_model),
                )
                assert int(fixed.stdout.strip()) >= 300
                world.wait_settled("lost-run", 400, timeout=120)
                world.cli("collect", "lost-run", "--out", str(out))
    userids = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert len(userids) == len(set(userids)) == 400


def test_redis_full_fails_loudly_and_evicts_nothing(tmp_path: Path, tiny_model: Path) -> None:
    """Redis full: writes are refused, never evicted; the worker stops loudly (kombu cannot
    ack: "Unrecoverable error"), its messages stay in Redis, and once memory is freed a
    restarted worker (compose's restart policy) completes the run."""
    folder = tmp_path / "pictures"
    make_pictures(folder, 300, size=(48, 48))
    with redis_server(tmp_path / "redis-data", None, "--maxmemory-policy", "noeviction") as (
        port,
        _,
    ):
        world = _world(tmp_path, port, tiny_model)
        client = world.client
        with world.worker("w") as first:
            world.cli("score", str(folder), "--run-id", "full-run")
            _wait_progress(world, "full-run", 30)
            client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 4096)
            refused = world.cli("score", str(folder), "--run-id", "full-run-2", check=False)
            assert refused.returncode != 0 and "Redis is full (OOM" in refused.stderr
            # The worker cannot acknowledge on a full Redis: it stops, loudly.
            returncode = first.wait(60)
            assert returncode != 0, "the worker kept running on a full Redis"
            pred, err = world.settled("full-run")
            assert len(pred) < 300, "Redis did not fill up"
        assert "OutOfMemoryError" in world.logs[-1].read_text(errors="replace")
        client.config_set("maxmemory", 0)
        with world.worker("w2"):
            world.wait_settled("full-run", 300, timeout=150)
        pred, err = world.settled("full-run")
        assert len(pred) == 300 and not err
        assert int(client.info("stats")["evicted_keys"]) == 0
