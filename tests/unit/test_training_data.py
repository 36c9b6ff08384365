"""Training data without TensorFlow: labels, pictures read in place, the split, evaluation, CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers import jpeg_bytes, make_pictures, picture, userid, write_profiles
from training.cli import evaluate as evaluate_cmd
from training.cli import follow_training
from training.cli import train as train_cmd
from training.data import (
    DataReport,
    TrainingError,
    label_skip_reason,
    load_labelled_pictures,
    stratified_split,
    to_inputs,
    to_pixels,
    userids_fingerprint,
)
from training.network import feature_size, min_image_size
from training.train import check_options, format_epoch
from worker.evaluation import EvaluationError, format_evaluation
from worker.evaluation import evaluate_files as evaluate
from worker.labels import LabelsError
from worker.preprocess import preprocess

HEADER = ",userid,age,gender,ope,con,ext,agr,neu"


def profile_row(index: int, uid: str, gender: str) -> str:
    return f"{index},{uid},23.0,{gender},3.9,3.4,3.5,3.6,2.7"


# --- the same preprocessing -------------------------------------------------------------


def test_uint8_storage_gives_back_preprocess_output_bit_for_bit() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    scaled = levels.astype(np.float32) * np.float32(1.0 / 255.0)  # what preprocess does
    assert np.array_equal(to_pixels(scaled), levels)
    assert np.array_equal(to_inputs(levels), scaled)
    real = preprocess(jpeg_bytes(picture("male", (50, 40), seed=3)), (32, 32))
    assert np.array_equal(to_inputs(to_pixels(real)), real)


# --- the split ---------------------------------------------------------------------------


def _population(n_female: int, n_male: int) -> tuple[list[str], np.ndarray]:
    ids = [userid(i) for i in range(n_female + n_male)]
    targets = np.array([1.0] * n_female + [0.0] * n_male, dtype=np.float32)
    return ids, targets


def test_split_is_stratified_disjoint_and_complete() -> None:
    ids, targets = _population(60, 40)
    split = stratified_split(ids, targets, 0.2, seed=0)
    assert set(split.train).isdisjoint(split.val)
    assert sorted([*split.train, *split.val]) == list(range(100))
    assert int(targets[split.val].sum()) == 12 and len(split.val) == 20


def test_split_reproducible_by_seed_and_independent_of_order() -> None:
    ids, targets = _population(30, 20)
    first = stratified_split(ids, targets, 0.25, seed=7)
    again = stratified_split(ids, targets, 0.25, seed=7)
    assert np.array_equal(first.val, again.val)
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = stratified_split([ids[i] for i in order], targets[order], 0.25, seed=7)
    assert {ids[i] for i in first.val} == {ids[order[i]] for i in shuffled.val}
    other = stratified_split(ids, targets, 0.25, seed=8)
    assert not np.array_equal(first.val, other.val)


def test_split_keeps_one_of_each_class_on_each_side() -> None:
    ids, targets = _population(2, 3)
    split = stratified_split(ids, targets, 0.9, seed=0)
    for side in (split.train, split.val):
        assert set(targets[side]) == {0.0, 1.0}


@pytest.mark.parametrize("counts", [(5, 1), (0, 5)])
def test_split_refuses_a_class_too_small(counts: tuple[int, int]) -> None:
    ids, targets = _population(*counts)
    with pytest.raises(TrainingError, match="at least 2 of each class"):
        stratified_split(ids, targets, 0.2, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_refuses_a_bad_fraction(fraction: float) -> None:
    ids, targets = _population(5, 5)
    with pytest.raises(TrainingError, match="val_fraction"):
        stratified_split(ids, targets, fraction, seed=0)


def test_userids_fingerprint_is_order_free() -> None:
    assert userids_fingerprint(["b", "a"]) == userids_fingerprint(["a", "b"])
    import hashlib

    assert userids_fingerprint(["b", "a"]) == hashlib.sha256(b"a\nb").hexdigest()


# --- label files -------------------------------------------------------------------------


def _folder_with(tmp_path: Path, genders: dict[str, str]) -> Path:
    folder = tmp_path / "image"
    folder.mkdir()
    for n, (uid, gender) in enumerate(genders.items()):
        (folder / f"{uid}.jpg").write_bytes(jpeg_bytes(picture(gender, (40, 40), seed=n)))
    return folder


def test_course_profile_csv_with_bom_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "image"
    labels = make_pictures(folder, 6, size=(40, 40))
    csv_path = tmp_path / "profile.csv"
    write_profiles(csv_path, labels)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    data = load_labelled_pictures(folder, csv_path, 32, workers=1)
    assert data.userids == sorted(labels)
    assert data.pixels.shape == (6, 32, 32, 3) and data.pixels.dtype == np.uint8
    expected = [1.0 if labels[u] == "female" else 0.0 for u in data.userids]
    assert data.targets.tolist() == expected
    assert data.report.skipped_counts() == {}


def test_missing_gender_column_is_a_clear_error(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"userid,age\n{userid(1)},23\n")
    with pytest.raises(LabelsError, match="no 'gender' column"):
        load_labelled_pictures(tmp_path, csv_path, 32)


def test_no_usable_row_is_a_clear_error(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        f"{HEADER}\n{profile_row(0, 'not a userid!', '1.0')}\n"
        f"{profile_row(1, userid(1), 'unknown')}\n"
    )
    with pytest.raises(LabelsError, match="no usable row"):
        load_labelled_pictures(tmp_path, csv_path, 32)


def test_bad_rows_are_skipped_and_reported(tmp_path: Path) -> None:
    good = {userid(n): ("female" if n % 2 else "male") for n in range(1, 7)}
    folder = _folder_with(tmp_path, good)
    rows = [
        profile_row(i, uid, "1.0" if g == "female" else "0.0")
        for i, (uid, g) in enumerate(good.items())
    ]
    rows += [
        profile_row(10, userid(1), "0.0" if good[userid(1)] == "female" else "1.0"),  # conflict
        profile_row(11, userid(2), "1.0" if good[userid(2)] == "female" else "0.0"),  # duplicate
        profile_row(12, userid(99), "2.5"),  # wrong type
        profile_row(13, userid(98), "abc"),
        profile_row(14, "../../etc/passwd", "1.0"),
        "15," + userid(97),  # missing columns
    ]
    csv_path = tmp_path / "profile.csv"
    csv_path.write_text("\n".join([HEADER, *rows]) + "\n")
    data = load_labelled_pictures(folder, csv_path, 32, workers=1)
    assert userid(1) not in data.userids  # conflicting labels: both dropped
    assert len(data.userids) == 5
    assert data.report.skipped_counts() == {
        "label_conflict": 1,
        "label_duplicate": 1,
        "label_invalid_gender": 2,
        "label_invalid_userid": 1,
        "label_missing_columns": 1,
        "unlabelled_picture": 1,
    }
    text = "\n".join(data.report.lines())
    assert "6 label rows skipped" in text and "1 pictures with no label" in text


def test_label_skip_reasons_have_short_tags() -> None:
    assert label_skip_reason("something new") == "label_other"
    assert label_skip_reason(f"duplicate of {userid(1)}") == "label_duplicate"


# --- pictures read in place ----------------------------------------------------------------


def test_missing_unreadable_and_unlabelled_pictures_are_counted(tmp_path: Path) -> None:
    folder = tmp_path / "image"
    labels = make_pictures(folder, 8, size=(40, 40))
    ids = sorted(labels)
    (folder / f"{ids[0]}.jpg").unlink()  # labelled, no picture
    (folder / f"{ids[1]}.jpg").write_bytes(b"<html>not a picture</html>")
    (folder / f"{ids[2]}.jpg").write_bytes(b"")
    (folder / f"{ids[3]}.jpg").write_bytes(jpeg_bytes(picture("male"))[:200])  # truncated
    (folder / f"{userid(500)}.jpg").write_bytes(jpeg_bytes(picture("male")))  # no label
    (folder / "notes.txt").write_text("ignored")
    csv_path = tmp_path / "profile.csv"
    write_profiles(csv_path, labels)
    data = load_labelled_pictures(folder, csv_path, 32, workers=2)
    report = data.report
    assert data.userids == ids[4:] and report.used == 4 and report.labelled == 8
    assert report.missing_picture == [ids[0]]
    assert report.unlabelled_picture == [userid(500)]
    kinds = {uid: kind for uid, kind, _ in report.unreadable}
    assert kinds[ids[1]] == "not_an_image" and kinds[ids[2]] == "empty"
    assert kinds[ids[3]] == "corrupt"
    counts = report.skipped_counts()
    assert counts["missing_picture"] == 1 and counts["unlabelled_picture"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("picture_")) == 3


def test_pictures_are_the_preprocess_arrays(tmp_path: Path) -> None:
    folder = tmp_path / "image"
    labels = make_pictures(folder, 3, size=(70, 50))
    csv_path = tmp_path / "profile.csv"
    write_profiles(csv_path, labels)
    data = load_labelled_pictures(folder, csv_path, 32, workers=1)
    for uid, pixels in zip(data.userids, data.pixels, strict=True):
        expected = preprocess((folder / f"{uid}.jpg").read_bytes(), (32, 32))
        assert np.array_equal(to_inputs(pixels), expected)


def test_no_readable_picture_is_a_clear_error(tmp_path: Path) -> None:
    csv_path = tmp_path / "profile.csv"
    write_profiles(csv_path, {userid(1): "male", userid(2): "female"})
    (tmp_path / "image").mkdir()
    with pytest.raises(TrainingError, match="none of the 2 labelled users"):
        load_labelled_pictures(tmp_path / "image", csv_path, 32)


def test_report_lists_a_few_examples_only() -> None:
    report = DataReport(labelled=100, used=50, missing_picture=[userid(n) for n in range(50)])
    line = next(li for li in report.lines() if "no picture" in li)
    assert line.startswith("50 labelled users with no picture") and "and 30 more" in line


# --- options -----------------------------------------------------------------------------


def test_network_minimum_size() -> None:
    assert feature_size(150, 4) == 16
    assert feature_size(min_image_size(4), 4) == 1 and feature_size(min_image_size(4) - 1, 4) < 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out": Path("m.keras")}, "must end in .h5"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"image_size": 20}, "too small for kernel_size 4: use at least 29"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {
        "out": Path("m.h5"),
        "epochs": 1,
        "batch_size": 1,
        "image_size": 32,
        "kernel_size": 4,
        "patience": 0,
    }
    options.update(kwargs)
    with pytest.raises(TrainingError, match=message):
        check_options(**options)


def test_format_epoch() -> None:
    line = format_epoch(
        3, 25, {"loss": 0.6, "accuracy": 0.7, "val_loss": 0.5, "val_accuracy": 0.75}
    )
    assert line == (
        "epoch 3/25  loss 0.6000  accuracy 0.7000  val_loss 0.5000  val_accuracy 0.7500"
    )


# --- evaluation ----------------------------------------------------------------------------


def _scored_csv(path: Path, predictions: dict[str, str]) -> Path:
    lines = ["userid,gender,p_female,model,scored_at"]
    for uid, gender in predictions.items():
        p = "0.900000" if gender == "female" else "0.100000"
        lines.append(f"{uid},{gender},{p},abcdef123456,2026-01-01T00:00:00Z")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_counts_accuracy_baseline_and_confusion(tmp_path: Path) -> None:
    truth = {userid(n): ("female" if n < 6 else "male") for n in range(10)}
    # 6 female, 4 male; predicted: 5 of 6 females right, 3 of 4 males right; 1 male unscored.
    predicted = {userid(n): "female" for n in range(5)}
    predicted[userid(5)] = "male"
    predicted.update({userid(6): "female", userid(7): "male", userid(8): "male"})
    predicted[userid(50)] = "female"  # no label
    labels = tmp_path / "profile.csv"
    write_profiles(labels, truth)
    result = evaluate(_scored_csv(tmp_path / "scored.csv", predicted), labels)
    assert result.users == 9 and result.correct == 7
    assert result.accuracy == pytest.approx(7 / 9)
    assert result.confusion == {  # (true, predicted) -> users
        ("male", "male"): 2,
        ("male", "female"): 1,
        ("female", "male"): 1,
        ("female", "female"): 5,
    }
    assert result.majority_class == "female"
    assert result.majority_accuracy == pytest.approx(6 / 9)
    assert result.missing_predictions == 1 and result.unlabelled == 1
    text = format_evaluation(result)
    assert "accuracy: 0.7778 (7/9)" in text and "majority baseline (female): 0.6667" in text
    assert "labelled users with no prediction: 1" in text


def test_evaluate_with_no_common_user_is_a_clear_error(tmp_path: Path) -> None:
    labels = tmp_path / "profile.csv"
    write_profiles(labels, {userid(1): "male"})
    scored = _scored_csv(tmp_path / "scored.csv", {userid(2): "male"})
    with pytest.raises(EvaluationError, match="no userid is in both"):
        evaluate(scored, labels)


def test_evaluate_command(tmp_path: Path) -> None:
    labels = tmp_path / "profile.csv"
    write_profiles(labels, {userid(1): "male", userid(2): "female"})
    scored = _scored_csv(tmp_path / "scored.csv", {userid(1): "male", userid(2): "male"})
    result = CliRunner().invoke(evaluate_cmd, [str(scored), str(labels)])
    assert result.exit_code == 0, result.output
    assert "accuracy: 0.5000 (1/2)" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("userid,age\n")
    result = CliRunner().invoke(evaluate_cmd, [str(scored), str(bad)])
    assert result.exit_code == 2 and "no 'gender' column" in result.output


def test_train_command_with_unusable_labels_says_why(tmp_path: Path) -> None:
    labels = tmp_path / "profile.csv"
    labels.write_text(f"{HEADER}\n{profile_row(0, userid(1), 'maybe')}\n")
    (tmp_path / "image").mkdir()
    result = CliRunner().invoke(
        train_cmd, [str(tmp_path / "image"), str(labels), "--out", str(tmp_path / "m.h5")]
    )
    assert result.exit_code == 2
    assert "no usable row" in result.output and "Traceback" not in result.output


# --- following a submitted task ---------------------------------------------------------------


class FakeResult:
    """An AsyncResult that goes through a list of (state, info) steps, one per poll."""

    def __init__(self, steps: list[tuple[str, Any]]) -> None:
        self.id = "task-1"
        self.steps = steps
        self.polls = -1

    @property
    def state(self) -> str:
        self.polls = min(self.polls + 1, len(self.steps) - 1)
        return str(self.steps[self.polls][0])

    @property
    def info(self) -> Any:
        return self.steps[self.polls][1]

    @property
    def result(self) -> Any:
        return self.steps[self.polls][1]


def test_follow_prints_each_epoch_once_and_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.9}
    digest = {
        "model": "m.h5",
        "sha256": "ab" * 32,
        "summary": "validation accuracy 0.90 vs majority baseline 0.60",
        "history": {k: [v] * 3 for k, v in metrics.items()},
    }
    steps = [
        ("PENDING", None),
        ("PROGRESS", {"epoch": 1, "epochs": 3, **metrics}),
        ("PROGRESS", {"epoch": 1, "epochs": 3, **metrics}),
        ("PROGRESS", {"epoch": 2, "epochs": 3, **metrics}),
        ("SUCCESS", digest),
    ]
    follow_training(FakeResult(steps), 3, timeout=None, interval=0)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out[:-1]] == ["1/3", "2/3", "3/3"]
    assert out[-1] == "validation accuracy 0.90 vs majority baseline 0.60"


def test_follow_reports_failure_and_timeout() -> None:
    import click

    with pytest.raises(click.ClickException, match="failure: LabelsError"):
        follow_training(FakeResult([("FAILURE", "LabelsError: no usable row")]), 3, None, 0)
    with pytest.raises(click.ClickException, match="still PENDING"):
        follow_training(FakeResult([("PENDING", None)]), 3, timeout=0.01, interval=0.005)
