"""``genderscore train``, ``export`` and ``evaluate`` (added to the group in producer.cli).

Training runs here, or with ``--submit`` on a training worker, followed epoch by epoch.
This module imports quickly: TensorFlow, Celery and the training code load inside the
commands that need them. Label errors are ``worker.labels.LabelsError`` (the known
exception to training's import rule, see ``training.data``). Failures exit with the
codes of ``worker.exits``: 2 for unusable labels or options, 3 when Redis is
unreachable, 4 when following a submitted task timed out, 1 when training failed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from training.network import OPTIMIZERS
from worker.exits import BadInput, Failure, Incomplete, ModelProblem, Unreachable

POLL_SECONDS = 1.0
WORKER_HINT_SECONDS = 10.0  # say how to start a training worker after this long PENDING


def _epoch_line(epochs: int) -> Any:
    from training.train import format_epoch

    def show(epoch: int, metrics: dict[str, float]) -> None:
        click.echo(format_epoch(epoch, epochs, metrics))

    return show


@click.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model .h5 (default: a new version <models>/<name>-<time>.h5); <name>.json "
    "(metadata) and <name>.png (curves) go beside it. Never the served model: see promote.",
)
@click.option(
    "--name",
    default="gender",
    show_default=True,
    help="Name of the new version in the models folder (GENDERSCORE_MODEL's folder).",
)
@click.option(
    "--epochs",
    default=25,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most epochs (training stops early when val_loss stops improving).",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--image-size",
    default=150,
    show_default=True,
    type=click.IntRange(min=8),
    help="Pictures are resized to this square.",
)
@click.option(
    "--val-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each class held out for validation.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seeds the split, the shuffling, the augmentation and the weights.",
)
@click.option("--kernel-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--optimizer", default="rmsprop", show_default=True, type=click.Choice(OPTIMIZERS))
@click.option(
    "--patience",
    default=5,
    show_default=True,
    type=click.IntRange(min=0),
    help="Epochs without a better val_loss before stopping.",
)
@click.option(
    "--submit",
    is_flag=True,
    help="Train on a training worker (queue 'training') and follow it here.",
)
@click.option(
    "--timeout", type=float, help="With --submit: stop following after this many seconds."
)
def train(
    images_dir: Path,
    labels_csv: Path,
    out: Path | None,
    name: str,
    epochs: int,
    batch_size: int,
    image_size: int,
    val_fraction: float,
    seed: int,
    kernel_size: int,
    optimizer: str,
    patience: int,
    submit: bool,
    timeout: float | None,
) -> None:
    """Train the CNN on IMAGES_DIR/<userid>.jpg labelled by LABELS_CSV (userid,gender)."""
    options: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": batch_size,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "kernel_size": kernel_size,
        "optimizer": optimizer,
        "patience": patience,
    }
    from worker.model import ModelError, versioned_model_path
    from worker.settings import settings

    if submit:
        if out is not None:
            raise click.UsageError(
                "--out is for training here; a training worker writes a new version "
                "<models>/<name>-<time>.h5 (see --name)"
            )
        _submit(images_dir, labels_csv, name, options, timeout)
        return
    try:
        out = out or versioned_model_path(name)
    except ModelError as exc:
        raise ModelProblem(str(exc)) from None
    served = settings.model
    if out.absolute() in (served.absolute(), served.resolve()):
        raise BadInput(
            f"{out} is the served model: train a new version, then `genderscore promote` it"
        )
    from worker.logs import import_tensorflow

    import_tensorflow()  # before training's imports, so that its C++ lines stay quiet
    from training.data import TrainingError
    from training.train import train as train_model
    from worker.labels import LabelsError

    try:
        result = train_model(images_dir, labels_csv, out, progress=_epoch_line(epochs), **options)
    except (LabelsError, TrainingError) as exc:
        raise BadInput(str(exc)) from None
    for line in result.report.lines():
        click.echo(line, err=True)
    click.echo(
        f"model {result.model_path}, metadata {result.metadata_path.name}, "
        f"curves {result.curves_path.name}; serve it with `genderscore promote "
        f"{result.model_path}`",
        err=True,
    )
    from training.export import describe

    for line in describe(result.metadata):
        click.echo(f"twin {line}", err=True)
    click.echo(result.summary())


def _submit(
    images_dir: Path, labels_csv: Path, name: str, options: dict[str, Any], timeout: float | None
) -> None:
    """Send ``genderscore.train`` to the training queue and follow it to the end."""

    from training.tasks import TASK_NAME, ProgressRecorder
    from worker.celery import TRAINING_QUEUE, app
    from worker.labels import LabelsError, read_labels
    from worker.results import RedisUnavailable, connect_checked
    from worker.settings import settings

    try:  # fail here, not hours later on the worker
        read_labels(labels_csv)
    except LabelsError as exc:
        raise BadInput(str(exc)) from None
    from worker.model import MODEL_NAME_RE

    if MODEL_NAME_RE.fullmatch(name) is None:
        raise click.UsageError(f"--name {name!a}: expected [A-Za-z0-9_-]{{1,64}}")
    try:
        client = connect_checked()
    except RedisUnavailable as exc:
        raise Unreachable(str(exc)) from None
    # Absolute paths: the worker resolves them, not this shell's working directory.
    args = [str(images_dir.resolve()), str(labels_csv.resolve()), name]
    result = app.send_task(TASK_NAME, args=args, kwargs=options, queue=TRAINING_QUEUE)
    ProgressRecorder(client, result.id, options["epochs"]).write(
        {"state": "PENDING", "epoch": 0, "epochs": options["epochs"], "name": name}
    )
    click.echo(
        f"training task {result.id} sent to queue '{TRAINING_QUEUE}' ({settings.key_prefix})",
        err=True,
    )
    follow_training(result, options["epochs"], timeout)


def follow_training(
    result: Any, epochs: int, timeout: float | None, interval: float = POLL_SECONDS
) -> dict[str, Any]:
    """Print each new epoch of a training task until it ends; return its result."""
    from training.train import format_epoch

    start = time.monotonic()
    shown = 0
    hinted = False
    while True:
        state = result.state
        info = result.info
        if state == "PROGRESS" and isinstance(info, dict) and int(info.get("epoch", 0)) > shown:
            shown = int(info["epoch"])
            metrics = {k: float(v) for k, v in info.items() if k not in ("epoch", "epochs")}
            click.echo(format_epoch(shown, int(info.get("epochs", epochs)), metrics))
        elif state == "SUCCESS":
            digest: dict[str, Any] = result.result
            history = digest.get("history", {})
            for epoch in range(shown + 1, len(history.get("loss", [])) + 1):  # missed polls
                metrics = {k: values[epoch - 1] for k, values in history.items()}
                click.echo(format_epoch(epoch, epochs, metrics))
            for line in digest.get("report", []):
                click.echo(line, err=True)
            click.echo(
                f"model {digest['model']} (sha256 {digest['sha256'][:12]}, "
                f"trained on {digest.get('device', '?')})",
                err=True,
            )
            click.echo(digest["summary"])
            return digest
        elif state in ("FAILURE", "REVOKED"):
            raise Failure(f"training task {result.id} {state.lower()}: {info}")
        elapsed = time.monotonic() - start
        if state == "PENDING" and not hinted and elapsed > WORKER_HINT_SECONDS:
            hinted = True
            click.echo(
                "still pending: is a training worker running? "
                "(celery -A worker worker -Q training -c 1)",
                err=True,
            )
        if timeout is not None and elapsed > timeout:
            raise Incomplete(
                f"training task {result.id} is still {state} after {timeout:g}s; it goes on "
                "without you: see `genderscore status`"
            )
        time.sleep(interval)


@click.command()
@click.argument("scored_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def evaluate(scored_csv: Path, labels_csv: Path) -> None:
    """Accuracy of SCORED_CSV (from collect) against LABELS_CSV, with the majority baseline."""
    from worker.evaluation import EvaluationError, evaluate_files, format_evaluation
    from worker.labels import LabelsError

    try:
        result = evaluate_files(scored_csv, labels_csv)
    except (LabelsError, EvaluationError) as exc:
        raise BadInput(str(exc)) from None
    click.echo(format_evaluation(result))


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(("f32", "bf16", "int8")),
    help="Precisions to check (repeatable; default all). f32 is always exported.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Pictures like those you will score (the checks run on them; int8 is fitted on them).",
)
def export(model: Path, precisions: tuple[str, ...], calibration: Path) -> None:
    """Compile MODEL.h5's twin (OpenVINO, ONNX) beside it and record it in MODEL.json."""
    from training.export import ExportError, describe, export_twin
    from worker.model import ModelError

    try:
        meta = export_twin(model, calibration_dir=calibration, precisions=precisions or None)
    except (ExportError, ModelError) as exc:
        raise ModelProblem(str(exc)) from None
    for line in describe(meta):
        click.echo(line)
