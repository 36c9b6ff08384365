"""The ``genderscore`` command: one click group, one verb per job.

Scoring verbs (score, collect, report, status, reconcile, runs) import neither
TensorFlow nor the training package, except ``score --local``, which scores
in-process. The training verbs (train, evaluate) import ``training`` when they run.
Importing this module reads no setting: ``--help``, ``--version`` and usage errors
work whatever the environment holds, and a command that needs an invalid setting
fails with one line and exit status 2.

Every failure is one line and an exit code of its kind (``worker.exits``): the
group translates the exceptions of the layers below (``_FAILURES``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import redis

from worker.exits import BadInput, Failure, Incomplete, ModelProblem, Unreachable
from worker.settings import SettingsError

if TYPE_CHECKING:
    from producer.collect import RunData
    from producer.manifest import Refused
    from producer.sources import RunPictures
    from worker.settings import Settings

log = logging.getLogger("genderscore")
CONTEXT = {"help_option_names": ["-h", "--help"]}
_HELP_ASKED = "genderscore.help_asked"

# Exceptions of the layers below -> the failure they are for the user, found by name so
# that a module is never imported just to test an exception against its class.
_FAILURES: tuple[tuple[str, str, type[Failure]], ...] = (
    ("worker.settings", "SettingsError", BadInput),
    ("worker.results", "RedisUnavailable", Unreachable),
    ("kombu.exceptions", "OperationalError", Unreachable),
    ("worker.broker", "BrokerRefused", Unreachable),
    ("worker.fetch", "Unavailable", Unreachable),
    ("producer.localredis", "LocalRedisError", Unreachable),
    ("worker.model", "ModelError", ModelProblem),
    ("producer.collect", "IncompleteRun", Incomplete),
    ("producer.collect", "LostIds", Incomplete),
    ("producer.follow", "RunCancelled", Incomplete),
    ("worker.results", "UnknownRun", BadInput),
    ("worker.results", "RunConflict", BadInput),
    ("worker.labels", "LabelsError", BadInput),
    ("worker.ids", "InvalidUserid", BadInput),
    ("worker.evaluation", "EvaluationError", BadInput),
    ("producer.sources", "StoreUnreachable", Unreachable),
    ("worker.sources", "SourceError", BadInput),
    ("producer.manifest", "ManifestError", BadInput),
)


def _failure(exc: BaseException) -> Failure | None:
    """The user-facing failure for ``exc``, or None for a bug (its traceback is shown)."""
    if isinstance(exc, redis.OutOfMemoryError):
        return Unreachable(
            f"Redis is full (OOM: {exc}); nothing was evicted. Free memory or raise "
            "maxmemory, then run the command again (`genderscore reconcile` repairs a run)"
        )
    if isinstance(exc, (redis.exceptions.NoPermissionError, redis.AuthenticationError)):
        return Unreachable(
            f"Redis refused this command for the configured user ({exc}): check its ACL "
            "rules and password (docker/setup-secrets.py writes them)"
        )
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return Unreachable(
            f"lost the connection to Redis ({exc}); run the command again once it is back "
            "(`genderscore reconcile RUN_ID` re-enqueues what a run is missing)"
        )
    if isinstance(exc, TimeoutError):
        return Incomplete(str(exc))
    reconcile = sys.modules.get("producer.reconcile")
    if reconcile is not None and isinstance(exc, reconcile.ReconcileError):
        # reconcile_run reports a bad model as a ReconcileError raised from a ModelError.
        model = sys.modules.get("worker.model")
        bad_model = model is not None and isinstance(exc.__context__, model.ModelError)
        return (ModelProblem if bad_model else BadInput)(str(exc))
    for module, name, failure in _FAILURES:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            if module == "kombu.exceptions":
                message = f"cannot reach the broker: {exc}"
            return failure(message)
    return None


def _settings() -> Settings:
    """The settings (SettingsError, which the group turns into exit 2, when invalid)."""
    import worker.settings as settings_module

    return settings_module.settings


def _redis() -> redis.Redis:
    from worker.results import connect_checked

    _settings()
    return connect_checked()


def _say(message: str) -> None:
    """A line for the operator on stderr (a log record with JSON logs)."""
    from worker.logs import json_logging

    if json_logging():
        log.info("%s", message)
    else:
        click.echo(message, err=True)


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    _say(f"skipped {len(skipped)} files:")
    for name, reason in skipped[:50]:
        _say(f"  {name!a}: {reason}")
    if len(skipped) > 50:
        _say(f"  ... and {len(skipped) - 50} more")


def _json_out(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


class Cli(click.Group):
    """The command group: each failure becomes one line and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, translating errors into messages a user can act on."""
        # Whether a command's help is asked for: main() then tolerates invalid settings.
        ctx.meta[_HELP_ASKED] = bool(set(ctx.args) & set(CONTEXT["help_option_names"]))
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            failure = _failure(exc)
            if failure is None:
                raise
            raise failure from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genderscore")
    except PackageNotFoundError:
        return "unknown"


@click.group(cls=Cli, context_settings=CONTEXT)
@click.version_option(_version(), "-V", "--version", prog_name="genderscore")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """genderscore: predict gender from profile pictures with a Keras CNN.

    Exit codes: 0 done, 2 usage or bad input, 3 Redis or the broker unreachable,
    4 run incomplete or wait timed out, 5 model problem, 1 anything else.
    """
    from worker.logs import configure, quiet_native_logs
    from worker.settings import unknown_variables

    # No command multiplies matrices with numpy (inference runs in TensorFlow or
    # OpenVINO): OpenBLAS's threads, started when numpy loads, cost 0.14 s of CPU per
    # command for nothing (docs/performance.md, issue 12). Set before numpy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    quiet_native_logs()
    try:
        fmt = _settings().log_format
    except SettingsError:
        configure("text", verbose)
        if not click.get_current_context().meta.get(_HELP_ASKED):
            raise  # every command needs the settings; a command's --help does not
        return
    configure(fmt, verbose)
    for warning in unknown_variables():
        log.warning("%s", warning)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def config(as_json: bool) -> None:
    """The settings in force, each with its source (environment or default)."""
    from producer.status import table
    from worker.settings import describe

    rows = list(describe(_settings()))
    if as_json:
        _json_out({name: {"value": value, "source": source} for name, value, source in rows})
        return
    click.echo(table(["variable", "value", "source"], [list(row) for row in rows]))


@main.command()
@click.argument("source", required=False)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A userid,url CSV instead of SOURCE: pictures behind URLs (s3://, https://, file://).",
)
@click.option("--model", type=click.Path(path_type=Path), help="Model .h5 (GENDERSCORE_MODEL).")
@click.option("--run-id", help="Run id (default: a new one); reusing one extends that run.")
@click.option("--wait", is_flag=True, help="Follow the run with a progress bar, then collect.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write.")
@click.option("--local", is_flag=True, help="Score in this process, without Redis or workers.")
@click.option(
    "--only-new",
    is_flag=True,
    help="Skip pictures this model already scored, unchanged (a folder's content hash, "
    "a prefix's ETag or version from the listing).",
)
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Accept a source with no picture (refused by default: a share that failed to mount).",
)
def score(
    source: str | None,
    manifest: Path | None,
    model: Path | None,
    run_id: str | None,
    wait: bool,
    out: Path | None,
    local: bool,
    only_new: bool,
    timeout: float | None,
    allow_empty: bool,
) -> None:
    """Score every <userid>.jpg (.jpeg, .png, .webp) of SOURCE, or every line of
    --manifest; prints the run id.

    SOURCE is a folder (the fastest; every worker must see it at the same path) or a
    URL prefix such as s3://bucket/profiles/image/ (workers on any host; credentials
    from AWS_* variables or fsspec's configuration on each host).
    """
    from producer.sources import gather
    from worker.sources import FolderSource

    if (source is None) == (manifest is None):
        raise click.UsageError(
            "give SOURCE (a folder or a URL prefix such as s3://bucket/profiles/image/) "
            "or --manifest FILE.csv" + (", not both" if source else "")
        )
    if only_new and manifest is not None:
        raise click.UsageError(
            "--only-new needs a folder or a URL prefix: a manifest's URLs have no "
            "listing that tells a changed picture without downloading it"
        )
    settings = _settings()
    model_path = model or settings.model
    found = gather(source, manifest, allow_empty)
    _report_skipped(found.skipped)
    _report_refused(found.refused)
    if not found.pictures and not allow_empty:
        left_out = (
            f"{len(found.refused)} lines refused"
            if manifest
            else f"{len(found.skipped)} other files"
        )
        raise BadInput(
            f"no picture to score in {found.shown} ({left_out}): refusing an empty run "
            "(is the folder mounted, the prefix right?); pass --allow-empty if it is expected"
        )
    if local:
        _score_local(found, model_path, out)
        return
    from producer.enqueue import enqueue_run
    from producer.follow import no_consumer_notice
    from producer.status import score_consumers
    from worker.celery import app
    from worker.model import check_model_file

    sha = check_model_file(model_path)
    client = _redis()
    pictures = found.pairs
    if only_new:
        if isinstance(found.source, FolderSource):
            from producer.newness import only_new_pictures as only_new_files

            pictures, unchanged = only_new_files(client, sha, found.source.root, pictures)
        else:
            from producer.sources import only_new_pictures

            refs, unchanged = only_new_pictures(client, sha, found.pictures)
            pictures = [(p.userid, p.name) for p in refs]
        _say(f"--only-new: {unchanged} pictures already scored by this model, skipped")
    result = enqueue_run(
        app,
        client,
        found.source.spec,
        pictures,
        model_path,
        sha,
        run_id,
        versions=found.versions,
    )
    _say(
        f"run {result.run_id}: {result.published} tasks enqueued"
        + (f", {result.already_in_run} already in the run" if result.already_in_run else "")
    )
    click.echo(result.run_id)
    if wait:
        _wait_and_collect(client, result.run_id, out, timeout)
    elif result.published:
        notice = no_consumer_notice(lambda: score_consumers(timeout=2.0))
        if notice:
            _say(notice.replace("; still waiting", ": the run waits for one"))


def _report_refused(refused: list[Refused]) -> None:
    if not refused:
        return
    from producer.manifest import describe

    _say(f"refused {len(refused)} manifest lines:")
    for line in refused[:50]:
        _say(f"  {describe(line)}")
    if len(refused) > 50:
        _say(f"  ... and {len(refused) - 50} more")


def _score_local(found: RunPictures, model_path: Path, out: Path | None) -> None:
    """``score --local``: the whole run in this process, then its CSV."""
    from producer.collect import write_outputs
    from producer.local import score_local, score_local_urls
    from worker.sources import FolderSource

    if isinstance(found.source, FolderSource):
        data = score_local(model_path, found.source.root, found.pairs)
    else:
        data = score_local_urls(model_path, found.source.spec, found.pairs)
    target = out or Path("out") / "local.csv"
    written = write_outputs(data, target)
    _say(f"scored {written.scored}, errors {written.errors}: {written.csv_path}")
    click.echo(str(written.csv_path))


def _wait_and_collect(
    client: redis.Redis, run_id: str, out: Path | None, timeout: float | None
) -> None:
    from producer.follow import follow_run
    from worker.celery import app

    # The collector's imports (pandas, Arrow: about half a second of CPU) while the
    # workers score, rather than after the run, when every core would wait for them.
    threading.Thread(
        target=importlib.import_module, args=("producer.collect",), daemon=True
    ).start()
    follow_run(app, client, run_id, timeout=timeout)
    from producer.collect import collect

    target = out or Path("out") / f"{run_id}.csv"
    written = collect(client, run_id, target)
    _say(f"scored {written.scored}, errors {written.errors}: {written.csv_path}")


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
    from producer.collect import write_outputs
    from producer.course_xml import read_baseline, write_course_xml

    if out is None and xml_dir is None:
        raise click.UsageError("give --out CSV, --xml DIR, or both")
    if out is None and profiles is not None:
        raise click.UsageError("--profiles fills in the CSV: it needs --out")
    if xml_dir is None and baseline is not None:
        raise click.UsageError("--baseline is for the XML files: it needs --xml")
    client = _redis()
    chosen = read_baseline(baseline) if baseline else None
    data = _load_run(client, run_id, partial)
    if out is not None:
        written = write_outputs(data, out, profiles)
        _say(
            f"scored {written.scored}, errors {written.errors}"
            + (f", missing {written.missing}" if written.missing else "")
            + f": {written.csv_path} ({written.errors_path.name})"
        )
        click.echo(str(written.csv_path))
    if xml_dir is not None:
        count = write_course_xml(data, xml_dir, chosen)
        _say(f"{count} XML files in {xml_dir}")
        click.echo(str(xml_dir))


def _load_run(client: redis.Redis, run_id: str, partial: bool) -> RunData:
    """The run's data; an unknown run is refused, an incomplete one unless ``partial``."""
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
    from producer.report import build_report
    from worker.labels import read_labels
    from worker.model import ModelError, read_metadata

    client = _redis()
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
            _say(f"{labels}: {len(parsed.skipped)} rows skipped")
        genders = parsed.genders
    path = build_report(data, out, genders, model_meta, labels_name=labels.name if labels else None)
    click.echo(str(path))


@main.command()
@click.argument("run_id", required=False)
@click.option("--limit", default=10, show_default=True, help="Runs to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def status(run_id: str | None, limit: int, as_json: bool) -> None:
    """Runs (total / done / errors / pending), queues, workers and training tasks."""
    from producer.status import render_status, status_record

    if as_json:
        _json_out(status_record(_redis(), run_id, limit))
    else:
        click.echo(render_status(_redis(), run_id, limit))


@main.command()
@click.argument("run_id")
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Picture folder, when Redis lost the run's metadata.",
)
@click.option(
    "--source",
    "source_arg",
    help="The run's folder or URL prefix (s3://...), when Redis lost the run's metadata.",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The run's userid,url manifest, when Redis lost the run's metadata or userids.",
)
@click.option("--model", type=click.Path(path_type=Path), help="Model, when Redis lost it.")
@click.option(
    "--recreate",
    is_flag=True,
    help="The run is not in Redis any more (lost): create it again from its source "
    "(--images, --source or --manifest) and --model.",
)
def reconcile(
    run_id: str,
    images: Path | None,
    source_arg: str | None,
    manifest: Path | None,
    model: Path | None,
    recreate: bool,
) -> None:
    """Re-enqueue every userid of RUN_ID with neither a prediction nor an error.

    The run's recorded source (a folder, a URL prefix, a manifest's URLs) is used; a
    source given again is scanned or listed to restore the userids Redis lost.
    """
    from producer.reconcile import reconcile_run
    from producer.runs import run_exists
    from producer.sources import gather
    from worker.celery import app

    given_sources = [x for x in (images, source_arg, manifest) if x is not None]
    if len(given_sources) > 1:
        raise click.UsageError("give one of --images, --source and --manifest")
    client = _redis()
    if not run_exists(client, run_id):
        if not recreate:
            raise BadInput(
                f"no run {run_id!r} in Redis: if Redis lost it, pass --recreate with its "
                "source (--images DIR, --source URL or --manifest FILE) and --model PATH "
                "(`genderscore runs list` shows the runs there are)"
            )
        if not given_sources or model is None:
            raise click.UsageError(
                "--recreate needs the run's source (--images DIR, --source URL or "
                "--manifest FILE) and --model PATH"
            )
    given = None
    if given_sources:
        _settings()
        given = gather(str(images) if images is not None else source_arg, manifest)
        _report_refused(given.refused)
    count = reconcile_run(app, client, run_id, given, model)
    _say(f"run {run_id}: {count} userids re-enqueued")
    click.echo(str(count))


@main.group(context_settings=CONTEXT)
def runs() -> None:
    """List, cancel or delete runs."""


@runs.command(name="list")
@click.option("--limit", default=20, show_default=True, help="Newest runs to list.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, for scripts.")
def runs_list(limit: int, as_json: bool) -> None:
    """The newest runs: state, counts, model, start and end."""
    from producer.runs import newest_runs, run_record, run_state
    from producer.status import run_row, table

    found = newest_runs(_redis(), limit)
    if as_json:
        _json_out([run_record(counts) for counts in found])
        return
    if not found:
        click.echo("no runs")
        return
    header = ["run", "state", "total", "done", "errors", "pending", "model", "started", "finished"]
    rows = []
    for counts in found:
        row = run_row(counts)
        rows.append([row[0], run_state(counts), *row[1:]])
    click.echo(table(header, rows))


@runs.command(name="cancel")
@click.argument("run_id")
def runs_cancel(run_id: str) -> None:
    """Cancel RUN_ID: drop its queued messages; workers skip the rest."""
    from producer.runs import cancel_run

    done = cancel_run(_redis(), run_id)
    if done.dropped is None:
        _say(f"run {run_id} cancelled: its queued messages stay on the broker, workers skip them")
    else:
        _say(f"run {run_id} cancelled: {done.dropped} queued messages dropped")


@runs.command(name="delete")
@click.argument("run_id")
@click.confirmation_option(prompt="Delete the run's predictions and errors from Redis?")
def runs_delete(run_id: str) -> None:
    """Delete RUN_ID: cancel it, then remove its keys and its entry in the runs list."""
    from producer.runs import delete_run

    done = delete_run(_redis(), run_id)
    dropped = "" if done.dropped is None else f", {done.dropped} queued messages dropped"
    _say(f"run {run_id} deleted{dropped}")


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
        raise (_failure(exc) or Failure(str(exc))) from None
    _say(result.summary)
    _say(f"model: {result.model_path}")
    _say(f"run {result.run_id}: scored CSV written to")
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
    from worker.model import promote_model

    target = served or _settings().model
    sha = promote_model(model, target)  # a ModelError exits 5
    _say(f"{target} -> {model.name} (sha256 {sha[:12]})")


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
