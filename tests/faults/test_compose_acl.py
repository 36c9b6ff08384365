"""The Compose deployment's secrets and Redis users, for real.

``docker/setup-secrets.py`` writes the secrets; a private ``redis-server`` starts with
its ACL file and a private RabbitMQ node imports its definitions, as the compose
services do. Each service then runs as a real process with its own user, reading its
URLs from a secrets folder laid out as Compose mounts it (``GENDERSCORE_SECRETS_DIR``
with files named ``GENDERSCORE_REDIS_URL`` and ``GENDERSCORE_BROKER_URL``; nothing in
the environment): a scoring worker, a training worker, beat with a nightly run every
few seconds, Flower with its ``--conf`` file, the metrics exporter, and the CLI's verbs.
The pipeline must complete with no refusal in Redis' ACL log and no NOPERM in any log;
the read-only users must be refused every write.

Both brokers: RabbitMQ (the deployment's) and Redis (docs/deploy.md's way back).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from producer.localredis import LocalRedis, free_port, start_server
from tests.brokers import RabbitNode, amqp_answers
from tests.helpers import (
    ROOT,
    background,
    celery_worker,
    make_pictures,
    run_setup,
    wait_until,
    worker_env,
    write_profiles,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]

SERVICES = ("worker", "beat", "trainer", "cli", "flower", "metrics")
READ_ONLY = ("flower", "metrics")
PICTURES, NIGHTLY_PICTURES = 12, 6
FLOWER_API = ("/api/workers?refresh=1", "/api/tasks", "/api/queues/length")


def container_uid() -> str:
    """The GENDERSCORE_UID a test may ask for: any non-root one as root, else its own."""
    return "10001" if os.getuid() == 0 else str(os.getuid())


def http_get(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:  # not listening (yet)
        return 0, b""


@dataclass
class Deployment:
    """The stack of one broker, up, with one finished run of every kind."""

    broker: str
    root: Path
    prefix: str
    server: LocalRedis
    admin: redis.Redis
    logs: Path
    node: DefinedNode | None = None
    flower: str = ""
    flower_auth: str = ""
    metrics: str = ""
    run_id: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    refused: list[dict[str, object]] = field(default_factory=list)  # Redis' ACL log

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    def url(self, service: str) -> str:
        return (self.secrets / f"redis-url-{service}").read_text().strip()

    def client(self, service: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(service), decode_responses=True)

    def mounted(self, service: str) -> Path:
        """The service's secrets as Compose mounts them: /run/secrets/GENDERSCORE_*."""
        folder = self.root / "run" / service
        if not folder.exists():
            folder.mkdir(parents=True)
            shutil.copy(self.secrets / f"redis-url-{service}", folder / "GENDERSCORE_REDIS_URL")
            if self.broker == "rabbitmq":
                shutil.copy(self.secrets / "broker-url", folder / "GENDERSCORE_BROKER_URL")
        return folder

    def env(self, service: str) -> dict[str, str]:
        return {"GENDERSCORE_SECRETS_DIR": str(self.mounted(service))}

    def cli(self, *args: str, timeout: float = 240) -> str:
        """``genderscore ARGS`` as the cli user; its stdout (fails with its output)."""
        proc = self.cli_as("cli", *args, timeout=timeout)
        assert proc.returncode == 0, f"genderscore {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def cli_as(
        self, service: str, *args: str, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        """``genderscore ARGS`` with ``service``'s secrets, whatever its exit status."""
        proc = subprocess.run(
            [sys.executable, "-m", "producer.cli", *args],
            cwd=ROOT,
            env=worker_env(self.env(service)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with (self.logs / "cli.log").open("a") as log:
            log.write(f"$ genderscore {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
        return proc


class DefinedNode(RabbitNode):
    """A private node that imports the setup's definitions at boot (docker/rabbitmq.conf):
    its only user is the deployment's; there is no guest."""

    broker_url = ""

    @property
    def url(self) -> str:  # what start() waits for
        return self.broker_url

    def boot(self, secrets: Path) -> None:
        definitions = secrets / "rabbitmq-definitions.json"
        with (self.base / "rabbitmq.conf").open("a") as conf:
            conf.write(f"load_definitions = {definitions}\n")
        self.broker_url = (secrets / "broker-url").read_text().strip()
        self.start()


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def deployment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
) -> Iterator[Deployment]:
    broker = request.param
    base = tmp_path_factory.mktemp(f"compose-{broker}")
    prefix = f"gsacl{uuid.uuid4().hex[:8]}"
    redis_port = free_port()
    with ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        node = DefinedNode(base / "rabbitmq") if broker == "rabbitmq" else None
        rabbit_host = f"127.0.0.1:{node.port if node else 1}"
        setup = run_setup(
            base,
            "--redis-host",
            f"127.0.0.1:{redis_port}",
            "--rabbitmq-host",
            rabbit_host,
            GENDERSCORE_UID=container_uid(),
            GENDERSCORE_GID=container_uid(),
            GENDERSCORE_KEY_PREFIX=prefix,
        )
        assert setup.returncode == 0, setup.stderr
        secrets = base / "secrets"
        if node is not None:
            node.boot(secrets)
            stack.callback(node.stop, kill=True)
        server = start_server(
            redis_port, ("--aclfile", str(secrets / "redis.acl")), workdir=base / "redis"
        )
        stack.callback(server.stop, kill=True)
        admin = redis.Redis(
            port=redis_port,
            username="admin",
            password=(secrets / "redis-admin-password").read_text().strip(),
            decode_responses=True,
        )
        logs = base / "logs"
        logs.mkdir()
        world = Deployment(broker, base, prefix, server, admin, logs, node)

        # As in docker-compose.yml: no URL in the environment, the key prefix and paths.
        mp.delenv("GENDERSCORE_REDIS_URL")
        mp.delenv("GENDERSCORE_BROKER_URL", raising=False)
        models = base / "models"
        models.mkdir()
        for suffix in (".h5", ".json"):
            shutil.copy(tiny_model.with_suffix(suffix), models / f"gender{suffix}")
        pictures, nightly, out = base / "pictures", base / "nightly-pictures", base / "out"
        labels = make_pictures(pictures, PICTURES, size=(48, 48))
        write_profiles(base / "profile.csv", labels)
        make_pictures(nightly, NIGHTLY_PICTURES, start=PICTURES, size=(48, 48))  # new profiles
        for name, value in {
            "GENDERSCORE_KEY_PREFIX": prefix,
            "GENDERSCORE_MODEL": str(models / "gender.h5"),
            "GENDERSCORE_NIGHTLY_IMAGES_DIR": str(nightly),
            "GENDERSCORE_NIGHTLY_OUTPUT_DIR": str(out),
            "GENDERSCORE_NIGHTLY_CRON": "3",  # seconds: beat sends it within the test
            "GENDERSCORE_NIGHTLY_POLL_SECONDS": "1",
            "GENDERSCORE_REPAIR_INTERVAL": "2",  # the repairer (Redis broker) runs too
        }.items():
            mp.setenv(name, value)

        flower_port, metrics_port = free_port(), free_port()
        world.flower, world.metrics = (
            f"http://127.0.0.1:{flower_port}",
            f"http://127.0.0.1:{metrics_port}",
        )
        conf = (secrets / "flower-config.py").read_text()
        world.flower_auth = conf.split("[")[1].split("]")[0].strip("'\"")
        stack.enter_context(
            celery_worker(
                "score", 2, world.env("worker"), logs / "worker.log", name=f"score{prefix}"
            )
        )
        stack.enter_context(
            celery_worker(
                "training", 1, world.env("trainer"), logs / "trainer.log", name=f"train{prefix}"
            )
        )
        celery = [sys.executable, "-m", "celery", "-A", "worker"]
        flower_cmd = [
            *celery,
            "flower",
            f"--port={flower_port}",
            "--address=127.0.0.1",
            f"--conf={secrets / 'flower-config.py'}",
        ]
        stack.enter_context(background(flower_cmd, logs / "flower.log", world.env("flower")))
        metrics_cmd = [
            sys.executable,
            "-m",
            "producer.cli",
            "metrics",
            f"--port={metrics_port}",
            "--addr=127.0.0.1",
        ]
        stack.enter_context(background(metrics_cmd, logs / "metrics.log", world.env("metrics")))
        wait_until(
            lambda: http_get(world.flower + "/healthcheck")[0] == 200, 60, "Flower to listen"
        )
        beat_cmd = [*celery, "beat", "--loglevel=INFO", "-s", str(base / "beat-schedule")]
        stack.enter_context(background(beat_cmd, logs / "beat.log", world.env("beat")))

        world.outputs["score"] = world.cli(
            "score", str(pictures), "--wait", "--timeout", "180", "--out", str(base / "run.csv")
        )
        world.run_id = world.outputs["score"].splitlines()[0]  # stdout: the run id first
        world.outputs["train"] = world.cli(
            "train",
            str(pictures),
            str(base / "profile.csv"),
            "--name",
            "acl",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--val-fraction",
            "0.25",
            "--submit",
            "--timeout",
            "300",
        )
        wait_until(lambda: (out / "latest.csv").exists(), 180, "the nightly CSV")
        for verb in (
            ["status"],
            ["status", world.run_id, "--json"],
            ["runs", "list"],
            ["collect", world.run_id, "--out", str(base / "collected.csv")],
            ["reconcile", world.run_id],
            ["report", world.run_id, "--out", str(base / "report")],
        ):
            world.outputs[" ".join(verb[:2])] = world.cli(*verb)
        extra = world.cli("score", str(nightly), "--run-id", f"extra-{prefix}")
        world.outputs["cancel"] = world.cli("runs", "cancel", f"extra-{prefix}")
        world.outputs["delete"] = world.cli("runs", "delete", f"extra-{prefix}", "--yes")
        world.outputs["extra"] = extra
        for url in (
            world.metrics + "/metrics",
            *(world.flower + path for path in FLOWER_API),
        ):
            auth = world.flower_auth if url.startswith(world.flower) else None
            status, body = http_get(url, auth)
            world.outputs["/" + url.split("/", 3)[3]] = f"{status} {body.decode()}"
        world.refused = world.admin.acl_log(count=1000)  # before the tests' own probes
        yield world


def test_pipeline_completes_with_a_user_per_service(deployment: Deployment) -> None:
    world = deployment
    with (world.root / "run.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == PICTURES
    with (world.root / "out" / "latest.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == NIGHTLY_PICTURES  # beat -> worker
    assert "vs majority baseline" in world.outputs["train"]
    assert list((world.root / "models").glob("acl-*.h5"))  # the trainer wrote a version
    (run,) = json.loads(world.outputs[f"status {world.run_id}"])["runs"]
    assert (run["done"], run["errors"], run["pending"]) == (PICTURES, 0, 0)
    status, workers = world.outputs["/api/workers?refresh=1"].split(" ", 1)
    assert status == "200" and len(json.loads(workers)) == 2  # scoring and training
    status, tasks = world.outputs["/api/tasks"].split(" ", 1)
    assert status == "200" and "genderscore.score" in tasks


def test_metrics_exporter_reads_with_its_user(deployment: Deployment) -> None:
    status, body = deployment.outputs["/metrics"].split(" ", 1)
    assert status == "200", body[-2000:]
    queue_gauge = "consumers" if deployment.broker == "rabbitmq" else "unacked"
    assert f'genderscore_queue_{queue_gauge}{{queue="score"}}' in body
    assert "genderscore_redis_up 1.0" in body
    assert 'genderscore_run_done{model="' in body and f'run="{deployment.run_id}"' in body
    assert "genderscore_nightly_last_success_timestamp_seconds" in body


def test_no_service_was_refused(deployment: Deployment) -> None:
    assert deployment.refused == [], deployment.refused
    for log in deployment.logs.iterdir():
        assert "NOPERM" not in log.read_text(errors="replace"), log.name


def test_read_only_users_cannot_write_a_data_key(deployment: Deployment) -> None:
    world = deployment
    meta = f"{world.prefix}:run:{world.run_id}:meta"
    reads = {"flower": ("GET", meta), "metrics": ("HGETALL", meta)}
    for service in READ_ONLY:
        assert world.admin.acl_dryrun(service, *reads[service]) == "OK"  # reads are allowed
        client = world.client(service)
        for write in (
            lambda c: c.hset(meta, "total", "1"),
            lambda c: c.delete(meta),
            lambda c: c.set(f"{world.prefix}:nightly:last_success", "1"),
            lambda c: c.flushdb(),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                write(client)
    # The key rule alone refuses it: DEL is one of Flower's commands (for broker queues).
    with pytest.raises(redis.exceptions.NoPermissionError, match="key"):
        world.client("flower").delete(meta)
    assert world.admin.hget(meta, "total") == str(PICTURES)


def test_read_write_users_stay_under_the_prefix(deployment: Deployment) -> None:
    world = deployment
    for service in ("worker", "beat", "trainer", "cli"):
        client = world.client(service)
        assert client.sadd(f"{world.prefix}:acl-probe", service) == 1
        with pytest.raises(redis.exceptions.NoPermissionError, match="key"):
            client.sadd("elsewhere:acl-probe", service)
        for command in (("FLUSHDB",), ("CONFIG", "GET", "*"), ("ACL", "LIST"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    anonymous = redis.Redis(port=world.server.port)
    assert anonymous.ping()  # the health check's, without a password
    with pytest.raises(redis.exceptions.NoPermissionError):
        anonymous.smembers(f"{world.prefix}:acl-probe")


def test_flower_takes_its_basic_auth_from_the_secret_file(deployment: Deployment) -> None:
    world = deployment
    assert http_get(world.flower + "/api/workers")[0] == 401
    assert http_get(world.flower + "/api/workers", "ops:wrong")[0] == 401
    assert http_get(world.flower + "/api/workers", world.flower_auth)[0] == 200


@pytest.mark.parametrize("deployment", ["rabbitmq"], indirect=True)
def test_rabbitmq_has_only_the_deployment_user(deployment: Deployment) -> None:
    node = deployment.node
    assert node is not None
    users = [line.split()[0] for line in node.ctl("list_users", "--silent").splitlines()]
    assert users == ["genderscore"]  # no guest: definitions imported at boot replace it
    port = node.port
    assert amqp_answers(node.url)
    assert not amqp_answers(f"amqp://guest:guest@127.0.0.1:{port}//")
    assert not amqp_answers(node.url.rsplit("/", 1)[0] + "/%2F")  # only its own vhost


@pytest.mark.parametrize("deployment", ["redis"], indirect=True)
def test_a_refused_command_is_one_line_and_exit_3(deployment: Deployment) -> None:
    # The metrics user may read, not delete: `runs delete` with its URL is refused.
    result = deployment.cli_as("metrics", "runs", "delete", deployment.run_id, "--yes")
    assert result.returncode == 3, result.stderr
    assert "refused this command" in result.stderr and "Traceback" not in result.stderr
