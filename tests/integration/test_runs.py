"""A run's identity: the model it names, its one source, and a producer interrupted mid-publish."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import redis

from tests.faults.conftest import FaultEnv
from tests.helpers import make_model_file, make_pictures


def _sha(model: Path) -> str:
    return str(json.loads(model.with_suffix(".json").read_text())["sha256"])


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["userid"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def world(tmp_path: Path, tiny_model: Path, redis_client: redis.Redis) -> FaultEnv:
    env = FaultEnv(tmp_path, os.environ["GENDERSCORE_REDIS_URL"], tiny_model)
    yield env  # type: ignore[misc]
    env.cleanup()


def test_a_model_retrained_in_place_is_reloaded_and_never_mixed(
    world: FaultEnv, tmp_path: Path
) -> None:
    from worker.model import load_bundle
    from worker.preprocess import preprocess

    folder = tmp_path / "pictures"
    make_pictures(folder, 12, size=(48, 48))
    model = make_model_file(tmp_path / "models" / "gender.h5", image_size=32, seed=11)
    old_sha = _sha(model)
    with world.worker("w"):
        world.cli("score", str(folder), "--model", str(model), "--run-id", "before")
        world.wait_settled("before", 12, timeout=60)  # the worker has model A cached
        make_model_file(model, image_size=32, seed=12)  # retrained in place, with metadata
        new_sha = _sha(model)
        assert new_sha != old_sha
        out = tmp_path / "after.csv"
        world.cli(
            "score",
            str(folder),
            "--model",
            str(model),
            "--run-id",
            "after",
            "--wait",
            "--out",
            str(out),
            "--timeout",
            "60",
        )
        # A message that still names model A reaches the worker after the replacement.
        with world.patched():
            from worker.broker import ScoreTask, publish_scores
            from worker.celery import app
            from worker.results import create_run

            create_run(
                world.client,
                "stale",
                {"source": f"folder:{folder}", "model": str(model), "model_sha": old_sha},
            )
            uid = sorted(p.stem for p in folder.iterdir())[0]
            publish_scores(
                app, [ScoreTask("stale", uid, str(folder / f"{uid}.jpg"), str(model), old_sha)]
            )
        world.wait_settled("stale", 1, timeout=30)
    rows = _rows(out)
    assert {row["model"] for row in rows.values()} == {new_sha[:12]}
    bundle = load_bundle(model)
    arrays = np.stack(
        [preprocess((folder / f"{u}.jpg").read_bytes(), bundle.size_wh) for u in rows]
    )
    expected = np.asarray(bundle.model.predict_on_batch(arrays)).reshape(-1)
    assert np.allclose([float(r["p_female"]) for r in rows.values()], expected, atol=1e-5)
    _, errors = world.settled("stale")
    assert errors[uid].startswith("model_changed:")


def test_extending_a_run_with_another_model_is_refused(world: FaultEnv, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 3, size=(48, 48))
    other = make_model_file(tmp_path / "other" / "other.h5", image_size=32, seed=5)
    world.cli("score", str(folder), "--run-id", "one-model")
    result = world.cli(
        "score", str(folder), "--run-id", "one-model", "--model", str(other), check=False
    )
    assert result.returncode != 0
    assert "a run has one model and one source" in result.stderr
    assert "Traceback" not in result.stderr
    meta = world.client.hgetall(world.keys("one-model").meta)
    assert meta["model_sha"] == _sha(Path(world.env["GENDERSCORE_MODEL"]))
    elsewhere = tmp_path / "elsewhere"
    make_pictures(elsewhere, 2, size=(48, 48), start=50)
    result = world.cli("score", str(elsewhere), "--run-id", "one-model", check=False)
    assert result.returncode != 0 and "source" in result.stderr


def test_a_producer_interrupted_mid_publish_is_completed_by_running_it_again(
    world: FaultEnv, tmp_path: Path
) -> None:
    from producer import enqueue
    from producer.scan import scan_pictures
    from worker import runs
    from worker.celery import app
    from worker.model import check_model_file

    folder = tmp_path / "pictures"
    make_pictures(folder, 12, size=(48, 48))
    model = Path(world.env["GENDERSCORE_MODEL"])
    scan = scan_pictures(folder)
    source, sha = f"folder:{scan.images_dir}", check_model_file(model)

    def interrupt(count: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C after the first chunk

    with world.patched(), mock.patch.object(runs, "CHUNK", 5):
        with pytest.raises(KeyboardInterrupt):
            enqueue.enqueue_run(
                app,
                world.client,
                source,
                scan.pictures,
                model,
                sha,
                "interrupted",
                progress=interrupt,
            )
        again = enqueue.enqueue_run(
            app, world.client, source, scan.pictures, model, sha, "interrupted"
        )
    assert (again.published, again.already_in_run, again.total) == (7, 5, 12)
    with world.worker("w"):
        world.wait_settled("interrupted", 12, timeout=60)
        out = tmp_path / "out.csv"
        world.cli("collect", "interrupted", "--out", str(out))
    assert sorted(_rows(out)) == scan.userids
    assert set(world.deliveries("interrupted").values()) == {1}


def test_the_broker_url_is_honoured_by_every_part(
    world: FaultEnv, tmp_path: Path, redis_client: redis.Redis
) -> None:
    # Results in one Redis database, messages in another: what a deployment with a
    # separate broker does. Nothing may publish to, or read queues from, the results one.
    results_url = world.redis_url
    broker_url = results_url.rsplit("/", 1)[0] + "/" + str((int(results_url[-1]) + 1) % 16)
    world.env["GENDERSCORE_BROKER_URL"] = broker_url
    broker = redis.Redis.from_url(broker_url, decode_responses=True)
    queue = f"{world.prefix}:score"
    folder = tmp_path / "pictures"
    make_pictures(folder, 20, size=(48, 48))
    try:
        world.cli("score", str(folder), "--run-id", "split")
        assert broker.llen(queue) == 20 and world.client.llen(queue) == 0
        plain = world.cli("status").stdout
        assert "score 20" in plain, plain  # queue depth read from the broker
        with world.worker("w"):
            world.wait_settled("split", 20, timeout=60)
            # reconcile of a complete run publishes nothing; of a gap, to the broker.
            world.client.hdel(world.keys("split").pred, sorted(world.settled("split")[0])[0])
            fixed = world.cli("reconcile", "split")
            assert fixed.stdout.strip() == "1"
            world.wait_settled("split", 20, timeout=60)
        assert world.client.llen(queue) == 0 and not world.client.exists(f"{world.prefix}:unacked")
    finally:
        for key in broker.scan_iter(match=f"{world.prefix}:*"):
            broker.delete(key)
