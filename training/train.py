"""Training a model: labelled pictures -> ``<out>.h5`` + ``<out>.json`` + ``<out>.png``.

``train`` is the one training routine, called by ``genderscore train`` and by the
Celery task ``genderscore.train``. It splits users by class (seeded), augments the
training batches only, stops early on the validation loss with the best weights
restored, and writes, each atomically and in this order: the HDF5 model, its metadata
(what ``worker.model.load_bundle`` reads and checks), a PNG of the training curves and
the model's compiled twin (``training.export``, checked on the validation users, recorded
in the metadata).

TensorFlow is imported inside functions only.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from training.data import (
    LABEL_MAPPING,
    POSITIVE_CLASS,
    DataReport,
    LabelledPictures,
    TrainingError,
    load_labelled_pictures,
    make_augmentation,
    make_dataset,
    stratified_split,
    userids_fingerprint,
)
from training.network import feature_size, min_image_size
from worker.files import write_atomic
from worker.preprocess import PREPROCESSING_ID

log = logging.getLogger(__name__)

Progress = Callable[[int, dict[str, float]], None]  # (epoch from 1, metrics)
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
THRESHOLD = 0.5


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote and how good the model is."""

    model_path: Path
    metadata_path: Path
    curves_path: Path
    metadata: dict[str, Any]
    report: DataReport

    @property
    def val_accuracy(self) -> float:
        """Accuracy of the saved (best) weights on the validation users."""
        return float(self.metadata["val_accuracy"])

    @property
    def baseline_accuracy(self) -> float:
        """Accuracy of always predicting the majority class, on the same users."""
        return float(self.metadata["baseline_accuracy"])

    def summary(self) -> str:
        """``validation accuracy 0.xx vs majority baseline 0.yy``."""
        return (
            f"validation accuracy {self.val_accuracy:.2f} vs majority baseline "
            f"{self.baseline_accuracy:.2f}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able digest (the Celery task's result)."""
        meta = self.metadata
        return {
            "model": str(self.model_path),
            "metadata": str(self.metadata_path),
            "curves": str(self.curves_path),
            "sha256": meta["sha256"],
            "val_accuracy": meta["val_accuracy"],
            "val_loss": meta["val_loss"],
            "baseline_accuracy": meta["baseline_accuracy"],
            "majority_class": meta["majority_class"],
            "best_epoch": meta["best_epoch"],
            "epochs_run": len(meta["history"]["loss"]),
            "skipped": meta["skipped"],
            "history": meta["history"],
            "summary": self.summary(),
        }


def format_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """``epoch 3/25  loss 0.6012  accuracy 0.6800  val_loss 0.5900  val_accuracy 0.7000``."""
    values = "  ".join(f"{k} {metrics[k]:.4f}" for k in METRICS if k in metrics)
    return f"epoch {epoch}/{epochs}  {values}"


def device_description() -> str:
    """Where TensorFlow will train: the GPUs it sees, or ``CPU``."""
    from worker.model import configure_tensorflow

    configure_tensorflow()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return ", ".join(g.name for g in gpus) if gpus else "CPU"


def versions() -> dict[str, str]:
    """Versions of what shaped the model."""
    found = {}
    for name in ("tensorflow", "keras", "numpy", "pillow", "genderscore"):
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def check_options(
    out: Path, epochs: int, batch_size: int, image_size: int, kernel_size: int, patience: int
) -> None:
    """Refuse options that cannot train, before any picture is read."""
    if out.suffix != ".h5":
        raise TrainingError(f"the model path must end in .h5 (HDF5), not {out.name!r}")
    for name, value, low in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("kernel_size", kernel_size, 1),
        ("patience", patience, 0),
    ):
        if value < low:
            raise TrainingError(f"{name} must be at least {low}, not {value}")
    if feature_size(image_size, kernel_size) < 1:
        raise TrainingError(
            f"image_size {image_size} is too small for kernel_size {kernel_size}: "
            f"use at least {min_image_size(kernel_size)}"
        )


def train(
    images_dir: Path,
    labels_csv: Path,
    out: Path = Path("models/gender.h5"),
    epochs: int = 25,
    batch_size: int = 32,
    image_size: int = 150,
    val_fraction: float = 0.1,
    seed: int = 0,
    kernel_size: int = 4,
    optimizer: str = "rmsprop",
    patience: int = 5,
    progress: Progress | None = None,
) -> TrainResult:
    """Train the CNN on the labelled pictures and save it with metadata and curves.

    Raises ``worker.labels.LabelsError`` for an unusable label file and
    ``TrainingError`` for options or data that cannot train.
    """
    images_dir, labels_csv, out = Path(images_dir), Path(labels_csv), Path(out)
    check_options(out, epochs, batch_size, image_size, kernel_size, patience)
    data = load_labelled_pictures(images_dir, labels_csv, image_size)
    split = stratified_split(data.userids, data.targets, val_fraction, seed)

    from training.network import make_model

    model = make_model(image_size, kernel_size, optimizer, seed=seed)  # seeds TF, numpy
    import keras

    train_ds = make_dataset(
        data, split.train, batch_size, shuffle_seed=seed, augmentation=make_augmentation(seed)
    )
    val_ds = make_dataset(data, split.val, batch_size)
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    callbacks: list[Any] = [stopper]
    if progress is not None:
        report_epoch = progress
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: report_epoch(
                    epoch + 1, {k: float(v) for k, v in (logs or {}).items()}
                )
            )
        )
    log.info(
        "training on %d users (%d validation), %dx%d, batch %d, up to %d epochs",
        len(split.train),
        len(split.val),
        image_size,
        image_size,
        batch_size,
        epochs,
    )
    # shuffle=False: the dataset reshuffles itself, with its seed.
    fitted = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    )
    history = {k: [float(v) for v in fitted.history.get(k, [])] for k in METRICS}
    # The restored best weights, measured again: the numbers of the saved model.
    final = model.evaluate(val_ds, verbose=0, return_dict=True)

    metadata = build_metadata(
        data,
        split.train,
        split.val,
        history,
        final,
        int(stopper.best_epoch) + 1,
        params={
            "epochs": epochs,
            "batch_size": batch_size,
            "image_size": image_size,
            "kernel_size": kernel_size,
            "optimizer": optimizer,
            "seed": seed,
            "val_fraction": val_fraction,
            "patience": patience,
        },
    )
    from worker.model import metadata_path, save_model

    with warnings.catch_warnings():
        # HDF5 is the format the worker loads (and the origin used): deliberate, not legacy.
        warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
        written = save_model(model, out, metadata)
    curves = out.with_suffix(".png")
    write_curves(history, written["baseline_accuracy"], curves)
    from training.export import ExportError, export_twin

    try:  # the twin workers serve, checked on the validation users
        written = export_twin(
            out,
            pictures=data.pixels[split.val],
            calibration_source=f"validation split ({len(split.val)} users)",
        )
    except ExportError as exc:
        raise TrainingError(f"model saved to {out}, but its twin was not exported: {exc}") from None
    result = TrainResult(out, metadata_path(out), curves, written, data.report)
    log.info("model saved to %s (sha256 %s): %s", out, written["sha256"][:12], result.summary())
    return result


def build_metadata(
    data: LabelledPictures,
    train_idx: Any,
    val_idx: Any,
    history: dict[str, list[float]],
    final: dict[str, float],
    best_epoch: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The model's metadata, less what ``worker.model.save_model`` adds (format, size, sha256)."""
    train_counts, val_counts = data.class_counts(train_idx), data.class_counts(val_idx)
    # The baseline predicts the class most frequent in training, scored on validation.
    majority = max(sorted(train_counts), key=lambda c: train_counts[c])
    baseline = val_counts[majority] / max(1, sum(val_counts.values()))
    return {
        "preprocessing": PREPROCESSING_ID,
        "positive_class": POSITIVE_CLASS,
        "threshold": THRESHOLD,
        "label_mapping": LABEL_MAPPING,
        "class_counts": {"train": train_counts, "val": val_counts},
        "majority_class": majority,
        "baseline_accuracy": round(baseline, 6),
        "history": history,
        "best_epoch": best_epoch,
        "val_accuracy": round(float(final["accuracy"]), 6),
        "val_loss": round(float(final["loss"]), 6),
        "data": {
            "count": len(data.userids),
            "userids_sha256": userids_fingerprint(data.userids),
            "val_userids_sha256": userids_fingerprint([data.userids[i] for i in val_idx]),
        },
        "skipped": data.report.skipped_counts(),
        "versions": versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params,
    }


def write_curves(history: dict[str, list[float]], baseline: float, path: Path) -> None:
    """Accuracy and loss per epoch (train and validation), baseline as a line; atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    epochs = range(1, len(history["loss"]) + 1)
    for axes, metric in zip(figure.subplots(1, 2), ("accuracy", "loss"), strict=True):
        axes.plot(epochs, history[metric], marker="o", label=f"train {metric}")
        axes.plot(epochs, history[f"val_{metric}"], marker="o", label=f"validation {metric}")
        if metric == "accuracy":
            axes.axhline(
                baseline, color="grey", linestyle="--", label=f"majority baseline {baseline:.2f}"
            )
        axes.set_xlabel("epoch")
        axes.set_title(metric)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
