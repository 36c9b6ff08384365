"""Redis with an ACL user limited to the key prefix, Redis over TLS, and a tampered model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from producer.localredis import LocalRedisError, start_server
from tests.faults.conftest import FaultEnv, free_port, redis_server
from tests.helpers import make_pictures, worker_env

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def _score_end_to_end(world: FaultEnv, folder: Path, out: Path) -> None:
    with world.worker("w", concurrency=1):
        scored = world.cli("score", str(folder), "--wait", "--out", str(out), "--timeout", "120")
        run_id = scored.stdout.strip().splitlines()[-1]
        status = world.cli("status", run_id, "--json")
    (run,) = json.loads(status.stdout)["runs"]
    assert (run["run"], run["total"], run["done"], run["errors"]) == (run_id, 12, 12, 0)
    assert len(out.read_text().splitlines()) == 1 + 12


def test_acl_user_limited_to_the_prefix_runs_the_whole_pipeline(
    tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 12, size=(48, 48))
    with redis_server(tmp_path / "redis", None, "--requirepass", "admin-secret") as (port, _):
        world = FaultEnv(tmp_path, f"redis://127.0.0.1:{port}/0", tiny_model)
        admin = f"redis://:admin-secret@127.0.0.1:{port}/0"
        import redis

        redis.Redis.from_url(admin).execute_command(
            "ACL",
            "SETUSER",
            "genderscore",
            "on",
            ">s3cret-pw",
            f"~{world.prefix}:*",
            "&*",
            "+@all",
        )
        world.redis_url = f"redis://genderscore:s3cret-pw@127.0.0.1:{port}/0"
        world.env["GENDERSCORE_REDIS_URL"] = world.redis_url
        # Every key the system touches is under the prefix, or the ACL would refuse it.
        _score_end_to_end(world, folder, tmp_path / "out.csv")
        wrong_password = "wr0ng-Pa55w0rd"
        wrong = dict(
            world.env,
            GENDERSCORE_REDIS_URL=f"redis://genderscore:{wrong_password}@127.0.0.1:{port}/0",
        )
        proc = subprocess.run(
            [sys.executable, "-m", "producer.cli", "status"],
            env=worker_env(wrong),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "cannot reach Redis" in proc.stderr
        assert wrong_password not in proc.stdout + proc.stderr  # the password is never printed


def _make_cert(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_redis_over_tls_with_a_password(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 12, size=(48, 48))
    cert, key = _make_cert(tmp_path / "tls")
    port = free_port()
    args = (
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "tls-secret",
    )
    try:
        server = start_server(port, args, workdir=tmp_path / "redis")
    except LocalRedisError as exc:
        pytest.fail(
            f"this test needs a Redis built with TLS (the embedded Valkey has none): {exc}."
            " Install Debian's redis-server (apt-get install redis-server), as .ci/run does."
        )
    try:
        url = f"rediss://:tls-secret@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        world = FaultEnv(tmp_path, url, tiny_model)
        _score_end_to_end(world, folder, tmp_path / "out.csv")
    finally:
        server.stop(kill=True)


def test_worker_refuses_to_start_with_a_tampered_model(
    world: FaultEnv, tiny_model: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(tiny_model.read_bytes()[:-1] + b"\x01")
    tampered.with_suffix(".json").write_text(tiny_model.with_suffix(".json").read_text())
    env = dict(world.env, GENDERSCORE_MODEL=str(tampered))
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "score"],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "does not match its metadata" in proc.stdout + proc.stderr
