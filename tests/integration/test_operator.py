"""The operator's view, on a real Redis with real workers: exit codes, refusals, runs,
waiting with no worker, CSV cells, quiet and JSON logs, metrics, beat's heartbeat.

Commands run as subprocesses where the exit code or the settings read at start matter;
tests that need no worker of their own queue use a private key prefix (so no worker
consumes it).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import redis
from click.testing import CliRunner
from prometheus_client import generate_latest

from producer.cli import main
from producer.metrics import make_registry
from tests.helpers import ROOT, background, celery_worker, make_pictures, userid, worker_env
from worker.keys import nightly_last_failure, nightly_last_success, run_keys, runs_index
from worker.results import create_run, record_outcomes, seal_run
from worker.scoring import Failed, Scored
from worker.settings import settings

# TensorFlow's C++ log lines: glog-style headers, and the ones named in the issue.
TF_LINE = re.compile(
    r"^[IWEF]\d{4} |absl::InitializeLog|cuInit|oneDNN|cudart|cpu_feature_guard", re.M
)


class Private:
    """A key prefix of its own on the test Redis: its queue has no worker unless started."""

    def __init__(self, client: redis.Redis, model: Path, **env: str) -> None:
        self.client = client
        self.prefix = f"gsops{uuid.uuid4().hex[:8]}"
        self.env = {
            "GENDERSCORE_KEY_PREFIX": self.prefix,
            "GENDERSCORE_MODEL": str(model),
            **env,
        }

    def cli(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """``genderscore ARGS`` as a subprocess with this prefix."""
        return run_cli(args, {**self.env, **env}, timeout)

    def keys(self, run_id: str) -> tuple[str, ...]:
        with mock.patch.object(settings, "key_prefix", self.prefix):
            return run_keys(run_id).all()

    def queue(self) -> list[str]:
        """Run ids of the score messages waiting in this prefix's queue."""
        raw = self.client.lrange(f"{self.prefix}:score", 0, -1)
        return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]

    def cleanup(self) -> None:
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            self.client.delete(key)


def run_cli(
    args: tuple[str, ...] | list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        cwd=ROOT,
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def private(redis_client: redis.Redis, tiny_model: Path) -> Iterator[Private]:
    world = Private(redis_client, tiny_model)
    yield world
    world.cleanup()


def one_line_failure(proc: subprocess.CompletedProcess[str], code: int, alone: bool = False) -> str:
    """The error line of a failed command: its last, the only one that says "Error"
    (``alone``: the only line at all), and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and len([line for line in lines if "Error" in line]) <= 1, proc.stderr
    assert len(lines) == 1 or not alone, proc.stderr
    return lines[-1]


# --- settings -----------------------------------------------------------------------------

CELERY = [sys.executable, "-m", "celery", "-A", "worker"]


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"GENDERSCORE_BATCH_SIZE": "abc"}, ["GENDERSCORE_BATCH_SIZE='abc'"]),
        (
            {"GENDERSCORE_SCORE_TIME_LIMIT": "2000"},
            ["GENDERSCORE_SCORE_TIME_LIMIT=2000", "GENDERSCORE_VISIBILITY_TIMEOUT=900"],
        ),
    ],
)
def test_invalid_settings_stop_cli_and_celery_in_one_line(
    bad: dict[str, str], named: list[str]
) -> None:
    commands = [
        [sys.executable, "-m", "producer.cli", "status"],
        [*CELERY, "worker", "-Q", "score"],
        [*CELERY, "beat"],
        [*CELERY, "inspect", "ping"],
    ]
    for command in commands:
        proc = subprocess.run(
            command, cwd=ROOT, env=worker_env(bad), capture_output=True, text=True, timeout=60
        )
        line = one_line_failure(proc, 2, alone=True)
        assert "invalid genderscore settings" in line, command
        for name in named:
            assert name in line, (command, line)
        assert "GENDERSCORE_?" not in line


def test_help_and_version_work_whatever_the_settings() -> None:
    bad = {"GENDERSCORE_BATCH_SIZE": "abc"}
    for args in (["--version"], ["-h"], ["score", "-h"]):
        proc = run_cli(args, bad)
        assert proc.returncode == 0 and proc.stdout, (args, proc.stderr)


def test_config_shows_each_source_and_no_password(tiny_model: Path) -> None:
    env = {
        "GENDERSCORE_REDIS_URL": "redis://127.0.0.1:6379/14?password=s3cr3t-query",
        "GENDERSCORE_BROKER_URL": "redis://ops:s3cr3t-netloc@127.0.0.1:6379/14",
        "GENDERSCORE_BATCHSIZE": "8",
    }
    proc = run_cli(["config"], env)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t" not in proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert rows["GENDERSCORE_REDIS_URL"][1:] == [
        "redis://127.0.0.1:6379/14?password=***",
        "environment",
    ]
    assert rows["GENDERSCORE_BROKER_URL"][1:] == [
        "redis://ops:***@127.0.0.1:6379/14",
        "environment",
    ]
    assert rows["GENDERSCORE_MAX_DELIVERIES"][1:] == ["3", "default"]
    assert "GENDERSCORE_BATCHSIZE is not a genderscore setting" in proc.stderr
    assert "did you mean GENDERSCORE_BATCH_SIZE?" in proc.stderr
    as_json = json.loads(run_cli(["config", "--json"], env).stdout)
    assert as_json["GENDERSCORE_BATCH_SIZE"] == {"value": "16", "source": "default"}


# --- exit codes and refusals --------------------------------------------------------------


def test_exit_codes_tell_failures_apart(private: Private, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 2)
    down = {"GENDERSCORE_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    line = one_line_failure(private.cli("status", **down), 3)
    assert "cannot reach Redis" in line and "hunter2" not in line
    one_line_failure(private.cli("runs", "list", **down), 3)
    one_line_failure(private.cli("score", str(folder), **down), 3)
    # An unknown run id is refused by every command that takes one.
    for args in (
        ["status", "no-such-run"],
        ["status", "no-such-run", "--json"],
        ["collect", "no-such-run", "--out", str(tmp_path / "x.csv")],
        ["report", "no-such-run", "--out", str(tmp_path / "report")],
        ["reconcile", "no-such-run"],
        [
            "reconcile",
            "no-such-run",
            "--images",
            str(folder),
            "--model",
            private.env["GENDERSCORE_MODEL"],
        ],
        ["runs", "cancel", "no-such-run"],
        ["runs", "delete", "no-such-run", "--yes"],
    ):
        line = one_line_failure(private.cli(*args), 2)
        assert "no run 'no-such-run'" in line, args
    assert not (tmp_path / "x.csv").exists()
    usage = private.cli("reconcile", "lost", "--recreate")  # a usage error: click's format
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert usage.stderr.splitlines()[-1].startswith("Error: --recreate needs the run's source")
    # Model problems: 5.
    line = one_line_failure(
        private.cli("score", str(folder), "--model", str(tmp_path / "no.h5")), 5
    )
    assert "no.h5" in line
    # An incomplete run: 4 (nothing consumes this prefix's queue).
    proc = private.cli("score", str(folder), "--run-id", "half")
    assert proc.returncode == 0, proc.stderr
    line = one_line_failure(private.cli("collect", "half", "--out", str(tmp_path / "h.csv")), 4)
    assert "2 userids have neither" in line


def test_an_empty_folder_is_refused_unless_allowed(private: Private, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a picture")
    line = one_line_failure(private.cli("score", str(empty), "--wait"), 2)
    assert "no picture to score" in line and "--allow-empty" in line
    assert not private.client.zcard(f"{private.prefix}:runs")  # no run was created
    line = one_line_failure(private.cli("score", str(empty), "--local"), 2)
    out = tmp_path / "empty.csv"
    proc = private.cli("score", str(empty), "--allow-empty", "--wait", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "userid,gender,p_female,model,scored_at\n"


def test_no_worker_is_said_within_30s_and_the_wait_goes_on(
    private: Private, tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 3)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "score", str(folder), "--wait", "--timeout", "32"],
        cwd=ROOT,
        env=worker_env(private.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            said.append((time.monotonic() - started, line))

    reader = threading.Thread(target=read)
    reader.start()
    proc.wait(120)
    reader.join(10)
    elapsed = time.monotonic() - started
    notices = [at for at, line in said if "no worker consumes the 'score' queue" in line]
    assert notices and notices[0] < 30, said
    assert len(notices) == 1  # said once, not at every check
    assert proc.returncode == 4 and elapsed >= 32  # it kept waiting to its timeout
    assert "not finished after 32s" in said[-1][1]
    # The plain `score` says it too, right after enqueueing.
    plain = private.cli("score", str(folder))
    assert plain.returncode == 0 and "no worker consumes the 'score' queue" in plain.stderr


def test_a_consumed_queue_gets_no_notice(score_worker: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 3)
    proc = run_cli(["score", str(folder), "--wait", "--out", str(tmp_path / "o.csv")], {})
    assert proc.returncode == 0, proc.stderr
    assert "no worker consumes" not in proc.stderr


# --- runs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_drops_queued_messages_workers_skip_the_rest_delete_removes_the_run(
    private: Private, tmp_path: Path
) -> None:
    from worker.celery import app
    from worker.runs import publish_pictures

    a, b = tmp_path / "a", tmp_path / "b"
    a_ids = make_pictures(a, 6, start=100)
    make_pictures(b, 5, start=200)
    for run_id, folder in (("run-a", a), ("run-b", b)):
        assert private.cli("score", str(folder), "--run-id", run_id).returncode == 0
    assert sorted(private.queue()) == ["run-a"] * 6 + ["run-b"] * 5
    proc = private.cli("runs", "cancel", "run-a")
    assert proc.returncode == 0 and "6 queued messages dropped" in proc.stderr, proc.stderr
    assert private.queue() == ["run-b"] * 5  # order kept, the other run untouched
    # Messages of the run that no queue filter reaches (already delivered, or on AMQP):
    with mock.patch.object(settings, "key_prefix", private.prefix):
        pictures = [(u, f"{u}.jpg") for u in sorted(a_ids)]
        publish_pictures(app, private.client, "run-a", pictures, record=False)
    log = tmp_path / "worker.log"
    with celery_worker("score", extra_env=private.env, log_path=log, name="ops"):
        deadline = time.monotonic() + 180
        while (
            private.client.llen(f"{private.prefix}:score")
            or private.client.hlen(f"{private.prefix}:unacked")
            or private.client.hlen(private.keys("run-b")[2]) < 5
        ):
            assert time.monotonic() < deadline, "the worker did not drain the queue"
            time.sleep(0.3)
    meta, ids, pred, err, tries = private.keys("run-a")
    assert not private.client.exists(pred, err, tries)  # skipped: not counted, not recorded
    assert private.client.hget(meta, "cancelled") == "1"
    assert "run run-a is cancelled: dropping 6 messages" in log.read_text()
    listed = {r["run"]: r for r in json.loads(private.cli("runs", "list", "--json").stdout)}
    assert listed["run-a"]["state"] == "cancelled" and listed["run-a"]["done"] == 0
    assert listed["run-b"]["state"] == "finished" and listed["run-b"]["done"] == 5
    text = private.cli("runs", "list").stdout
    assert re.search(r"^run-a\s+cancelled\s+6\s+0\s+0\s+6", text, re.M), text
    status = json.loads(private.cli("status", "run-b", "--json").stdout)
    assert [r["run"] for r in status["runs"]] == ["run-b"] and status["runs"][0]["done"] == 5
    assert status["queues"]["score"] == 0 and set(status) >= {"workers", "training", "at"}
    # A cancelled run is incomplete: collect refuses it (4) unless --partial.
    one_line_failure(private.cli("collect", "run-a", "--out", str(tmp_path / "a.csv")), 4)
    # Delete: every key of the run and its index entry go.
    proc = private.cli("runs", "delete", "run-a", "--yes")
    assert proc.returncode == 0 and "run run-a deleted" in proc.stderr, proc.stderr
    assert not private.client.exists(meta, ids, pred, err, tries)
    assert private.client.zscore(f"{private.prefix}:runs", "run-a") is None
    one_line_failure(private.cli("status", "run-a"), 2)
    listed = [r["run"] for r in json.loads(private.cli("runs", "list", "--json").stdout)]
    assert listed == ["run-b"]


@pytest.mark.slow
def test_cancel_on_rabbitmq_leaves_the_queue_and_workers_skip_the_run(
    private: Private, tmp_path: Path, rabbitmq_url: str
) -> None:
    private.env["GENDERSCORE_BROKER_URL"] = rabbitmq_url
    a, b = tmp_path / "a", tmp_path / "b"
    make_pictures(a, 4, start=300)
    make_pictures(b, 3, start=400)
    for run_id, folder in (("amqp-a", a), ("amqp-b", b)):
        assert private.cli("score", str(folder), "--run-id", run_id).returncode == 0
    proc = private.cli("runs", "cancel", "amqp-a")
    assert proc.returncode == 0, proc.stderr
    assert "queued messages stay on the broker, workers skip them" in proc.stderr
    log = tmp_path / "worker.log"
    with celery_worker("score", extra_env=private.env, log_path=log, name="amqp"):
        deadline = time.monotonic() + 180
        while private.client.hlen(private.keys("amqp-b")[2]) < 3:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        while "run amqp-a is cancelled: dropping" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
    meta, _, pred, err, tries = private.keys("amqp-a")
    assert not private.client.exists(pred, err, tries)
    assert private.client.hget(meta, "cancelled") == "1"


# --- CSV files ----------------------------------------------------------------------------


def test_collect_writes_only_the_runs_ids_and_no_formula(
    redis_client: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = f"cells-{uuid.uuid4().hex[:6]}"
    own = ["-A1", "u1", "u2", "+x"]
    create_run(redis_client, run_id, {"model_sha": "a" * 64, "model": "m.h5"})
    redis_client.hset(run_keys(run_id).ids, mapping={u: f"{u}.jpg" for u in own})
    outcomes = [
        Scored("-A1", 0.9, "female"),
        Scored("u1", 0.2, "male"),
        Failed("u2", "corrupt", "x"),
        Failed("+x", "missing", "no picture"),
        # Stored under the run by messages that were never the run's:
        Failed("=cmd|' /C calc'!A0", "invalid_userid", "bad"),
        Failed("@SUM(1+1)", "invalid_userid", "bad"),
        Scored("stranger", 0.5, "female"),
    ]
    record_outcomes(redis_client, run_id, "a" * 64, outcomes)
    seal_run(redis_client, run_id, len(own))
    out = tmp_path / "run.csv"
    with caplog.at_level(logging.WARNING, logger="producer.collect"):
        result = CliRunner().invoke(main, ["collect", run_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = out.read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["userid", "'-A1", "u1"]
    errors = (tmp_path / "run.errors.csv").read_text().splitlines()
    assert errors == ["userid,error", "'+x,missing: no picture", "u2,corrupt: x"]
    assert "3 predictions or errors stored under userids that are not the run's" in caplog.text
    # --profiles: the course file keeps its rows, every cell neutralised.
    profile = tmp_path / "profile.csv"
    profile.write_text(
        ',userid,age,gender,note\n0,-A1,23.0,0.0,=HYPERLINK("x")\n1,u1,30.0,1.0,ok\n'
        "2,nobody,40.0,1.0,@me\n"
    )
    filled = tmp_path / "filled.csv"
    result = CliRunner().invoke(
        main, ["collect", run_id, "--out", str(filled), "--profiles", str(profile)]
    )
    assert result.exit_code == 0, result.output
    assert filled.read_text().splitlines() == [
        ",userid,age,gender,note,p_female,model",
        '0,\'-A1,23.0,1.0,"\'=HYPERLINK(""x"")",0.900000,aaaaaaaaaaaa',
        "1,u1,30.0,0.0,ok,0.200000,aaaaaaaaaaaa",
        "2,nobody,40.0,,'@me,,",
    ]
    redis_client.delete(*run_keys(run_id).all())
    redis_client.zrem(runs_index(), run_id)


# --- logs ---------------------------------------------------------------------------------


def _no_tensorflow_env(**extra: str) -> dict[str, str]:
    """The session's environment without its TF_CPP_MIN_LOG_LEVEL: the product's default."""
    env = worker_env(extra)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _json_lines(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)  # every line is one JSON object
            assert {"timestamp", "level", "logger", "message"} <= record.keys(), line
            records.append(record)
    return records


@pytest.mark.slow
def test_no_tensorflow_lines_from_a_worker_or_score_local(private: Private, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 4)
    (folder / "-x1.jpg").write_bytes((folder / f"{userid(0)}.jpg").read_bytes())
    out = tmp_path / "local.csv"
    local = subprocess.run(
        [sys.executable, "-m", "producer.cli", "score", str(folder), "--local", "--out", str(out)],
        cwd=ROOT,
        env=_no_tensorflow_env(**private.env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    assert not TF_LINE.search(local.stderr), local.stderr
    assert "\n'-x1," in out.read_text()  # --local's CSV is neutralised too
    log = tmp_path / "worker.log"
    with mock.patch.dict(os.environ, {}, clear=False):
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the worker gets the product's default
        with celery_worker("score", extra_env=private.env, log_path=log, name="quiet"):
            proc = private.cli("score", str(folder), "--wait", "--out", str(tmp_path / "w.csv"))
            assert proc.returncode == 0, proc.stderr
    text = log.read_text(errors="replace")
    assert "model loaded" in text  # TensorFlow did load in the pool
    assert not TF_LINE.search(text), text


@pytest.mark.slow
def test_json_logs_from_the_cli_and_a_worker(private: Private, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 4)
    env = {**private.env, "GENDERSCORE_LOG_FORMAT": "json", "GENDERSCORE_BATCHSIZE": "4"}
    log = tmp_path / "worker.log"
    with mock.patch.dict(os.environ, {}, clear=False):
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)  # TensorFlow's lines are not JSON
        with celery_worker("score", extra_env=env, log_path=log, name="json"):
            proc = run_cli(["score", str(folder), "--wait", "--out", str(tmp_path / "o.csv")], env)
            assert proc.returncode == 0, proc.stderr
    cli_records = _json_lines(proc.stderr)
    messages = [str(r["message"]) for r in cli_records]
    assert any("GENDERSCORE_BATCHSIZE is not a genderscore setting" in m for m in messages)
    assert any(m.startswith("run ") and "tasks enqueued" in m for m in messages)
    assert any(m.startswith("scored 4, errors 0") for m in messages)
    worker_records = _json_lines(log.read_text(errors="replace"))
    assert any(" ready." in str(r["message"]) for r in worker_records)
    loaded = [r for r in worker_records if str(r["message"]).startswith("model loaded")]
    assert loaded and all(r["process_name"] != "MainProcess" for r in loaded)
    assert all(r.get("task_name") == "genderscore.score" for r in loaded)  # a batch: no id
    assert any("is not a genderscore setting" in str(r["message"]) for r in worker_records)
    failed = run_cli(["collect", "no-such-run", "--out", str(tmp_path / "x.csv")], env)
    assert failed.returncode == 2
    (error,) = _json_lines(failed.stderr)[-1:]
    assert error["level"] == "ERROR" and "no run 'no-such-run'" in str(error["message"])


# --- metrics and beat ---------------------------------------------------------------------


def test_metrics_export_errors_by_kind_and_nightly_outcomes(redis_client: redis.Redis) -> None:
    run_id = f"kinds-{uuid.uuid4().hex[:6]}"
    create_run(redis_client, run_id, {"model_sha": "b" * 64})
    outcomes = [Failed(f"u{n}", "corrupt", "x") for n in range(3)]
    outcomes += [Failed("v1", "model_error", "y"), Scored("w1", 0.7, "female")]
    record_outcomes(redis_client, run_id, "b" * 64, outcomes)
    redis_client.set(nightly_last_success(), "1764036000")
    redis_client.hset(
        nightly_last_failure(), mapping={"at": "1764032400", "reason": "source shrank"}
    )
    try:
        text = generate_latest(make_registry(redis_client)).decode()
    finally:
        redis_client.delete(nightly_last_success(), nightly_last_failure())
        redis_client.delete(*run_keys(run_id).all())
        redis_client.zrem(runs_index(), run_id)
    labels = f'model="bbbbbbbbbbbb",run="{run_id}"'  # the exposition sorts label names
    assert f'genderscore_run_errors_by_kind{{kind="corrupt",{labels}}} 3.0' in text
    assert f'genderscore_run_errors_by_kind{{kind="model_error",{labels}}} 1.0' in text
    assert "genderscore_nightly_last_success_timestamp_seconds 1.764036e+09" in text
    assert "genderscore_nightly_last_failure_timestamp_seconds 1.7640324e+09" in text
    assert 'genderscore_nightly_last_failure_info{reason="source shrank"} 1.0' in text


def test_beat_heartbeat_feeds_its_health_check(redis_client: redis.Redis, tmp_path: Path) -> None:
    schedule = tmp_path / "beat" / "schedule"
    schedule.parent.mkdir()
    check = [sys.executable, "-m", "worker.beat", str(schedule), "--max-age", "10"]
    assert subprocess.run(check, cwd=ROOT, capture_output=True, timeout=30).returncode == 1
    beat = [
        *CELERY,
        "beat",
        "--loglevel=INFO",
        "-s",
        str(schedule),
        "--scheduler=worker.beat:HeartbeatScheduler",
        "--max-interval=1",
    ]
    heartbeat = Path(f"{schedule}.heartbeat")
    with background(beat, tmp_path / "beat.log"):
        deadline = time.monotonic() + 60
        while not heartbeat.exists():
            assert time.monotonic() < deadline, (tmp_path / "beat.log").read_text()
            time.sleep(0.2)
        first = heartbeat.stat().st_mtime
        time.sleep(2.5)
        assert heartbeat.stat().st_mtime > first  # written on every pass, not once
        alive = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert alive.returncode == 0, alive.stderr
    os.utime(heartbeat, (time.time() - 60, time.time() - 60))  # beat gone for a minute
    dead = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert dead.returncode == 1 and "last heartbeat" in dead.stderr
