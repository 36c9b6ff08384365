"""Monitoring: Flower (with basic auth) and ``genderscore metrics`` over a real run.

Flower runs as ``celery -A worker flower`` against the test Redis, with docker-compose.yml's
FLOWER_* settings and its credentials in ``FLOWER_BASIC_AUTH`` (the compose file passes
them in a ``--conf`` file: tests/faults/test_compose_acl.py); a scoring worker and a
training worker are up; a small ``genderscore score --wait`` job runs; Flower's HTTP API
then shows both workers, both queues and every batch of score tasks with its run,
userids and progress. The project's exporter shows the run's counts and the queues. A
headless Chromium (Debian's ``chromium``; missing, the test fails) takes screenshots of
the dashboard (into
``GENDERSCORE_SCREENSHOT_DIR`` when set, e.g. docs/img, to refresh the README's).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import yaml
from click.testing import CliRunner

from producer.cli import main
from tests.helpers import ROOT, background, celery_worker, make_pictures

pytestmark = pytest.mark.slow

USER, PASSWORD = "tester", "s3cret"
PICTURES = 12
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, auth: bool = True, timeout: float = 10) -> tuple[int, bytes]:
    """GET ``url`` (with the test's basic auth unless ``auth`` is false)."""
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(check: Callable[[], T], what: str, timeout: float = 60) -> T:
    """Call ``check`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = value = check()
            if value:
                return value
        except (OSError, ValueError) as exc:  # not listening yet, JSON not ready
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def flower_settings() -> dict[str, str]:
    """Flower's settings in docker-compose.yml (FLOWER_*), to run it as deployed."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["flower"]["environment"]
    return {k: str(v) for k, v in env.items() if k.startswith("FLOWER_") and "$" not in str(v)}


@dataclass
class Monitored:
    """A finished job, as the monitoring side sees it."""

    flower: str
    metrics: str
    run_id: str
    userids: list[str]
    score_worker: str
    training_worker: str
    logs: Path


def api(monitored: Monitored, path: str) -> Any:
    status, body = http_get(monitored.flower + path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


@pytest.fixture(scope="module")
def monitored(
    score_worker: Path, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Monitored]:
    """Flower, the exporter, the session's scoring worker, a training worker, one finished run."""
    logs = tmp_path_factory.mktemp("monitoring")
    pictures = logs / "pictures"
    labels = make_pictures(pictures, PICTURES)
    flower_port, metrics_port = free_port(), free_port()
    flower_url, metrics_url = f"http://127.0.0.1:{flower_port}", f"http://127.0.0.1:{metrics_port}"
    flower_cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "flower",
        f"--port={flower_port}",
        "--address=127.0.0.1",
    ]
    metrics_cmd = [
        sys.executable,
        "-c",
        "from producer.cli import main; main()",
        "metrics",
        f"--port={metrics_port}",
        "--addr=127.0.0.1",
    ]
    with (
        celery_worker(
            "training", concurrency=1, log_path=logs / "training.log", name="flower-training"
        ),
        background(
            flower_cmd,
            logs / "flower.log",
            {**flower_settings(), "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
        ) as flower,
        background(metrics_cmd, logs / "metrics.log"),
    ):
        wait_until(
            lambda: (
                flower.poll() is None
                and http_get(flower_url + "/healthcheck", auth=False)[0] == 200
            ),
            "Flower to listen",
        )
        # Flower's event consumer must be up before the job, or it misses task-sent.
        score_worker_name = f"w1-{os.getpid()}@{socket.gethostname()}"  # conftest's
        training_worker = f"flower-training-{os.getpid()}@{socket.gethostname()}"
        wait_until(
            lambda: (
                {score_worker_name, training_worker}
                <= set(json.loads(http_get(flower_url + "/api/workers?refresh=1")[1]))
            ),
            "Flower to see the workers",
        )
        result = CliRunner().invoke(
            main,
            [
                "score",
                str(pictures),
                "--wait",
                "--timeout",
                "120",
                "--out",
                str(logs / "scored.csv"),
            ],
        )
        assert result.exit_code == 0, result.output
        (run_id,) = [
            line.split()[1].rstrip(":")
            for line in result.output.splitlines()
            if line.startswith("run ") and "tasks enqueued" in line
        ]
        yield Monitored(
            flower_url,
            metrics_url,
            run_id,
            sorted(labels),
            score_worker_name,
            training_worker,
            logs,
        )


def test_flower_api_requires_auth(monitored: Monitored) -> None:
    assert http_get(monitored.flower + "/api/workers", auth=False)[0] == 401
    assert http_get(monitored.flower + "/", auth=False)[0] == 401
    # /metrics stays open for Prometheus: keep it off the public side of the proxy.
    assert http_get(monitored.flower + "/metrics", auth=False)[0] == 200


def test_flower_shows_workers_queues_and_tasks_with_arguments(monitored: Monitored) -> None:
    workers = api(monitored, "/api/workers?refresh=1")
    queues_of = {
        name: {q["name"] for q in info.get("active_queues", [])} for name, info in workers.items()
    }
    assert queues_of[monitored.score_worker] == {"score"}
    assert queues_of[monitored.training_worker] == {"training"}
    assert "genderscore.score" in workers[monitored.score_worker]["registered"]

    lengths = api(monitored, "/api/queues/length")
    assert {q["name"] for q in lengths["active_queues"]} >= {"score", "training"}

    def finished_tasks() -> dict[str, Any] | None:
        tasks = api(monitored, "/api/tasks?taskname=genderscore.score&limit=1000")
        mine = {i: t for i, t in tasks.items() if monitored.run_id in (t.get("args") or "")}
        done = [t for t in mine.values() if t["state"] == "SUCCESS"]
        covered = {u for t in done for u in monitored.userids if u in t["args"]}
        return mine if covered == set(monitored.userids) else None

    # GENDERSCORE_TASK_EVENTS=batch (the default): one task per batch, every userid of
    # the batch in its arguments, the run's progress in its result.
    tasks = wait_until(finished_tasks, "Flower to see every picture's batch succeed", timeout=30)
    assert len(tasks) < PICTURES  # batches, not pictures
    for task in tasks.values():
        assert task["name"] == "genderscore.score"
        assert task["worker"] == monitored.score_worker
        assert task["args"].startswith(f"run={monitored.run_id} userids=")
    results = [t.get("result") or "" for t in tasks.values()]
    assert f"run {monitored.run_id}: {PICTURES}/{PICTURES} settled" in results


def test_flower_metrics_count_the_run(monitored: Monitored) -> None:
    status, body = http_get(monitored.flower + "/metrics", auth=False)
    text = body.decode()
    assert "flower_events_total" in text and 'task="genderscore.score"' in text
    assert f'flower_worker_online{{worker="{monitored.score_worker}"}} 1.0' in text


def test_exporter_serves_run_and_queue_gauges(monitored: Monitored) -> None:
    status, body = wait_until(
        lambda: http_get(monitored.metrics + "/metrics", auth=False), "the exporter to listen"
    )
    assert status == 200
    text = body.decode()
    labels = f'run="{monitored.run_id}"'
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines["genderscore_redis_up"] == 1

    def gauge(name: str) -> float:
        (value,) = [v for k, v in lines.items() if k.startswith(name + "{") and labels in k]
        return value

    assert gauge("genderscore_run_total") == PICTURES
    assert gauge("genderscore_run_done") == PICTURES
    assert gauge("genderscore_run_errors") == 0
    assert gauge("genderscore_run_pending") == 0
    assert gauge("genderscore_run_finished") == 1
    assert lines['genderscore_queue_length{queue="score"}'] == 0
    assert 'genderscore_queue_unacked{queue="training"}' in lines
    assert "genderscore_nightly_running" in lines


def chromium() -> str:
    """The headless browser for the screenshots; missing is a failure (.ci/run installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("the dashboard screenshots need Chromium: apt-get install chromium")


def test_dashboard_screenshots(monitored: Monitored) -> None:
    browser = chromium()
    target = Path(os.environ.get("GENDERSCORE_SCREENSHOT_DIR") or monitored.logs)
    target.mkdir(parents=True, exist_ok=True)
    host = monitored.flower.removeprefix("http://")
    tasks = api(monitored, "/api/tasks?taskname=genderscore.score&limit=1")
    pages = (
        ("/", "flower-workers.png"),
        ("/tasks", "flower-tasks.png"),
        (f"/task/{next(iter(tasks))}", "flower-task.png"),
    )
    for page, name in pages:
        shot = target / name
        shot.unlink(missing_ok=True)
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1920,1000",
                "--virtual-time-budget=5000",
                f"--user-data-dir={monitored.logs / 'chromium'}",
                f"--screenshot={shot}",
                f"http://{USER}:{PASSWORD}@{host}{page}",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000, (name, len(data))
