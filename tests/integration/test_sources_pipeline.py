"""``genderscore score`` from an S3 prefix and from a manifest of URLs, end to end.

Real parts only: the SeaweedFS S3 store and the picture HTTP server of ``tests.servers``,
the test Redis, a real scoring worker, and the command run as a subprocess, so that the
credentials it uses come from the AWS_* variables of its environment and nothing else.
Everything runs under a key prefix of this module's own (the session's worker never
sees these messages, and this worker has short fetch timeouts). A second prefix has no
worker at all: what the producer published can be read back from its queue.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import redis
from click.testing import CliRunner

from producer.cli import main
from tests.helpers import (
    ROOT,
    background,
    celery_worker,
    jpeg_bytes,
    picture,
    wait_until,
    worker_env,
)
from tests.servers import (  # noqa: F401 - fixtures
    ADMIN_KEY,
    ADMIN_SECRET,
    READER_KEY,
    READER_SECRET,
    HttpPictures,
    S3Store,
    http_pictures,
    http_server,
    s3_server,
)
from worker.keys import nightly_lock, run_keys, scored_index
from worker.settings import settings

BUCKET = "src10"
PREFIX = f"s3://{BUCKET}/profiles/image/"
NIGHTLY = f"s3://{BUCKET}/nightly/"
COUNT = 24


@dataclass
class World:
    """A key prefix with a worker (``env``) and one without (``idle_env``)."""

    client: redis.Redis
    store: S3Store
    env: dict[str, str]
    idle_env: dict[str, str]
    worker_log: Path
    cli_output: list[str] = field(default_factory=list)

    def cli(
        self, *args: str, idle: bool = False, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """``genderscore ARGS`` as a subprocess of this world's environment."""
        proc = subprocess.run(
            [sys.executable, "-m", "producer.cli", *args],
            cwd=ROOT,
            env=worker_env(self.idle_env if idle else self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.cli_output.append(proc.stdout + proc.stderr)
        return proc

    def prefix(self, idle: bool = False) -> str:
        return (self.idle_env if idle else self.env)["GENDERSCORE_KEY_PREFIX"]

    def queued(self) -> list[list[str]]:
        """The arguments of the score messages waiting in the idle prefix's queue."""
        raw = self.client.lrange(f"{self.prefix(idle=True)}:score", 0, -1)
        return [json.loads(base64.b64decode(json.loads(m)["body"]))[0] for m in raw]

    def key(self, build: object, *args: str, idle: bool = False) -> str:
        with mock.patch.object(settings, "key_prefix", self.prefix(idle)):
            return build(*args)  # type: ignore[operator, no-any-return]

    def dump(self) -> str:
        """Every key and value of both prefixes, as text."""
        parts = []
        for prefix in (self.prefix(), self.prefix(idle=True)):
            for key in self.client.scan_iter(match=f"{prefix}:*", count=1000):
                parts.append(f"{key} {self._value(key)}")
        return "\n".join(parts)

    def _value(self, key: str) -> object:
        kind = self.client.type(key)
        if kind == "string":
            return self.client.get(key)
        if kind == "hash":
            return self.client.hgetall(key)
        if kind == "list":
            return self.client.lrange(key, 0, -1)
        if kind == "set":
            return self.client.smembers(key)
        if kind == "zset":
            return self.client.zrange(key, 0, -1, withscores=True)
        return kind


def one_line_failure(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The one error line of a failed command (no traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines
    return lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def errors_of(out: Path) -> dict[str, str]:
    """userid -> error kind, from the errors CSV beside ``out``."""
    rows = read_csv(out.with_name(out.stem + ".errors.csv"))
    return {r["userid"]: r["error"].split(":", 1)[0] for r in rows}


def pictures(count: int, offset: int = 0) -> dict[str, bytes]:
    return {
        f"s{i:03d}": jpeg_bytes(picture("female" if i % 2 else "male", seed=i + offset))
        for i in range(count)
    }


@pytest.fixture(scope="module")
def hanging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpPictures]:
    """A second HTTP server, for the URL that never answers: a store of its own, so that
    its outage does not hold back the other server's pictures in the same batch."""
    with http_pictures(tmp_path_factory.mktemp("hanging")) as server:
        yield server


@pytest.fixture(scope="module")
def world(
    redis_client: redis.Redis,
    tiny_model: Path,
    s3_server: S3Store,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    common = {"GENDERSCORE_MODEL": str(tiny_model), **s3_server.env()}
    nightly_out = tmp_path_factory.mktemp("nightly-out")
    env = {
        **common,
        "GENDERSCORE_KEY_PREFIX": f"gssrc{tag}",
        "GENDERSCORE_FETCH_TIMEOUT": "1",
        "GENDERSCORE_FETCH_ATTEMPTS": "1",
        # Read by the worker when beat (started by the nightly test only) sends the task.
        "GENDERSCORE_NIGHTLY_SOURCE": NIGHTLY,
        "GENDERSCORE_NIGHTLY_OUTPUT_DIR": str(nightly_out),
        "GENDERSCORE_NIGHTLY_CRON": "2",
        "GENDERSCORE_NIGHTLY_POLL_SECONDS": "0.5",
        "GENDERSCORE_NIGHTLY_LOCK_SECONDS": "120",
    }
    idle_env = {**common, "GENDERSCORE_KEY_PREFIX": f"gssrq{tag}"}
    fs = s3_server.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    files = {f"{BUCKET}/profiles/image/{u}.jpg": data for u, data in pictures(COUNT).items()}
    files[f"{BUCKET}/profiles/image/notes.txt"] = b"not a picture"
    files[f"{BUCKET}/profiles/image/bad id.jpg"] = b"x"
    fs.pipe(files)
    log = tmp_path_factory.mktemp("src10") / "worker.log"
    world = World(redis_client, s3_server, env, idle_env, log)
    try:
        with celery_worker("score", concurrency=2, extra_env=env, log_path=log, name="src"):
            yield world
    finally:
        for prefix in (world.prefix(), world.prefix(idle=True)):
            for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000):
                redis_client.delete(key)


# --- an S3 prefix ------------------------------------------------------------------------


def test_score_an_s3_prefix_end_to_end_without_leaking_credentials(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "prefix.csv"
    proc = world.cli("score", PREFIX, "--wait", "--out", str(out), "--timeout", "150")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    assert "skipped 2 files" in proc.stderr
    assert "'notes.txt': not a picture" in proc.stderr and "'bad id.jpg'" in proc.stderr
    rows = read_csv(out)
    assert [r["userid"] for r in rows] == sorted(pictures(COUNT))  # one row each, no more
    assert all(r["gender"] in ("female", "male") for r in rows)
    assert errors_of(out) == {}
    meta = world.client.hgetall(world.key(lambda r: run_keys(r).meta, run_id))
    assert meta["source"] == f"prefix:{PREFIX}"
    ids = world.client.hgetall(world.key(lambda r: run_keys(r).ids, run_id))
    assert ids == {u: f"{u}.jpg" for u in pictures(COUNT)}  # names, no host path
    # The worker kept the listing's ETag of each picture: what --only-new compares.
    index = world.client.hgetall(world.key(scored_index, meta["model_sha"]))
    assert set(index) == set(pictures(COUNT)) and all(v.startswith("e:") for v in index.values())

    # What a message carries, read from a queue no worker consumes: the object's URL
    # and its version token, nothing of this host and no credential.
    queued = world.cli("score", PREFIX, "--run-id", "carried", idle=True)
    assert queued.returncode == 0, queued.stderr
    messages = world.queued()
    assert len(messages) == COUNT
    for args in messages:
        run, userid, where, _model, _sha, version = args
        assert (run, where) == ("carried", f"{PREFIX}{userid}.jpg")
        assert version == index[userid]

    # Credentials only from the environment: none in Redis, the logs or any output.
    secrets = (ADMIN_SECRET, ADMIN_KEY)
    text = world.dump() + world.worker_log.read_text(errors="replace")
    text += "\n".join(world.cli_output)
    for secret in secrets:
        assert secret not in text
    world.client.delete(f"{world.prefix(idle=True)}:score")

    # --local: the same objects fetched and scored in this process, the same results.
    local = tmp_path / "local.csv"
    result = CliRunner().invoke(
        main, ["score", PREFIX, "--local", "--out", str(local)], env=world.store.env()
    )
    assert result.exit_code == 0, result.output
    by_worker = {r["userid"]: float(r["p_female"]) for r in rows}
    local_rows = read_csv(local)
    assert [r["userid"] for r in local_rows] == sorted(by_worker)
    for row in local_rows:
        assert abs(float(row["p_female"]) - by_worker[row["userid"]]) < 1e-5, row


def test_only_new_on_a_prefix_uses_the_listing(world: World, tmp_path: Path) -> None:
    first = tmp_path / "first.csv"  # scores what is not scored yet (nothing, after the above)
    proc = world.cli("score", PREFIX, "--only-new", "--wait", "--out", str(first))
    assert proc.returncode == 0, proc.stderr
    again = world.cli("score", PREFIX, "--only-new", "--wait", "--out", str(tmp_path / "0.csv"))
    assert again.returncode == 0, again.stderr
    assert f"--only-new: {COUNT} pictures already scored" in again.stderr
    assert ": 0 tasks enqueued" in again.stderr
    # Overwrite one object with another picture: its ETag changes, it alone is new.
    changed = pictures(1, offset=500)["s000"]
    world.store.filesystem().pipe(f"{BUCKET}/profiles/image/s005.jpg", changed)
    out = tmp_path / "changed.csv"
    proc = world.cli("score", PREFIX, "--only-new", "--wait", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"--only-new: {COUNT - 1} pictures already scored" in proc.stderr
    assert ": 1 tasks enqueued" in proc.stderr
    assert [r["userid"] for r in read_csv(out)] == ["s005"]


def refusal(args: list[str], env: Mapping[str, str | None], code: int = 2) -> str:
    """The one error line of ``genderscore ARGS``, run in this process with ``env``
    (it fails before Redis: any key prefix will do)."""
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_missing_bucket_and_denied_listing_are_one_line(world: World) -> None:
    env = world.store.env()
    line = refusal(["score", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x/"], env)
    assert "no such bucket or prefix" in line
    line = refusal(["score", f"s3://{BUCKET}/no/such/prefix/"], env)
    assert "no such bucket or prefix" in line
    # --allow-empty: a prefix with nothing under it is an empty run; a missing bucket
    # is still refused.
    empty = ["score", f"s3://{BUCKET}/no/such/prefix/", "--allow-empty"]
    result = CliRunner().invoke(main, empty, env=env)
    assert result.exit_code == 0 and ": 0 tasks enqueued" in result.output, result.output
    missing = ["score", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x/", "--allow-empty"]
    assert "no such bucket or prefix" in refusal(missing, env)
    # The reader identity may read objects but not list them: S3's own 403.
    denied = world.store.env(READER_KEY, READER_SECRET)
    line = refusal(["score", PREFIX], denied)
    assert "access denied" in line and READER_SECRET not in line
    # No credentials at all: said so, before any request.
    bare: dict[str, str | None] = {name: None for name in env}
    bare |= {"AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"], "AWS_EC2_METADATA_DISABLED": "true"}
    bare |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    assert "AWS_ACCESS_KEY_ID" in refusal(["score", PREFIX], bare)
    # A store that does not answer: exit 3, as for Redis or the broker.
    down = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    assert "cannot reach the store" in refusal(["score", PREFIX], down, code=3)
    # A scheme that cannot be listed, and credentials in the URL, are refused before
    # any request.
    assert "--manifest" in refusal(["score", "https://example.com/p/"], env)
    line = refusal(["score", f"s3://key:{ADMIN_SECRET}@{BUCKET}/p/"], env)
    assert ADMIN_SECRET not in line and "AWS_ACCESS_KEY_ID" in line


def test_reconcile_a_prefix_run_from_its_recorded_source(world: World) -> None:
    proc = world.cli("score", PREFIX, "--run-id", "repair-prefix", idle=True)
    assert proc.returncode == 0, proc.stderr
    queue = f"{world.prefix(idle=True)}:score"
    world.client.delete(queue)  # the messages are lost
    ids_key = world.key(lambda r: run_keys(r).ids, "repair-prefix", idle=True)
    world.client.hdel(ids_key, "s001", "s002")  # and Redis lost part of the id set
    fixed = world.cli("reconcile", "repair-prefix", idle=True)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == str(COUNT - 2)  # what the id set still knows
    messages = world.queued()
    assert sorted(m[1] for m in messages) == sorted(set(pictures(COUNT)) - {"s001", "s002"})
    # Listed again: each message carries the object's URL and its current ETag.
    assert all(m[2] == f"{PREFIX}{m[1]}.jpg" and m[5].startswith("e:") for m in messages)
    world.client.delete(queue)
    # The source given again restores the userids Redis lost.
    fixed = world.cli("reconcile", "repair-prefix", "--source", PREFIX, idle=True)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == str(COUNT)
    assert sorted(m[1] for m in world.queued()) == sorted(pictures(COUNT))
    world.client.delete(queue)


# --- a manifest of URLs ------------------------------------------------------------------


def test_score_a_manifest_of_urls_with_every_failure(
    world: World,
    http_server: HttpPictures,  # noqa: F811
    hanging: HttpPictures,
    tmp_path: Path,
) -> None:
    good = pictures(4, offset=100)
    for userid, data in good.items():
        (http_server.folder / f"m{userid}.jpg").write_bytes(data)
    served = {f"m{u}": http_server.url(f"/pics/m{u}.jpg") for u in good}
    expected_errors = {
        "gone": (http_server.url("/pics/gone.jpg"), "not_found"),
        "nokey": (f"{PREFIX}nothere.jpg", "not_found"),  # a missing key of the store
        # A redirect to the cloud metadata service: refused by the worker, not followed.
        "redirected": (
            http_server.url("/redirect?to=http://169.254.169.254/latest/meta-data/"),
            "blocked_url",
        ),
        "denied": (http_server.url("/status/403"), "forbidden"),
        "huge": (http_server.url("/huge"), "too_large"),
        "loop": (http_server.url("/loop/a"), "fetch_failed"),
        "html": (http_server.url("/page.jpg"), "not_an_image"),
        "hangs": (hanging.url("/hang"), "timeout"),
    }
    lines = ["userid,url"]
    lines += [f"{u},{url}" for u, url in served.items()]
    lines.append(f"fromS3,{PREFIX}s010.jpg")  # a manifest may mix stores
    lines += [f"{u},{url}" for u, (url, _) in expected_errors.items()]
    refused = {
        "meta": "http://169.254.169.254/latest/meta-data/",
        "ftp": "ftp://example.com/a.jpg",
        "js": "javascript:alert(1)",
        "data": "data:image/png;base64,iVBORw0KGgo=",
        "bad id": served[next(iter(served))],
    }
    lines += [f'{u},"{url}"' for u, url in refused.items()]
    first = next(iter(served))
    lines.append(f"{first},{served[first]}")  # the same line again
    lines += ["twice,http://a.example/1.jpg", "twice,http://a.example/2.jpg"]
    manifest = tmp_path / "pictures.csv"
    manifest.write_text("\n".join(lines) + "\n")
    before = http_server.stats()

    out = tmp_path / "manifest.csv"
    proc = world.cli("score", "--manifest", str(manifest), "--wait", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "refused 8 manifest lines:" in proc.stderr
    for reason in (
        "(meta): http://169.254.169.254/latest/meta-data/: address 169.254.169.254 is in a "
        "blocked network",
        "(ftp): scheme 'ftp' is not allowed",
        "(js): scheme 'javascript' is not allowed",
        "(data): scheme 'data' is not allowed",
        "(bad id): not a valid userid",
        f"({first}): duplicate of line 2",
        "(twice): userid twice has different urls on lines",
    ):
        assert reason in proc.stderr, reason
    rows = read_csv(out)
    assert sorted(r["userid"] for r in rows) == sorted([*served, "fromS3"])
    assert errors_of(out) == {u: kind for u, (_, kind) in expected_errors.items()}
    run_id = proc.stdout.splitlines()[0]
    meta = world.client.hgetall(world.key(lambda r: run_keys(r).meta, run_id))
    assert meta["source"] == f"manifest:{manifest.name}"  # the file's name, not its path
    assert str(tmp_path) not in world.dump()
    # The 5 GiB body was refused from its Content-Length, not downloaded.
    after = http_server.stats()
    assert after["huge"] > before.get("huge", 0)
    assert after.get("huge_bytes", 0) < 8 * 1024**2

    # The same manifest scored in this process: the same pictures and errors.
    local = tmp_path / "local.csv"
    quick = [line for line in lines if not line.startswith("hangs,")]
    manifest.write_text("\n".join(quick) + "\n")
    result = CliRunner().invoke(
        main,
        ["score", "--manifest", str(manifest), "--local", "--out", str(local)],
        env=world.store.env(),
    )
    assert result.exit_code == 0, result.output
    assert sorted(r["userid"] for r in read_csv(local)) == sorted([*served, "fromS3"])
    by_worker = {r["userid"]: float(r["p_female"]) for r in rows}
    for row in read_csv(local):
        assert abs(float(row["p_female"]) - by_worker[row["userid"]]) < 1e-5, row
    assert errors_of(local) == {u: kind for u, (_, kind) in expected_errors.items() if u != "hangs"}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "the manifest is empty"),
        ("userid,picture\na,http://h/a.jpg\n", "no 'url' column"),
        ("userid,url\n", "no picture lines after the header"),
        ("userid,url\na,ftp://h/a.jpg\n", "no picture to score in manifest"),
    ],
)
def test_unusable_manifests_are_one_line(tmp_path: Path, content: str, says: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    result = CliRunner().invoke(main, ["score", "--manifest", str(manifest)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_reconcile_a_manifest_run(world: World, tmp_path: Path) -> None:
    manifest = tmp_path / "few.csv"
    manifest.write_text("userid,url\na1,http://a.example/1.jpg\na2,http://a.example/2.jpg\n")
    proc = world.cli("score", "--manifest", str(manifest), "--run-id", "repair-m", idle=True)
    assert proc.returncode == 0, proc.stderr
    queue = f"{world.prefix(idle=True)}:score"
    world.client.delete(queue)
    # Redis lost the run's userids: the manifest, which Redis never held, is needed.
    world.client.delete(world.key(lambda r: run_keys(r).ids, "repair-m", idle=True))
    line = one_line_failure(world.cli("reconcile", "repair-m", idle=True), 2)
    assert "pass --manifest FILE again" in line
    fixed = world.cli("reconcile", "repair-m", "--manifest", str(manifest), idle=True)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == "2"
    assert sorted((m[1], m[2]) for m in world.queued()) == [
        ("a1", "http://a.example/1.jpg"),  # each message carries its manifest URL
        ("a2", "http://a.example/2.jpg"),
    ]
    world.client.delete(queue)


# --- the nightly run on a prefix ------------------------------------------------------------


def test_nightly_run_on_a_prefix_scores_new_and_changed_objects(
    world: World, tmp_path: Path
) -> None:
    out = Path(world.env["GENDERSCORE_NIGHTLY_OUTPUT_DIR"])
    fs = world.store.filesystem()
    first = {f"n{u}": data for u, data in pictures(6, offset=300).items()}
    fs.pipe({f"{BUCKET}/nightly/{u}.jpg": data for u, data in first.items()})

    def dated() -> list[Path]:
        found = out.glob("*-nightly-*.csv")
        return sorted(p for p in found if not p.name.endswith(".errors.csv"))

    beat = [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel=INFO"]
    beat += ["-s", str(tmp_path / "schedule")]
    lock = world.key(nightly_lock)
    with background(beat, tmp_path / "beat.log", world.env):
        wait_until(lambda: len(dated()) >= 1, 120, "the first nightly CSV")
        assert [r["userid"] for r in read_csv(dated()[0])] == sorted(first)
        # Change the prefix under the lock, so that no run sees half of the change.
        wait_until(lambda: world.client.set(lock, "test", nx=True, ex=60), 60, "the lock")
        try:
            fs.pipe(f"{BUCKET}/nightly/ns003.jpg", pictures(1, offset=900)["s000"])
            fs.pipe(f"{BUCKET}/nightly/added.jpg", pictures(1, offset=901)["s000"])
        finally:
            world.client.delete(lock)
        wait_until(lambda: len(dated()) >= 2, 120, "the second nightly CSV")
    assert [r["userid"] for r in read_csv(dated()[1])] == ["added", "ns003"]
    assert "Traceback" not in world.worker_log.read_text(errors="replace")


def test_no_credential_anywhere_after_every_run(world: World) -> None:
    """After all of the above (runs, errors, repairs, nightly runs): Redis, the worker's
    log and every command's output still hold no credential of the store."""
    text = world.dump() + world.worker_log.read_text(errors="replace")
    text += "\n".join(world.cli_output)
    for secret in (ADMIN_SECRET, ADMIN_KEY, READER_SECRET):
        assert secret not in text
    assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text
