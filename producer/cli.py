"""The ``genderscore`` command: one click group, one verb per job.

Scoring verbs (score, collect, report, status, reconcile) import neither TensorFlow nor the
training package, except ``score --local``, which scores in-process. The training
verbs (train, evaluate) import ``training`` when they run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import redis

from worker.settings import SettingsError

if TYPE_CHECKING:
    from producer.collect import RunData

log = logging.getLogger("genderscore")


def _settings() -> Any:
    try:
        from worker.settings import settings
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return settings


def _redis() -> redis.Redis:
    from worker.results import RedisUnavailable, connect_checked

    _settings()
    try:
        return connect_checked()
    except RedisUnavailable as exc:
        raise click.ClickException(str(exc)) from None


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    click.echo(f"skipped {len(skipped)} files:", err=True)
    for name, reason in skipped[:50]:
        click.echo(f"  {name!a}: {reason}", err=True)
    if len(skipped) > 50:
        click.echo(f"  ... and {len(skipped) - 50} more", err=True)


class Cli(click.Group):
    """The command group; Redis faults become one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, translating Redis errors into messages a user can act on."""
        try:
            return super().invoke(ctx)
        except redis.OutOfMemoryError as exc:
            raise click.ClickException(
                f"Redis is full (OOM: {exc}); nothing was evicted. Free memory or raise "
                "maxmemory, then run the command again (`genderscore reconcile` repairs a run)"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise click.ClickException(
                f"lost the connection to Redis ({exc}); run the command again once it is back "
                "(`genderscore reconcile RUN_ID` re-enqueues what a run is missing)"
            ) from None


@click.group(cls=Cli)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """genderscore: predict gender from profile pictures with a Keras CNN."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("absl", "tensorflow", "h5py", "PIL", "matplotlib"):  # their INFO is noise
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy == "absl" else logging.WARNING)


@main.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="Model .h5 (GENDERSCORE_MODEL).")
@click.option("--run-id", help="Run id (default: a new one); reusing one extends that run.")
@click.option("--wait", is_flag=True, help="Follow the run with a progress bar, then collect.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write.")
@click.option("--local", is_flag=True, help="Score in this process, without Redis or workers.")
@click.option(
    "--only-new", is_flag=True, help="Skip pictures this model already scored, unchanged."
)
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
def score(
    images_dir: Path,
    model: Path | None,
    run_id: str | None,
    wait: bool,
    out: Path | None,
    local: bool,
    only_new: bool,
    timeout: float | None,
) -> None:
    """Score every <userid>.jpg (.jpeg, .png, .webp) of IMAGES_DIR; prints the run id."""
    from producer.scan import scan_pictures

    settings = _settings()
    model_path = model or settings.model
    scan = scan_pictures(images_dir)
    _report_skipped(scan.skipped)
    if local:
        from producer.collect import write_outputs
        from producer.local import score_local
        from worker.model import ModelError

        try:
            data = score_local(model_path, scan.images_dir, scan.pictures)
        except ModelError as exc:
            raise click.ClickException(str(exc)) from None
        target = out or Path("out") / "local.csv"
        written = write_outputs(data, target)
        click.echo(
            f"scored {written.scored}, errors {written.errors}: {written.csv_path}", err=True
        )
        click.echo(str(written.csv_path))
        return
    from producer.enqueue import enqueue_run
    from producer.newness import only_new_pictures
    from worker.celery import app
    from worker.model import ModelError, check_model_file
    from worker.results import RunConflict
    from worker.sources import FolderSource

    try:
        sha = check_model_file(model_path)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    client = _redis()
    pictures = scan.pictures
    if only_new:
        pictures, unchanged = only_new_pictures(client, sha, scan.images_dir, pictures)
        click.echo(
            f"--only-new: {unchanged} pictures already scored by this model, skipped", err=True
        )
    try:
        result = enqueue_run(
            app, client, FolderSource(scan.images_dir).spec, pictures, model_path, sha, run_id
        )
    except RunConflict as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"run {result.run_id}: {result.published} tasks enqueued"
        + (f", {result.already_in_run} already in the run" if result.already_in_run else ""),
        err=True,
    )
    click.echo(result.run_id)
    if wait:
        _wait_and_collect(client, result.run_id, out, timeout)


def _wait_and_collect(
    client: redis.Redis, run_id: str, out: Path | None, timeout: float | None
) -> None:
    from producer.collect import IncompleteRun, collect
    from producer.follow import follow_run
    from worker.celery import app

    try:
        follow_run(app, client, run_id, timeout=timeout)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    target = out or Path("out") / f"{run_id}.csv"
    try:
        written = collect(client, run_id, target)
    except IncompleteRun as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"scored {written.scored}, errors {written.errors}: {written.csv_path}", err=True)


@main.command(name="collect")
@click.argument("run_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="User-profile CSV to write (optional with --xml).",
)
@click.option(
    "--profiles",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Course profile.csv to fill in (keeps all its rows and columns).",
)
@click.option("--partial", is_flag=True, help="Write what there is even if the run is incomplete.")
@click.option(
    "--xml",
    "xml_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the course's <userid>.xml files into this folder.",
)
@click.option(
    "--baseline",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --xml: training profile.csv for age group and traits (course means).",
)
def collect_cmd(
    run_id: str,
    out: Path | None,
    profiles: Path | None,
    partial: bool,
    xml_dir: Path | None,
    baseline: Path | None,
) -> None:
    """Write the user-profile CSV of RUN_ID (and <name>.errors.csv beside it), the course's
    <userid>.xml files, or both."""
    from producer.collect import IncompleteRun, write_outputs
    from producer.course_xml import read_baseline, write_course_xml
    from worker.ids import InvalidUserid
    from worker.labels import LabelsError

    if out is None and xml_dir is None:
        raise click.UsageError("give --out CSV, --xml DIR, or both")
    if out is None and profiles is not None:
        raise click.UsageError("--profiles fills in the CSV: it needs --out")
    if xml_dir is None and baseline is not None:
        raise click.UsageError("--baseline is for the XML files: it needs --xml")
    client = _redis()
    try:
        chosen = read_baseline(baseline) if baseline else None
        data = _load_run(client, run_id, partial)
        if out is not None:
            written = write_outputs(data, out, profiles)
            click.echo(
                f"scored {written.scored}, errors {written.errors}"
                + (f", missing {written.missing}" if written.missing else "")
                + f": {written.csv_path} ({written.errors_path.name})",
                err=True,
            )
            click.echo(str(written.csv_path))
        if xml_dir is not None:
            count = write_course_xml(data, xml_dir, chosen)
            click.echo(f"{count} XML files in {xml_dir}", err=True)
            click.echo(str(xml_dir))
    except (IncompleteRun, KeyError, LabelsError, InvalidUserid) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


def _load_run(client: redis.Redis, run_id: str, partial: bool) -> RunData:
    """The run's data; an incomplete run is refused unless ``partial``."""
    from producer.collect import IncompleteRun, load_run

    data = load_run(client, run_id)
    if data.missing and not partial:
        raise IncompleteRun(run_id, len(data.missing))
    return data


@main.command()
@click.argument("run_id")
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="userid,gender CSV or the course's profile.csv: adds accuracy.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write index.html into.",
)
@click.option("--partial", is_flag=True, help="Report on a run that is not complete yet.")
def report(run_id: str, labels: Path | None, out: Path, partial: bool) -> None:
    """Write an HTML report of RUN_ID: facts, plots, errors and, with --labels, accuracy."""
    from producer.collect import IncompleteRun
    from producer.report import build_report
    from worker.labels import LabelsError, read_labels
    from worker.model import ModelError, read_metadata

    client = _redis()
    try:
        data = _load_run(client, run_id, partial)
        model_meta = None
        if data.meta.get("model"):
            try:
                metadata = read_metadata(Path(data.meta["model"]))
                model_meta = metadata.model_dump() if metadata else None
            except ModelError as exc:
                log.warning("%s", exc)
        if model_meta is None:
            log.warning(
                "no metadata for model %s: created_at and validation accuracy unknown",
                data.meta.get("model", "?"),
            )
        genders = None
        if labels is not None:
            parsed = read_labels(labels)
            if parsed.skipped:
                click.echo(f"{labels}: {len(parsed.skipped)} rows skipped", err=True)
            genders = parsed.genders
        path = build_report(
            data, out, genders, model_meta, labels_name=labels.name if labels else None
        )
    except (IncompleteRun, KeyError, LabelsError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
    click.echo(str(path))


@main.command()
@click.argument("run_id", required=False)
@click.option("--limit", default=10, show_default=True, help="Runs to show.")
def status(run_id: str | None, limit: int) -> None:
    """Runs (total / done / errors / pending), queues, workers and training tasks."""
    from producer.status import render_status

    click.echo(render_status(_redis(), run_id, limit))


@main.command()
@click.argument("run_id")
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Picture folder, when Redis lost the run's metadata.",
)
@click.option("--model", type=click.Path(path_type=Path), help="Model, when Redis lost it.")
def reconcile(run_id: str, images: Path | None, model: Path | None) -> None:
    """Re-enqueue every userid of RUN_ID with neither a prediction nor an error."""
    from producer.reconcile import ReconcileError, reconcile_run
    from worker.celery import app

    try:
        count = reconcile_run(app, _redis(), run_id, images, model)
    except ReconcileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"run {run_id}: {count} userids re-enqueued", err=True)
    click.echo(str(count))


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Where the demo writes everything.",
)
@click.option("--count", default=400, show_default=True, help="Sample pictures to generate.")
@click.option("--epochs", default=6, show_default=True, help="Training epochs.")
def demo(workdir: Path, count: int, epochs: int) -> None:
    """Run the whole job on generated pictures: sample, train, score through Celery, CSV."""
    from producer.demo import run_demo

    try:
        result = run_demo(workdir.resolve(), count, epochs)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.summary, err=True)
    click.echo(f"model: {result.model_path}", err=True)
    click.echo(f"run {result.run_id}: scored CSV written to", err=True)
    click.echo(str(result.csv_path))


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--served",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The served name to point at MODEL (default: GENDERSCORE_MODEL).",
)
def promote(model: Path, served: Path | None) -> None:
    """Serve MODEL, a trained version in the models folder: GENDERSCORE_MODEL links to it."""
    from worker.model import ModelError, promote_model

    target = served or _settings().model
    try:
        sha = promote_model(model, target)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{target} -> {model.name} (sha256 {sha[:12]})", err=True)


def _register_training() -> None:
    from training.cli import evaluate, export, train

    main.add_command(train)
    main.add_command(export)
    main.add_command(evaluate)


def _register_metrics() -> None:
    from producer.metrics import metrics

    main.add_command(metrics)


_register_training()
_register_metrics()


if __name__ == "__main__":
    main()
