"""Fixtures for fault tests: an isolated key prefix per test, CLI and workers as subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis

from producer.localredis import LocalRedis, start_server
from producer.localredis import free_port as free_port  # re-exported for the fault tests
from tests.brokers import RabbitNode
from tests.helpers import ROOT, celery_worker, worker_env
from worker.keys import RunKeys, run_keys
from worker.settings import settings


@contextmanager
def redis_server(
    workdir: Path, port: int | None = None, *args: str
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A private server on another port (AOF, auth, maxmemory... via ``args``): redis-server
    on the PATH, else the embedded Valkey (``producer.localredis``); killed at the end."""
    server = start_server(port, args, workdir=workdir)
    try:
        yield server.port, server.proc
    finally:
        server.stop(kill=True)


def wait_port(port: int, timeout: float = 10) -> None:
    """Wait until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class FaultEnv:
    """One test's world: its own key prefix (so its own queues) and settings."""

    def __init__(self, tmp_path: Path, redis_url: str, model: Path, **overrides: Any) -> None:
        self.tmp = tmp_path
        self.prefix = f"gsfault{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.env = {
            "GENDERSCORE_REDIS_URL": redis_url,
            "GENDERSCORE_KEY_PREFIX": self.prefix,
            "GENDERSCORE_MODEL": str(model),
            # Short, so that a killed worker's messages come back within a test; the time
            # limit leaves room for a pool process's TensorFlow start on a busy machine.
            "GENDERSCORE_VISIBILITY_TIMEOUT": "40",
            "GENDERSCORE_SCORE_TIME_LIMIT": "30",
            "GENDERSCORE_FLUSH_INTERVAL": "0.2",
            # The workers' own repair of runs whose messages were lost, quick enough for
            # a test to see it (the defaults are 30 and 60 s).
            "GENDERSCORE_REPAIR_INTERVAL": "2",
            "GENDERSCORE_REPAIR_STALL_SECONDS": "10",
        }
        self.env.update({f"GENDERSCORE_{k.upper()}": str(v) for k, v in overrides.items()})
        self.logs: list[Path] = []

    @property
    def client(self) -> redis.Redis:
        """A client of this world's Redis."""
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def patched(self) -> Any:
        """A context in which this process's settings use this world's key prefix."""
        return mock.patch.object(settings, "key_prefix", self.prefix)

    def keys(self, run_id: str) -> RunKeys:
        """The run's keys under this world's prefix."""
        with self.patched():
            return run_keys(run_id)

    def cli(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``genderscore ARGS`` as a subprocess in this world."""
        proc = subprocess.run(
            [sys.executable, "-m", "producer.cli", *args],
            cwd=ROOT,
            env=worker_env(self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"genderscore {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        """Start ``genderscore ARGS`` without waiting."""
        return subprocess.Popen(
            [sys.executable, "-m", "producer.cli", *args],
            cwd=ROOT,
            env=worker_env(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @contextmanager
    def worker(
        self, name: str = "w", concurrency: int = 2, app: str = "worker", **extra: str
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A real scoring worker of this world (``app``: a test app such as tests.poison)."""
        log = self.tmp / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        env = dict(self.env, **extra)
        with celery_worker(
            "score",
            concurrency=concurrency,
            extra_env=env,
            log_path=log,
            name=f"{name}{len(self.logs)}",
            app=app,
        ) as proc:
            yield proc

    def settled(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """Predictions and errors of a run."""
        keys = self.keys(run_id)
        return self.client.hgetall(keys.pred), self.client.hgetall(keys.err)

    def wait_settled(self, run_id: str, total: int, timeout: float) -> None:
        """Wait until ``total`` userids of the run are settled; fail with a diagnosis.

        This only watches: whatever was lost must be repaired by the product itself
        (the workers' repairer), never by the test.
        """
        keys = self.keys(run_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client.hlen(keys.pred) + self.client.hlen(keys.err) >= total:
                    return
            except redis.ConnectionError:
                pass
            time.sleep(0.25)
        pred, err = self.settled(run_id)
        client, p = self.client, f"{self.prefix}:"
        diagnosis = {
            "queued": client.llen(p + "score"),
            "unacked": client.hlen(p + "unacked"),
            "repairs": self.repairs(run_id),
        }
        raise AssertionError(
            f"run {run_id}: {len(pred)} + {len(err)} settled of {total}; {diagnosis}"
        )

    def repairs(self, run_id: str) -> int:
        """Userids the product re-published for a run after losing their messages."""
        return int(self.client.hget(self.keys(run_id).meta, "repairs") or 0)

    def deliveries(self, run_id: str) -> dict[str, int]:
        """userid -> deliveries counted by workers."""
        tries = self.client.hgetall(self.keys(run_id).tries)
        return {k: int(v) for k, v in tries.items() if ":" not in k}

    def cleanup(self) -> None:
        """Delete this world's keys."""
        try:
            client = self.client
            for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                client.delete(key)
        except redis.RedisError:
            pass


@pytest.fixture
def world(tmp_path: Path, tiny_model: Path, redis_client: redis.Redis) -> Iterator[FaultEnv]:
    """A fault-test world on the test Redis."""
    env = FaultEnv(tmp_path, os.environ["GENDERSCORE_REDIS_URL"], tiny_model)
    yield env
    env.cleanup()


AOF = ("--appendonly", "yes", "--appendfsync", "everysec")


class BrokerWorld(FaultEnv):
    """A fault-test world on either broker, with a broker of its own to restart.

    ``redis``: one private Redis with AOF is the broker and the results store (a broker
    restart restarts both, its data kept). ``rabbitmq``: a private RabbitMQ node is the
    broker, the session Redis keeps the results.
    """

    def __init__(self, tmp_path: Path, model: Path, broker: str) -> None:
        self.broker = broker
        self.node: RabbitNode | None = None
        self.redis: LocalRedis | None = None
        if broker == "redis":
            self.redis = start_server(None, AOF, workdir=tmp_path / "redis")
            super().__init__(tmp_path, self.redis.url, model)
        else:
            self.node = RabbitNode(tmp_path / "rabbitmq")
            self.node.start()
            super().__init__(tmp_path, os.environ["GENDERSCORE_REDIS_URL"], model)
            self.env["GENDERSCORE_BROKER_URL"] = self.node.url

    def restart_broker(self, down_for: float = 0) -> None:
        """Stop the broker cleanly (data kept), wait ``down_for`` seconds, start it again."""
        if self.node is not None:
            self.node.stop()
            time.sleep(down_for)
            self.node.start()
            return
        assert self.redis is not None
        port, workdir = self.redis.port, self.redis.workdir
        self.client.shutdown()  # a clean stop: the AOF is flushed
        self.redis.proc.wait(10)
        time.sleep(down_for)
        self.redis = start_server(port, AOF, workdir=workdir)

    def close(self) -> None:
        """Stop this world's broker and delete its keys."""
        self.cleanup()
        if self.node is not None:
            self.node.stop(kill=True)
        if self.redis is not None:
            self.redis.stop(kill=True)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_world(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> Iterator[BrokerWorld]:
    """A fault-test world, once with Redis and once with RabbitMQ as broker."""
    world = BrokerWorld(tmp_path, tiny_model, request.param)
    try:
        yield world
    finally:
        world.close()
