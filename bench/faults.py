"""Soak: SIGKILL a scoring worker at a random moment of a run, start a new one, repeat.

``python -m bench.faults [--rounds 20] [--pictures 500] [--brokers redis,rabbitmq]``

For each broker, one world of its own (a private Redis with AOF as broker and store, or
a private RabbitMQ node as broker with the test Redis as store; both as in the fault
tests), then ``--rounds`` times: a warm worker is scoring a fresh run of ``--pictures``
pictures; once a random share of the run (10 % to 70 %, uniform) is settled the
worker's whole process group gets SIGKILL; a new worker is started; the run must
complete with no help but the workers' own (no ``--wait``, no ``reconcile``). Each round
reports the userids lost, duplicate rows in the collected CSV, extra deliveries, the
repairs the workers made, and the time from the kill to the last outcome. The killed
worker's replacement is the next round's victim.

Redis as broker returns a killed worker's reserved messages after the visibility
timeout, 40 s here as in the tests (900 s by default): that dominates its time to
completion. Needs Redis at GENDERSCORE_REDIS_URL (default redis://127.0.0.1:6379/0)
and RabbitMQ's server installed. Results go to bench/results/faults-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

os.environ.setdefault("GENDERSCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("GENDERSCORE_KEY_PREFIX", f"gssoak{os.getpid()}")

from bench.cpu import cpu_model  # noqa: E402
from tests.faults.conftest import BrokerWorld  # noqa: E402
from tests.helpers import make_model_file, make_pictures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _wait(condition: Any, timeout: float, poll: float = 0.1) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not done after {timeout:.0f}s")
        time.sleep(poll)
    return time.monotonic() - started


def _settled(world: BrokerWorld, run_id: str) -> int:
    keys = world.keys(run_id)
    return int(world.client.hlen(keys.pred)) + int(world.client.hlen(keys.err))


def _background(function: Any, *args: str) -> threading.Thread:
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


def soak(broker: str, rounds: int, pictures: int, workdir: Path, seed: int) -> list[dict[str, Any]]:
    """``rounds`` kill-and-replace rounds on one broker; one record per round."""
    rng = random.Random(seed)
    folder = workdir / "pictures"
    if not folder.exists():
        make_pictures(folder, pictures, size=(48, 48))
    model = workdir / "model" / "soak.h5"
    if not model.exists():
        make_model_file(model, image_size=32)
    results: list[dict[str, Any]] = []
    world = BrokerWorld(workdir / broker, model, broker)
    with ExitStack() as stack:
        stack.callback(world.close)
        victim = stack.enter_context(world.worker("soak"))
        # A warm-up run loads the model in every pool process.
        world.cli("score", str(folder), "--run-id", "warm-up")
        _wait(lambda: _settled(world, "warm-up") >= pictures, 300)
        for n in range(rounds):
            run_id = f"soak-{n:02d}"
            producer = _background(world.cli, "score", str(folder), "--run-id", run_id)
            # The kill lands mid-run: once a random share (10 % to 70 %) of the run is
            # settled, polled every 5 ms (the workers may be done before the producer's
            # command returns, so it runs beside).
            target = int(rng.uniform(0.1, 0.7) * pictures)
            _wait(lambda run=run_id, t=target: _settled(world, run) >= t, 300, 0.005)
            at_kill = _settled(world, run_id)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
            killed = time.monotonic()
            producer.join()
            victim = stack.enter_context(world.worker(f"soak{n}"))
            took = _wait(lambda run=run_id: _settled(world, run) >= pictures, 600)
            if at_kill >= pictures or at_kill == 0:
                # The kill missed the run's middle: say so, the round proves less.
                print(f"round {n}: killed with {at_kill} of {pictures} settled", file=sys.stderr)
            out = workdir / f"{broker}-{run_id}.csv"
            world.cli("collect", run_id, "--out", str(out))
            rows = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
            errors = out.with_name(f"{out.stem}.errors.csv").read_text().splitlines()[1:]
            deliveries = sum(world.deliveries(run_id).values())
            record = {
                "broker": broker,
                "round": n,
                "settled_at_kill": at_kill,
                "rows": len(rows),
                "lost": pictures - len(set(rows)) - len(errors),
                "duplicate_rows": len(rows) - len(set(rows)),
                "errors": len(errors),
                "extra_deliveries": deliveries - pictures,
                "repairs": world.repairs(run_id),
                "seconds_to_complete": round(time.monotonic() - killed, 1),
                "wait_seconds": round(took, 1),
            }
            results.append(record)
            print(json.dumps(record), flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The soak table, one line per broker."""
    lines = [
        "| broker | rounds | lost | duplicate rows | error rows | extra deliveries (total / max)"
        " | repairs | time to completion (median / max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for broker in dict.fromkeys(r["broker"] for r in results):
        rows = [r for r in results if r["broker"] == broker]
        times = [r["seconds_to_complete"] for r in rows]
        extra = [r["extra_deliveries"] for r in rows]
        lines.append(
            f"| {broker} | {len(rows)} | {sum(r['lost'] for r in rows)} | "
            f"{sum(r['duplicate_rows'] for r in rows)} | {sum(r['errors'] for r in rows)} | "
            f"{sum(extra)} / {max(extra)} | {sum(r['repairs'] for r in rows)} | "
            f"{statistics.median(times):.1f} s / {max(times):.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the soak and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pictures", type=int, default=500)
    parser.add_argument("--brokers", default="redis,rabbitmq")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.time()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="genderscore-soak-") as tmp:
        for broker in args.brokers.split(","):
            results += soak(broker, args.rounds, args.pictures, Path(tmp), args.seed)
    text = table(results)
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; {args.pictures} pictures per run\n")
    print(text)
    out = ROOT / "bench" / "results" / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "started": started, "rounds": results}))
    print(f"\n{out}", file=sys.stderr)


if __name__ == "__main__":
    main()
