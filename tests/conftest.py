"""Session fixtures: a real Redis (a dedicated database and key prefix), RabbitMQ, a tiny
model, a worker.

The environment is set before ``worker.settings`` is imported, so the test process and
every worker it starts share one configuration. A broker that cannot be reached or
started is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GENDERSCORE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
os.environ["GENDERSCORE_REDIS_URL"] = os.environ["GENDERSCORE_TEST_REDIS_URL"]
os.environ["GENDERSCORE_KEY_PREFIX"] = f"gstest{os.getpid()}"
os.environ["GENDERSCORE_FLUSH_INTERVAL"] = "0.2"
MODEL_DIR = Path(tempfile.mkdtemp(prefix="genderscore-test-model-"))
os.environ["GENDERSCORE_MODEL"] = str(MODEL_DIR / "tiny.h5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import redis  # noqa: E402

from tests.brokers import BrokerUnavailable, session_rabbitmq, session_redis  # noqa: E402
from tests.helpers import celery_worker, make_model_file  # noqa: E402


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@pytest.fixture(scope="session", autouse=True)
def local_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Where nothing answers at a local test URL, a private server on its port, for the
    session (redis-server on the PATH, else the embedded Valkey): every test and every
    process it starts finds Redis at the URL. Yields why none was started, if it failed.
    """
    url = os.environ["GENDERSCORE_REDIS_URL"]
    try:
        server = session_redis(url, tmp_path_factory.mktemp("redis"))
    except BrokerUnavailable as exc:
        yield str(exc)
        return
    yield ""
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def redis_client(local_redis_server: str) -> Iterator[redis.Redis]:
    """The test Redis, cleaned of this session's keys before and after."""
    url = os.environ["GENDERSCORE_REDIS_URL"]
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(local_redis_server or f"tests need Redis at {url}: {exc}")
    prefix = os.environ["GENDERSCORE_KEY_PREFIX"] + ":"
    _delete_prefix(client, prefix)
    yield client
    _delete_prefix(client, prefix)
    client.close()


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An AMQP URL of this session's own virtual host or private node (tests/brokers.py)."""
    try:
        with session_rabbitmq(tmp_path_factory.mktemp("rabbitmq")) as url:
            yield url
    except BrokerUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the session's shared files."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_model() -> Iterator[Path]:
    """A 32x32 genderscore CNN with metadata: GENDERSCORE_MODEL of the session."""
    path = make_model_file(Path(os.environ["GENDERSCORE_MODEL"]), image_size=32)
    yield path
    shutil.rmtree(MODEL_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def score_worker(redis_client: redis.Redis, tiny_model: Path, session_dir: Path) -> Iterator[Path]:
    """One real scoring worker (prefork, 2 processes) for the session; yields its log path."""
    log = session_dir / "score-worker.log"
    with celery_worker("score", concurrency=2, log_path=log):
        yield log
