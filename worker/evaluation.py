"""Predictions against known labels: the one evaluation of ``report`` and ``evaluate``.

``evaluate`` compares a frame of predictions (``userid``, ``gender`` and, when known,
``p_female``) with labels, on the users that have both (a pandas merge): accuracy,
the majority-class baseline on the same users (ties go to "female", the course's
majority), the confusion matrix and, given ``p_female``, accuracy per confidence
band ``|p_female - 0.5|``. ``genderscore report`` feeds it a run's predictions;
``genderscore evaluate`` a scored CSV (``read_scored``). The labels are read by
``worker.labels.read_labels`` (``userid,gender`` or the course's profile.csv).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from worker.files import unneutralise
from worker.ids import USERID_RE
from worker.labels import LabelsError, parse_gender, read_labels

GENDERS = ("female", "male")  # row and column order of the confusion matrix
BAND_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # |p_female - 0.5|


class EvaluationError(ValueError):
    """Predictions and labels that cannot be compared; the message says why."""


@dataclass(frozen=True)
class Band:
    """Users whose |p_female - 0.5| lies in [low, high) (the last band includes 0.5)."""

    low: float
    high: float
    users: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        """Share of correct predictions in the band; None when it is empty."""
        return self.correct / self.users if self.users else None


@dataclass(frozen=True)
class Evaluation:
    """Predictions compared with labels, over the users that have both."""

    users: int  # labelled users with a prediction: the ones compared
    correct: int
    majority_class: str  # most frequent true class among the compared users
    majority_users: int
    confusion: dict[tuple[str, str], int]  # (true, predicted) -> users
    bands: list[Band]  # empty when p_female is not known
    labels_total: int
    missing_predictions: int  # labelled users with no prediction
    labelled_errors: int  # of those, users whose picture is an error record
    unlabelled: int  # predictions for users with no label
    skipped_rows: int = 0  # unusable rows of the files read

    @property
    def accuracy(self) -> float:
        """Share of compared users predicted right."""
        return self.correct / self.users

    @property
    def majority_accuracy(self) -> float:
        """Accuracy of predicting the majority class for every compared user."""
        return self.majority_users / self.users


def band_index(p_female: float) -> int:
    """Which confidence band a prediction falls in."""
    return int(band_indexes(pd.Series([p_female]))[0])


def band_indexes(p_female: pd.Series) -> np.ndarray:
    """Band of each prediction (p is stored to 6 decimals: 0.6 is band 0.1-0.2)."""
    distance = (p_female.astype(float) - 0.5).abs().round(6).to_numpy()
    inner = np.array(BAND_EDGES[1:-1])
    return np.searchsorted(inner, distance, side="right")


def evaluate(
    predicted: pd.DataFrame,
    labels: Mapping[str, str],
    errors: Collection[str] = (),
    skipped_rows: int = 0,
    what: str = "the predictions",
) -> Evaluation:
    """Accuracy, majority baseline, confusion matrix and bands of ``predicted``."""
    truth = pd.DataFrame(
        {"userid": pd.array(list(labels), dtype="str"), "truth": list(labels.values())}
    )
    columns = ["userid", "gender"] + (["p_female"] if "p_female" in predicted else [])
    merged = predicted[columns].merge(truth, on="userid", how="inner", validate="one_to_one")
    if merged.empty:
        raise EvaluationError(
            f"no userid is in both {what} ({len(predicted)} predictions) and the labels "
            f"({len(labels)} labels): are they the same users?"
        )
    right = merged["truth"] == merged["gender"]
    crosstab = pd.crosstab(merged["truth"], merged["gender"]).reindex(
        index=list(GENDERS), columns=list(GENDERS), fill_value=0
    )
    cells = crosstab.to_numpy()
    confusion = {
        (t, g): int(cells[i, j]) for i, t in enumerate(GENDERS) for j, g in enumerate(GENDERS)
    }
    counts = merged["truth"].value_counts()
    # Ties go to "female": GENDERS order, and max() keeps the first of equals.
    majority = max(GENDERS, key=lambda g: int(counts.get(g, 0)))
    bands: list[Band] = []
    if "p_female" in merged:
        index = band_indexes(merged["p_female"])
        for i in range(len(BAND_EDGES) - 1):
            inside = index == i
            bands.append(
                Band(
                    BAND_EDGES[i],
                    BAND_EDGES[i + 1],
                    int(inside.sum()),
                    int(right.to_numpy()[inside].sum()),
                )
            )
    labelled = set(labels)
    predicted_ids = set(predicted["userid"])
    return Evaluation(
        users=len(merged),
        correct=int(right.sum()),
        majority_class=majority,
        majority_users=int(counts.get(majority, 0)),
        confusion=confusion,
        bands=bands,
        labels_total=len(labels),
        missing_predictions=len(labelled - predicted_ids),
        labelled_errors=len(labelled & set(errors)),
        unlabelled=len(predicted_ids - labelled),
        skipped_rows=skipped_rows,
    )


def read_scored(path: Path) -> tuple[pd.DataFrame, int]:
    """A scored CSV (``collect``'s, or a filled-in profile.csv) -> predictions, rows skipped.

    Gender may be written as words or in the course's coding; userids neutralised
    against spreadsheet formulas (``'-A1``) are read back as they are.
    """
    try:
        table = pd.read_csv(path, dtype="str", keep_default_na=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise LabelsError(f"cannot read {path}: {exc}") from None
    table.columns = pd.Index([str(c).strip() for c in table.columns])
    for name in ("userid", "gender"):
        if name not in table.columns:
            raise LabelsError(f"no '{name}' column (columns: {', '.join(table.columns)})")
    userid = table["userid"].str.strip().map(unneutralise).astype("str")
    gender = table["gender"].map(parse_gender)
    usable = userid.str.fullmatch(USERID_RE.pattern) & gender.notna()
    frame = pd.DataFrame({"userid": userid, "gender": gender})
    if "p_female" in table.columns:
        p_female = pd.to_numeric(table["p_female"], errors="coerce")
        frame["p_female"] = p_female
        usable &= p_female.between(0.0, 1.0)
    frame = frame[usable.fillna(False).astype(bool)].drop_duplicates(["userid", "gender"])
    conflicting = frame["userid"].duplicated(keep=False)  # both rows are dropped
    kept = frame[~conflicting].reset_index(drop=True)
    return kept, len(table) - len(kept)


def evaluate_files(scored_csv: Path, labels_csv: Path) -> Evaluation:
    """Compare a scored CSV with a label file (LabelsError for an unusable file)."""
    predicted, skipped = read_scored(scored_csv)
    truth = read_labels(labels_csv)
    return evaluate(
        predicted,
        truth.genders,
        skipped_rows=skipped + len(truth.skipped),
        what=str(scored_csv),
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_evaluation(ev: Evaluation) -> str:
    """A short text report: accuracy against the baseline, the confusion matrix, bands."""
    width = max(len(g) for g in GENDERS) + 2
    lines = [
        f"users compared: {ev.users}",
        f"accuracy: {ev.accuracy:.4f} ({ev.correct}/{ev.users})",
        f"majority baseline ({ev.majority_class}): {ev.majority_accuracy:.4f}",
        "",
        "confusion matrix (rows: true, columns: predicted)",
        " " * (width + 6) + "".join(f"{g:>{width}}" for g in GENDERS),
    ]
    for truth in GENDERS:
        cells = "".join(f"{ev.confusion[(truth, g)]:>{width}}" for g in GENDERS)
        lines.append(f"{'true ' + truth:<{width + 6}}" + cells)
    if ev.bands:
        lines += ["", "accuracy per confidence band |p_female - 0.5|"]
        lines += [
            f"  {b.low:.1f}-{b.high:.1f}  users {b.users:>6}  accuracy {_pct(b.accuracy)}"
            for b in ev.bands
        ]
    if ev.missing_predictions:
        lines.append(f"labelled users with no prediction: {ev.missing_predictions}")
    if ev.unlabelled:
        lines.append(f"predictions with no label: {ev.unlabelled}")
    if ev.skipped_rows:
        lines.append(f"unusable rows skipped: {ev.skipped_rows}")
    return "\n".join(lines)
