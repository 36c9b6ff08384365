"""Labelled pictures -> training and validation datasets.

Pictures are read in place from ``IMAGES_DIR/<userid>.jpg`` (nothing is copied into
class folders) and decoded by ``worker.preprocess.preprocess``, the very function the
scoring worker uses, so a model sees the same arrays in training and in scoring.
They are kept in memory as uint8 (a quarter of float32); ``to_inputs`` turns them back
into exactly the float32 arrays ``preprocess`` returned.

Labels are coded y = 1.0 for female, 0.0 for male (the course's coding), so the
network's sigmoid output is P(female). Unlike the origin, whose ``flow_from_directory``
sorted class folders and so learnt P(male), the mapping is written into the model's
metadata.

Labels are read by ``worker.labels.read_labels``, the one parser of the course's CSVs,
shared with ``genderscore collect --profiles``.

Nothing is fatal per user: a labelled user with no picture, a picture with no label and
an unreadable picture are counted in a ``DataReport``, shown at the end of training and
stored in the model's metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.ids import InvalidUserid, picture_path
from worker.labels import Labels, read_labels
from worker.preprocess import PictureError, load_picture, preprocess
from worker.settings import cpu_count

log = logging.getLogger(__name__)

POSITIVE_CLASS = "female"  # the sigmoid output is P(female)
TARGETS = {"male": 0.0, "female": 1.0}  # the course's 0/1 coding
LABEL_MAPPING: dict[str, Any] = {
    "sigmoid": "sigmoid output = P(female)",
    "codes": {"0": "male", "1": "female"},
}
# The origin's ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True).
SHEAR = 0.2
ZOOM = 0.2
SCALE = np.float32(1.0 / 255.0)  # the factor worker.preprocess.preprocess applies
REPORT_LIMIT = 20  # userids listed per problem in a report


class TrainingError(ValueError):
    """Data or options that cannot train a model; the message says what to change."""


@dataclass
class DataReport:
    """What was used and what was left out, and why."""

    labelled: int = 0
    used: int = 0
    label_skips: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    missing_picture: list[str] = field(default_factory=list)  # labelled, no picture
    unlabelled_picture: list[str] = field(default_factory=list)  # picture stems, no label
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)  # (userid, kind, msg)

    def skipped_counts(self) -> dict[str, int]:
        """Counts by reason, e.g. ``{"missing_picture": 3, "picture_corrupt": 1}``."""
        counts: Counter[str] = Counter(label_skip_reason(r) for _, r in self.label_skips)
        counts["missing_picture"] += len(self.missing_picture)
        counts["unlabelled_picture"] += len(self.unlabelled_picture)
        counts.update(f"picture_{kind}" for _, kind, _ in self.unreadable)
        return {reason: n for reason, n in sorted(counts.items()) if n}

    def lines(self) -> list[str]:
        """A human-readable report, a few examples per problem."""
        out = [f"{self.used} of {self.labelled} labelled users used for training"]
        if self.label_skips:
            out.append(f"{len(self.label_skips)} label rows skipped:")
            out += [f"  line {line}: {reason}" for line, reason in self.label_skips[:REPORT_LIMIT]]
        for title, ids in (
            ("labelled users with no picture", self.missing_picture),
            ("pictures with no label", self.unlabelled_picture),
        ):
            if ids:
                shown = ", ".join(ids[:REPORT_LIMIT])
                more = f" ... and {len(ids) - REPORT_LIMIT} more" if len(ids) > REPORT_LIMIT else ""
                out.append(f"{len(ids)} {title}: {shown}{more}")
        if self.unreadable:
            out.append(f"{len(self.unreadable)} unreadable pictures:")
            out += [f"  {uid}: {kind}: {msg}" for uid, kind, msg in self.unreadable[:REPORT_LIMIT]]
        return out


def label_skip_reason(reason: str) -> str:
    """A short tag for a ``read_labels`` skip reason (the reason text names the row)."""
    for needle, tag in (
        ("conflicting", "label_conflict"),
        ("duplicate", "label_duplicate"),
        ("invalid userid", "label_invalid_userid"),
        ("gender", "label_invalid_gender"),
        ("missing columns", "label_missing_columns"),
    ):
        if needle in reason:
            return tag
    return "label_other"


@dataclass
class LabelledPictures:
    """Decoded pictures of labelled users, sorted by userid."""

    userids: list[str]
    pixels: NDArray[np.uint8]  # (n, height, width, 3)
    targets: NDArray[np.float32]  # (n,) 1.0 = female, 0.0 = male
    report: DataReport

    def class_counts(self, indices: NDArray[np.intp] | None = None) -> dict[str, int]:
        """``{"female": n, "male": n}`` over ``indices`` (default: all)."""
        targets = self.targets if indices is None else self.targets[indices]
        female = int(np.count_nonzero(targets == TARGETS["female"]))
        return {"female": female, "male": int(len(targets)) - female}


def to_pixels(array: NDArray[np.float32]) -> NDArray[np.uint8]:
    """A ``preprocess`` output back to its uint8 pixels (exact: x = k/255 rounded)."""
    pixels: NDArray[np.uint8] = np.rint(array * np.float32(255.0)).astype(np.uint8)
    return pixels


def to_inputs(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    """uint8 pixels -> the float32 array ``preprocess`` returns for them, bit for bit."""
    return pixels.astype(np.float32) * SCALE


def _decode(
    images_dir: Path, userid: str, size_wh: tuple[int, int]
) -> NDArray[np.uint8] | PictureError:
    try:
        return to_pixels(preprocess(load_picture(picture_path(images_dir, userid)), size_wh))
    except PictureError as exc:
        return exc
    except InvalidUserid as exc:
        return PictureError("outside_folder", str(exc))


def unlabelled_pictures(images_dir: Path, labelled: set[str]) -> list[str]:
    """Stems of the ``*.jpg`` files of ``images_dir`` that have no label, sorted."""
    with os.scandir(images_dir) as entries:
        stems = [e.name[:-4] for e in entries if e.name.endswith(".jpg")]
    return sorted(s for s in stems if s not in labelled)


def load_labelled_pictures(
    images_dir: Path,
    labels: Labels | Path,
    image_size: int,
    workers: int | None = None,
) -> LabelledPictures:
    """Decode the picture of every labelled user into ``image_size`` squares.

    Raises LabelsError for a label file with no usable row and TrainingError when no
    picture at all could be used.
    """
    if not isinstance(labels, Labels):
        labels = read_labels(labels)
    if not images_dir.is_dir():
        raise TrainingError(f"picture folder {images_dir} does not exist or is not a folder")
    report = DataReport(labelled=len(labels.genders), label_skips=list(labels.skipped))
    report.unlabelled_picture = unlabelled_pictures(images_dir, set(labels.genders))
    userids = sorted(labels.genders)
    size_wh = (image_size, image_size)
    # Pillow releases the GIL while decoding: threads use every core.
    with ThreadPoolExecutor(max_workers=workers or min(8, cpu_count())) as pool:
        decoded = list(pool.map(lambda uid: _decode(images_dir, uid, size_wh), userids))
    used_ids: list[str] = []
    arrays: list[NDArray[np.uint8]] = []
    for userid, result in zip(userids, decoded, strict=True):
        if isinstance(result, PictureError):
            if result.kind == "missing":
                report.missing_picture.append(userid)
            else:
                report.unreadable.append((userid, result.kind, result.message))
        else:
            used_ids.append(userid)
            arrays.append(result)
    report.used = len(used_ids)
    if not used_ids:
        raise TrainingError(
            f"none of the {len(userids)} labelled users has a readable picture "
            f"<userid>.jpg in {images_dir} ({len(report.missing_picture)} missing, "
            f"{len(report.unreadable)} unreadable): check the folder and the label file"
        )
    pixels = np.stack(arrays)
    targets = np.array([TARGETS[labels.genders[u]] for u in used_ids], dtype=np.float32)
    log.info(
        "data: %d labelled users, %d used, %d without picture, %d unreadable, "
        "%d pictures without label, %d label rows skipped",
        report.labelled,
        report.used,
        len(report.missing_picture),
        len(report.unreadable),
        len(report.unlabelled_picture),
        len(report.label_skips),
    )
    return LabelledPictures(used_ids, pixels, targets, report)


@dataclass(frozen=True)
class Split:
    """Indices of the training and validation users."""

    train: NDArray[np.intp]
    val: NDArray[np.intp]


def stratified_split(
    userids: Sequence[str], targets: NDArray[np.float32], val_fraction: float, seed: int
) -> Split:
    """Split users by class in the same proportion; the same users and seed give the same split.

    Each class gives ``round(n * val_fraction)`` users to validation, at least one, and
    keeps at least one for training. The result does not depend on the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise TrainingError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if len(userids) != len(targets):
        raise ValueError("userids and targets differ in length")
    rng = np.random.default_rng(seed)
    by_id = np.argsort(np.asarray(userids, dtype=object), kind="stable")
    train: list[NDArray[np.intp]] = []
    val: list[NDArray[np.intp]] = []
    for name, code in sorted(TARGETS.items()):
        members = by_id[targets[by_id] == code]
        if len(members) < 2:
            raise TrainingError(
                f"only {len(members)} usable {name} pictures: a stratified split needs at "
                "least 2 of each class (one for training, one for validation)"
            )
        members = rng.permutation(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


def make_augmentation(seed: int | None = None) -> Any:
    """Random shear, zoom and horizontal flip, as the origin's ImageDataGenerator.

    Applied to training batches in the data pipeline only, never part of the saved model.
    The origin's ``shear_range=0.2`` was in degrees (next to nothing); here 0.2 is the
    shear factor of ``keras.layers.RandomShear``.
    """
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomZoom(ZOOM, fill_mode="nearest", seed=None if seed is None else seed + 1),
            layers.RandomShear(
                x_factor=SHEAR, fill_mode="nearest", seed=None if seed is None else seed + 2
            ),
        ],
        name="augmentation",
    )


def make_dataset(
    data: LabelledPictures,
    indices: NDArray[np.intp],
    batch_size: int,
    shuffle_seed: int | None = None,
    augmentation: Any = None,
) -> Any:
    """A ``tf.data.Dataset`` of ``(inputs, targets)`` batches for ``indices``.

    ``shuffle_seed`` reshuffles each epoch (reproducibly); ``augmentation`` (a Keras
    layer) is applied to whole batches after scaling.
    """
    import tensorflow as tf

    pixels = data.pixels[indices]
    targets = data.targets[indices].reshape(-1, 1)
    dataset = tf.data.Dataset.from_tensor_slices((pixels, targets))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)

    def scale(x: Any, y: Any) -> tuple[Any, Any]:
        # The same float32 multiply as worker.preprocess.preprocess: bit-identical inputs.
        return tf.cast(x, tf.float32) * tf.constant(SCALE), y

    dataset = dataset.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
    if augmentation is not None:
        # Sequential map: the layers' random state advances in one order, so a seed
        # gives the same augmented batches every run.
        dataset = dataset.map(lambda x, y: (augmentation(x, training=True), y))
    return dataset.prefetch(tf.data.AUTOTUNE)


def userids_fingerprint(userids: Sequence[str]) -> str:
    """sha256 of the sorted userids joined with newlines: which users a model saw."""
    return hashlib.sha256("\n".join(sorted(userids)).encode()).hexdigest()
