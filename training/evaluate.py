"""Scoring output versus known labels: accuracy, majority baseline and confusion matrix.

The scored CSV is what ``genderscore collect`` writes (``userid,gender,p_female,model,
scored_at``, gender ``female``/``male``; a filled-in profile.csv works too); the labels
are a ``userid,gender`` CSV or the course's profile.csv. Both are read by
``worker.labels.read_labels`` (the known exception to the rule that training
imports only ``worker``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.labels import read_labels

CLASSES = ("male", "female")  # row and column order of the confusion matrix


class EvaluationError(ValueError):
    """Predictions and labels that cannot be compared; the message says why."""


@dataclass(frozen=True)
class Evaluation:
    """Predictions compared with labels, over the users that have both."""

    compared: int
    correct: int
    confusion: tuple[tuple[int, int], tuple[int, int]]  # [true][predicted], CLASSES order
    majority_class: str  # most frequent true class among the compared users
    missing_predictions: int  # labelled users with no prediction
    unlabelled_predictions: int  # predictions for users with no label
    skipped_rows: int  # unusable rows of both files

    @property
    def accuracy(self) -> float:
        """Share of compared users predicted right."""
        return self.correct / self.compared

    @property
    def baseline_accuracy(self) -> float:
        """Accuracy of predicting the majority class for every compared user."""
        row = self.confusion[CLASSES.index(self.majority_class)]
        return sum(row) / self.compared


def evaluate(scored_csv: Path, labels_csv: Path) -> Evaluation:
    """Compare a scored CSV with a label file (LabelsError for an unusable file)."""
    predicted = read_labels(scored_csv)
    truth = read_labels(labels_csv)
    common = sorted(set(predicted.genders) & set(truth.genders))
    if not common:
        raise EvaluationError(
            f"no userid is in both {scored_csv} ({len(predicted.genders)} predictions) and "
            f"{labels_csv} ({len(truth.genders)} labels): are they the same users?"
        )
    matrix = [[0, 0], [0, 0]]
    for userid in common:
        matrix[CLASSES.index(truth.genders[userid])][CLASSES.index(predicted.genders[userid])] += 1
    totals = {name: sum(matrix[i]) for i, name in enumerate(CLASSES)}
    # Ties go to "female", the course's majority class.
    majority = max(reversed(CLASSES), key=lambda name: totals[name])
    return Evaluation(
        compared=len(common),
        correct=matrix[0][0] + matrix[1][1],
        confusion=((matrix[0][0], matrix[0][1]), (matrix[1][0], matrix[1][1])),
        majority_class=majority,
        missing_predictions=len(set(truth.genders) - set(predicted.genders)),
        unlabelled_predictions=len(set(predicted.genders) - set(truth.genders)),
        skipped_rows=len(predicted.skipped) + len(truth.skipped),
    )


def format_evaluation(ev: Evaluation) -> str:
    """A short text report: accuracy against the baseline, then the confusion matrix."""
    width = max(len(c) for c in CLASSES) + 2
    lines = [
        f"users compared: {ev.compared}",
        f"accuracy: {ev.accuracy:.4f} ({ev.correct}/{ev.compared})",
        f"majority baseline ({ev.majority_class}): {ev.baseline_accuracy:.4f}",
        "",
        "confusion matrix (rows: true, columns: predicted)",
        " " * (width + 6) + "".join(f"{c:>{width}}" for c in CLASSES),
    ]
    for name, row in zip(CLASSES, ev.confusion, strict=True):
        lines.append(f"{'true ' + name:<{width + 6}}" + "".join(f"{n:>{width}}" for n in row))
    if ev.missing_predictions:
        lines.append(f"labelled users with no prediction: {ev.missing_predictions}")
    if ev.unlabelled_predictions:
        lines.append(f"predictions with no label: {ev.unlabelled_predictions}")
    if ev.skipped_rows:
        lines.append(f"unusable rows skipped: {ev.skipped_rows}")
    return "\n".join(lines)
