"""The collector: byte-identical twice, and a kill mid-write leaves the previous CSV intact."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultEnv

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def _fake_run(world: FaultEnv, run_id: str, count: int) -> None:
    keys = world.keys(run_id)
    client = world.client
    client.hset(
        keys.meta,
        mapping={
            "total": count,
            "sealed": 1,
            "model_sha": "cd" * 32,
            "started_at": "1764000000",
            "finished_at": "1764000100",
        },
    )
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        uid = f"{n:032x}"
        pipe.hset(keys.ids, uid, f"{uid}.jpg")
        if n % 50 == 7:
            pipe.hset(keys.err, uid, "corrupt: truncated")
        else:
            pipe.hset(keys.pred, uid, f"{(n % 997) / 997:.6f}|{'f' if n % 2 else 'm'}|1764000050")
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()


def test_collect_twice_is_byte_identical(world: FaultEnv, tmp_path: Path) -> None:
    _fake_run(world, "twice", 3000)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    world.cli("collect", "twice", "--out", str(first))
    world.cli("collect", "twice", "--out", str(second))
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a.errors.csv").read_bytes() == (tmp_path / "b.errors.csv").read_bytes()
    assert (
        len(first.read_text().splitlines())
        - 1
        + len((tmp_path / "a.errors.csv").read_text().splitlines())
        - 1
        == 3000
    )


def test_collect_killed_mid_write_keeps_the_previous_csv(world: FaultEnv, tmp_path: Path) -> None:
    _fake_run(world, "big", 300_000)
    complete = tmp_path / "complete.csv"
    world.cli("collect", "big", "--out", str(complete))
    new = complete.read_bytes()
    out = tmp_path / "out.csv"
    out.write_text("userid,gender,p_female,model,scored_at\nprevious,female,0.9,x,y\n")
    before = out.read_bytes()
    killed = 0
    for delay in (0.5, 1.5, 2.5, 3.5):
        proc = world.cli_background("collect", "big", "--out", str(out))
        time.sleep(delay)
        if proc.poll() is not None:
            break  # finished before the kill: later delays would too
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        now = out.read_bytes()
        if now == new:
            break  # the kill landed after the new CSV was in place: later ones would too
        assert now == before, f"killed after {delay}s: the CSV is neither the old nor the new"
        killed += 1
    assert killed >= 1, "collect finished before any kill; raise the run size"
