"""Training end to end: generated pictures -> model + metadata + curves -> the scoring path.

One small training run (32x32 pictures, a few epochs) is shared by the module; it takes
well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from tests.helpers import jpeg_bytes, make_pictures, picture, userid, write_profiles
from training.train import TrainResult

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
COUNT = 150  # 60% female: a majority baseline of 0.6
METADATA_KEYS = {
    "format",
    "input_size",
    "preprocessing",
    "positive_class",
    "threshold",
    "sha256",
    "label_mapping",
    "class_counts",
    "baseline_accuracy",
    "majority_class",
    "history",
    "best_epoch",
    "val_accuracy",
    "val_loss",
    "data",
    "skipped",
    "versions",
    "created_at",
    "params",
}


@pytest.fixture(scope="module")
def course_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Labelled pictures in the course layout, with one of each problem."""
    root = tmp_path_factory.mktemp("course")
    images = root / "image"
    labels = make_pictures(images, COUNT, size=(48, 48))
    missing = userid(COUNT + 1)  # labelled, no picture
    corrupt = userid(COUNT + 2)
    (images / f"{corrupt}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (images / f"{userid(COUNT + 3)}.jpg").write_bytes(jpeg_bytes(picture("male")))  # no label
    profile = root / "profile.csv"
    write_profiles(profile, {**labels, missing: "male", corrupt: "female"})
    with profile.open("a") as handle:  # a duplicate row
        first = sorted(labels)[0]
        handle.write(
            f"999,{first},23.0,{'1.0' if labels[first] == 'female' else '0.0'},3,3,3,3,3\n"
        )
    return {"images": images, "profile": profile, "labels": labels, "root": root}


@pytest.fixture(scope="module")
def trained(
    course_data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, list[tuple[int, dict[str, float]]]]:
    from training.train import train

    epochs: list[tuple[int, dict[str, float]]] = []
    out = tmp_path_factory.mktemp("model") / "gender.h5"
    result = train(
        course_data["images"],
        course_data["profile"],
        out,
        epochs=8,
        batch_size=16,
        image_size=IMAGE_SIZE,
        val_fraction=0.2,
        seed=0,
        kernel_size=4,
        patience=3,
        progress=lambda epoch, metrics: epochs.append((epoch, metrics)),
    )
    return result, epochs


def test_learns_far_above_the_majority_baseline(
    trained: tuple[TrainResult, list[tuple[int, dict[str, float]]]],
) -> None:
    result, epochs = trained
    meta = result.metadata
    assert meta["baseline_accuracy"] == pytest.approx(0.6, abs=0.05)
    assert meta["majority_class"] == "female"
    assert result.val_accuracy >= 0.9
    assert result.summary() == (
        f"validation accuracy {result.val_accuracy:.2f} vs majority baseline "
        f"{result.baseline_accuracy:.2f}"
    )
    assert [e for e, _ in epochs] == list(range(1, len(meta["history"]["loss"]) + 1))
    assert set(epochs[0][1]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert 1 <= meta["best_epoch"] <= len(epochs)


def test_metadata_is_complete_and_matches_the_file(
    trained: tuple[TrainResult, list[tuple[int, dict[str, float]]]],
    course_data: dict[str, Any],
) -> None:
    from training.data import userids_fingerprint
    from worker.model import METADATA_FORMAT, file_sha256
    from worker.preprocess import PREPROCESSING_ID

    result, _ = trained
    meta = json.loads(result.metadata_path.read_text())
    assert meta == result.metadata
    assert set(meta) >= METADATA_KEYS
    assert meta["format"] == METADATA_FORMAT
    assert meta["sha256"] == file_sha256(result.model_path)
    assert meta["input_size"] == [IMAGE_SIZE, IMAGE_SIZE]
    assert meta["preprocessing"] == PREPROCESSING_ID
    assert (meta["positive_class"], meta["threshold"]) == ("female", 0.5)
    assert meta["label_mapping"]["codes"] == {"0": "male", "1": "female"}
    assert "P(female)" in meta["label_mapping"]["sigmoid"]
    counts = meta["class_counts"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == COUNT
    assert meta["data"] == {
        "count": COUNT,
        "userids_sha256": userids_fingerprint(course_data["labels"]),
        "val_userids_sha256": meta["data"]["val_userids_sha256"],
    }
    assert meta["skipped"] == {
        "label_duplicate": 1,
        "missing_picture": 1,
        "picture_corrupt": 1,
        "unlabelled_picture": 1,
    }
    assert set(meta["versions"]) == {"tensorflow", "keras", "numpy", "pillow", "genderscore"}
    assert set(meta["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert meta["params"]["image_size"] == IMAGE_SIZE and meta["params"]["seed"] == 0
    assert meta["created_at"].endswith("+00:00")
    assert result.curves_path.read_bytes().startswith(b"\x89PNG")
    assert not list(result.model_path.parent.glob("*.tmp*"))


def test_saved_model_scores_like_the_worker(
    trained: tuple[TrainResult, list[tuple[int, dict[str, float]]]],
    course_data: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.model import check_h5_config, load_bundle
    from worker.preprocess import preprocess
    from worker.scoring import Scored, score_pictures
    from worker.settings import settings

    monkeypatch.setattr(settings, "runtime", "keras")  # the .h5 itself, layer by layer
    result, _ = trained
    check_h5_config(result.model_path)  # no Lambda layers
    bundle = load_bundle(result.model_path)
    layer_types = {type(layer).__name__ for layer in bundle.model.layers}
    assert not any(name.startswith("Random") for name in layer_types)  # no augmentation
    assert bundle.positive_class == "female" and bundle.input_size == (IMAGE_SIZE, IMAGE_SIZE)
    ids = sorted(course_data["labels"])[:40]
    items = [(uid, course_data["images"] / f"{uid}.jpg") for uid in ids]
    outcomes = score_pictures(bundle, items, batch_size=16)
    arrays = np.stack(
        [preprocess(path.read_bytes(), (IMAGE_SIZE, IMAGE_SIZE)) for _, path in items]
    )
    expected = np.asarray(bundle.model.predict_on_batch(arrays)).reshape(-1)
    assert all(isinstance(o, Scored) for o in outcomes)
    got = np.array([o.p_female for o in outcomes if isinstance(o, Scored)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    right = sum(
        o.gender == course_data["labels"][o.userid] for o in outcomes if isinstance(o, Scored)
    )
    assert right >= 0.9 * len(ids)


def test_training_inputs_are_the_scoring_inputs(course_data: dict[str, Any]) -> None:
    from training.data import load_labelled_pictures, make_dataset
    from worker.preprocess import preprocess

    data = load_labelled_pictures(course_data["images"], course_data["profile"], IMAGE_SIZE)
    indices = np.arange(5)
    batch, targets = next(iter(make_dataset(data, indices, batch_size=5)))
    for row, uid in enumerate(data.userids[:5]):
        expected = preprocess(
            (course_data["images"] / f"{uid}.jpg").read_bytes(), (IMAGE_SIZE, IMAGE_SIZE)
        )
        assert np.array_equal(batch.numpy()[row], expected)
    assert targets.numpy().reshape(-1).tolist() == data.targets[:5].tolist()


def test_train_command_prints_epochs_and_summary(
    course_data: dict[str, Any], tmp_path: Path
) -> None:
    from training.cli import train

    out = tmp_path / "cli.h5"
    result = CliRunner().invoke(
        train,
        [
            str(course_data["images"]),
            str(course_data["profile"]),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--image-size",
            str(IMAGE_SIZE),
            "--val-fraction",
            "0.2",
            "--batch-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1/2  loss " in result.output and "epoch 2/2" in result.output
    assert "1 labelled users with no picture" in result.output
    assert "vs majority baseline" in result.output.splitlines()[-1]
    assert out.exists() and out.with_suffix(".json").exists() and out.with_suffix(".png").exists()


def test_training_task_reports_progress_in_redis(
    course_data: dict[str, Any], redis_client: redis.Redis, tmp_path: Path
) -> None:
    from training.tasks import run_training
    from worker.keys import training_index, training_progress

    states: list[dict[str, Any]] = []
    out = tmp_path / "task.h5"
    digest = run_training(
        "test-task-1",
        str(course_data["images"]),
        str(course_data["profile"]),
        str(out),
        {"epochs": 2, "image_size": IMAGE_SIZE, "val_fraction": 0.2},
        update_state=lambda **kw: states.append(kw),
        client=redis_client,
    )
    assert json.loads(json.dumps(digest)) == digest  # JSON-able
    assert digest["model"] == str(out) and digest["device"]
    assert [s["meta"]["epoch"] for s in states] == [1, 2]
    assert {s["state"] for s in states} == {"PROGRESS"}
    assert states[0]["meta"]["epochs"] == 2 and "val_accuracy" in states[0]["meta"]
    info = redis_client.hgetall(training_progress("test-task-1"))
    assert info["state"] == "SUCCESS" and info["epoch"] == "2" and info["epochs"] == "2"
    assert "vs majority baseline" in info["summary"] and float(info["val_accuracy"]) >= 0
    assert redis_client.zscore(training_index(), "test-task-1") is not None


def test_training_task_failure_is_recorded(
    course_data: dict[str, Any], redis_client: redis.Redis, tmp_path: Path
) -> None:
    from training.tasks import run_training
    from worker.keys import training_progress
    from worker.labels import LabelsError

    bad = tmp_path / "labels.csv"
    bad.write_text("userid,age\n")
    with pytest.raises(LabelsError):
        run_training(
            "test-task-2",
            str(course_data["images"]),
            str(bad),
            str(tmp_path / "x.h5"),
            {"epochs": 1},
            client=redis_client,
        )
    info = redis_client.hgetall(training_progress("test-task-2"))
    assert info["state"] == "FAILURE" and "no 'gender' column" in info["error"]
    with pytest.raises(ValueError, match="unknown training options epoch"):
        run_training("test-task-3", "a", "b", "c.h5", {"epoch": 1}, client=redis_client)


def test_submit_trains_on_a_real_training_worker_and_status_shows_epochs(
    course_data: dict[str, Any], redis_client: redis.Redis, tmp_path: Path
) -> None:
    from producer.cli import main
    from tests.helpers import celery_worker
    from worker.model import file_sha256

    models = Path(os.environ["GENDERSCORE_MODEL"]).parent
    log = tmp_path / "training-worker.log"
    with celery_worker("training", concurrency=1, log_path=log, name="trainer"):
        result = CliRunner().invoke(
            main,
            [
                "train",
                str(course_data["images"]),
                str(course_data["profile"]),
                "--name",
                "submitted",
                "--epochs",
                "2",
                "--image-size",
                str(IMAGE_SIZE),
                "--val-fraction",
                "0.2",
                "--submit",
                "--timeout",
                "240",
            ],
        )
        assert result.exit_code == 0, result.output
        status = CliRunner().invoke(main, ["status"])
    assert "epoch 2/2" in result.output
    assert "vs majority baseline" in result.output
    assert status.exit_code == 0, status.output
    training_rows = [line for line in status.output.splitlines() if "SUCCESS" in line]
    assert training_rows and "2/2" in training_rows[0]
    (out,) = models.glob("submitted-*.h5")  # a new version beside the served model
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == file_sha256(out)
    assert "training worker: visibility timeout" in log.read_text()


def test_a_training_message_cannot_choose_where_the_model_goes(
    redis_client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    from tests.helpers import celery_worker
    from worker.celery import TRAINING_QUEUE, app

    served = Path(os.environ["GENDERSCORE_MODEL"])
    before = served.read_bytes()
    log = tmp_path / "training-worker.log"
    hostile = [
        ((str(tmp_path), str(tmp_path / "l.csv"), "gender"), {"out": str(served)}),
        ((str(tmp_path), str(tmp_path / "l.csv"), str(served)), {}),
        ((str(tmp_path), str(tmp_path / "l.csv"), "../../../tmp/pwn"), {}),
    ]
    with celery_worker("training", concurrency=1, log_path=log, name="trainer2"):
        results = [
            app.send_task("genderscore.train", args=a, kwargs=k, queue=TRAINING_QUEUE)
            for a, k in hostile
        ]
        for result in results:
            with pytest.raises(Exception, match="unknown training options out|invalid model name"):
                result.get(timeout=120)
    assert served.read_bytes() == before
    assert not Path("/tmp/pwn.h5").exists()


def test_train_never_writes_the_served_model_and_promote_serves_a_version(
    course_data: dict[str, Any], tmp_path: Path
) -> None:
    from unittest import mock

    from producer.cli import main
    from tests.helpers import make_model_file
    from worker.model import check_model_file
    from worker.settings import settings

    models = tmp_path / "models"
    served = models / "gender.h5"
    first = make_model_file(served, image_size=24, seed=1).read_bytes()  # a plain file, served
    with mock.patch.object(settings, "model", served):
        refused = CliRunner().invoke(
            main,
            [
                "train",
                str(course_data["images"]),
                str(course_data["profile"]),
                "--out",
                str(served),
            ],
        )
        assert refused.exit_code != 0 and "promote" in refused.output
        version = make_model_file(models / "gender-20260101-000000.h5", image_size=24, seed=2)
        promoted = CliRunner().invoke(main, ["promote", str(version)])
        assert promoted.exit_code == 0, promoted.output
    assert served.is_symlink() and served.resolve() == version.resolve()
    assert (
        check_model_file(served) == json.loads(version.with_suffix(".json").read_text())["sha256"]
    )
    (kept,) = models.glob("gender-previous-*.h5")  # the plain file served before, kept
    assert kept.read_bytes() == first
    elsewhere = make_model_file(tmp_path / "other" / "x.h5", image_size=24, seed=3)
    with mock.patch.object(settings, "model", served):
        outside = CliRunner().invoke(main, ["promote", str(elsewhere)])
    assert outside.exit_code != 0 and "not in" in outside.output
