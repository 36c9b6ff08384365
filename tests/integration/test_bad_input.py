"""Bad input through the real pipeline: bad pictures, hostile userids, duplicates, pickle."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import time
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from producer.cli import main
from tests.badfiles import ANY, BAD_FILES, SCORE
from tests.helpers import make_pictures, userid
from tests.integration.test_pipeline import read_csv
from worker.celery import app
from worker.keys import prefix, run_keys


def test_bad_pictures_become_typed_errors_good_ones_are_scored(
    tmp_path: Path, score_worker: Path, redis_client: redis.Redis
) -> None:
    folder = tmp_path / "pictures"
    good = make_pictures(folder, 40)
    bad_ids = {}
    for n, (name, (make, expected)) in enumerate(sorted(BAD_FILES.items())):
        uid = f"bad-{n:02d}-{name.replace('_', '-')}"
        (folder / f"{uid}.jpg").write_bytes(make())
        bad_ids[uid] = expected
    out = tmp_path / "run.csv"
    result = CliRunner().invoke(
        main, ["score", str(folder), "--wait", "--out", str(out), "--timeout", "180"]
    )
    assert result.exit_code == 0, result.output
    scored = {r["userid"]: r for r in read_csv(out)}
    errors = {r["userid"]: r["error"] for r in read_csv(tmp_path / "run.errors.csv")}
    assert set(scored) | set(errors) == set(good) | set(bad_ids)
    assert not set(scored) & set(errors)
    assert set(good) <= set(scored)
    for uid, expected in bad_ids.items():
        if expected == SCORE:
            assert uid in scored, (uid, errors.get(uid))
        elif expected != ANY:
            assert errors.get(uid, "").startswith(expected + ":"), (uid, errors.get(uid))
    # No pool process died: each of the two processes loaded the model once, no more.
    log = score_worker.read_text(errors="replace")
    assert "WorkerLostError" not in log
    pids = re.findall(r"model loaded: .* pid=(\d+)", log)
    assert 1 <= len(pids) == len(set(pids)) <= 2


def test_unsafe_names_are_skipped_by_the_producer(tmp_path: Path, score_worker: Path) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 3)
    outside = tmp_path / "secret.jpg"
    make_pictures(tmp_path / "elsewhere", 2)
    outside.write_bytes((tmp_path / "elsewhere" / f"{userid(0)}.jpg").read_bytes())
    os.symlink(outside, folder / "linked.jpg")
    os.link(tmp_path / "elsewhere" / f"{userid(1)}.jpg", folder / "hardlinked.jpg")
    (folder / "..jpg").write_bytes(b"x")
    (folder / ("a" * 65 + ".jpg")).write_bytes(b"x")
    (folder / "\u0430bc.jpg").write_bytes(b"x")  # Cyrillic a
    (folder / "twice.jpg").write_bytes(b"x")
    (folder / "twice.png").write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"x")
    # Any case of .jpg, .jpeg, .png, .webp is a picture: these two are read (and fail).
    (folder / "upper.JPG").write_bytes(b"x")
    (folder / "other.Jpeg").write_bytes(b"<html>")
    out = tmp_path / "run.csv"
    result = CliRunner().invoke(
        main, ["score", str(folder), "--wait", "--out", str(out), "--timeout", "120"]
    )
    assert result.exit_code == 0, result.output
    assert [r["userid"] for r in read_csv(out)] == sorted(userid(n) for n in range(3))
    errors = {r["userid"]: r["error"] for r in read_csv(tmp_path / "run.errors.csv")}
    assert {u: e.split(":")[0] for u, e in errors.items()} == {
        "upper": "not_an_image",
        "other": "not_an_image",
    }
    skipped = result.output.split("skipped", 1)[1]
    for name, why in (
        ("linked.jpg", "symbolic link"),
        ("hardlinked.jpg", "hard link"),
        ("..jpg", "invalid userid"),
        ("a" * 65, "invalid userid"),
        ("\\u0430bc.jpg", "invalid userid"),
        ("twice.jpg", "has 2 pictures"),
        ("twice.png", "has 2 pictures"),
        ("notes.txt", "is not a picture"),
    ):
        line = next((line for line in skipped.splitlines() if f"  '{name}" in line), "")
        assert why in line, (name, line)


def test_hostile_messages_are_dropped_before_anything_is_stored(
    tmp_path: Path, score_worker: Path, redis_client: redis.Redis, tiny_model: Path
) -> None:
    folder = tmp_path / "pictures"
    (good,) = make_pictures(folder, 1)
    run_id = f"hostile-{uuid.uuid4().hex[:6]}"
    keys = run_keys(run_id)
    sha = json.loads(tiny_model.with_suffix(".json").read_text())["sha256"]
    redis_client.hset(keys.meta, mapping={"total": 3, "sealed": 1, "model_sha": sha})
    model, picture = str(tiny_model), str(folder / f"{good}.jpg")
    huge = "u" * 2_000_000
    malformed = [
        (run_id, "../../etc/passwd", picture, model, sha),
        (run_id, "/etc/passwd", picture, model, sha),
        (run_id, "abc\x00def", picture, model, sha),
        (run_id, "a" * 65, picture, model, sha),
        (run_id, "=cmd|' /C calc'!A0", picture, model, sha),
        (run_id, "@SUM(1+1)", picture, model, sha),
        (run_id, huge, picture, model, sha),
        ("x" * 2_000_000, good, picture, model, sha),
        (None, good, picture, model, sha),
        (run_id, good, picture, model),  # a field missing
        (run_id, good, picture, "/etc/passwd", sha),  # not a .h5
        (run_id, good, picture, model, "not-a-sha"),
    ]
    # Well-formed, but naming files that are not this userid's picture.
    outside = [
        (run_id, "victim1", "/etc/passwd", model, sha),
        (run_id, "victim2", "relative/victim2.jpg", model, sha),
    ]
    log_start = score_worker.stat().st_size
    for args in [*malformed, *outside, (run_id, good, picture, model, sha)]:
        app.send_task("genderscore.score", args=args)
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and redis_client.hlen(keys.pred) + redis_client.hlen(keys.err) < 3
    ):
        time.sleep(0.2)
    time.sleep(1)
    with score_worker.open("rb") as handle:
        handle.seek(log_start)
        log = handle.read().decode(errors="replace")
    dropped = [line for line in log.splitlines() if "dropping malformed message" in line]
    assert len(dropped) == len(malformed), log[-3000:]
    assert max(len(line) for line in dropped) < 600  # never the 2 MB value
    assert set(redis_client.hkeys(keys.pred)) == {good}
    errors = redis_client.hgetall(keys.err)
    assert {u: e.split(":")[0] for u, e in errors.items()} == {
        "victim1": "invalid_reference",  # a path that is not <userid>.<ext>
        "victim2": "blocked_url",  # neither an absolute path nor an allowed URL
    }
    # Nothing of a malformed message was stored: no tries, no run named "None" or "xxx...".
    assert set(redis_client.hkeys(keys.tries)) == {good, "victim1", "victim2"}
    assert not redis_client.exists(run_keys("None").meta)
    assert not redis_client.exists(run_keys("None").tries)
    assert redis_client.ttl(keys.tries) > 0  # keys written by workers expire


def test_same_userid_twice_in_a_run_gives_one_row(
    tmp_path: Path, score_worker: Path, redis_client: redis.Redis
) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 5)
    runner = CliRunner()
    first = runner.invoke(main, ["score", str(folder), "--run-id", "dup-run-1"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        main,
        [
            "score",
            str(folder),
            "--run-id",
            "dup-run-1",
            "--wait",
            "--out",
            str(tmp_path / "dup.csv"),
            "--timeout",
            "60",
        ],
    )
    assert second.exit_code == 0, second.output
    assert "0 tasks enqueued, 5 already in the run" in second.output
    rows = read_csv(tmp_path / "dup.csv")
    assert len(rows) == 5 and len({r["userid"] for r in rows}) == 5


class _Touch:
    """Unpickling this runs ``Path.touch`` on the path: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_a_pickle_that_runs_code_when_loaded_touches_the_marker(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Touch(marker)))  # what the worker must never do
    assert marker.exists()


def test_pickle_message_is_refused_and_runs_nothing(
    tmp_path: Path, score_worker: Path, redis_client: redis.Redis, tiny_model: Path
) -> None:
    folder = tmp_path / "pictures"
    make_pictures(folder, 1)
    run_id = "pickled-run"
    marker = tmp_path / "pwned"
    # A pickle that creates the marker file when it is loaded, as an attacker's would.
    body = pickle.dumps(
        ((run_id, userid(0), str(folder), str(tiny_model)), {}, {"x": _Touch(marker)})
    )
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {
            "lang": "py",
            "task": "genderscore.score",
            "id": str(uuid.uuid4()),
            "argsrepr": "",
            "kwargsrepr": "",
            "retries": 0,
        },
        "properties": {
            "correlation_id": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "score"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    redis_client.lpush(prefix() + "score", json.dumps(message))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "ContentDisallowed" not in score_worker.read_text():
        time.sleep(0.2)
    log = score_worker.read_text()
    assert "ContentDisallowed" in log or "application/x-python-serialize" in log
    time.sleep(1)
    assert not redis_client.exists(run_keys(run_id).pred)
    assert not redis_client.exists(run_keys(run_id).tries)
    assert not marker.exists()
    assert redis_client.llen(prefix() + "score") == 0


@pytest.mark.parametrize("reason", ["missing"])
def test_collect_refuses_an_incomplete_run(
    reason: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    run_id = "incomplete-run"
    keys = run_keys(run_id)
    redis_client.hset(
        keys.meta, mapping={"total": 3, "sealed": 1, "model_sha": "ab" * 32, "started_at": "1"}
    )
    redis_client.hset(keys.ids, mapping={u: f"{u}.jpg" for u in ("u1", "u2", "u3")})
    redis_client.hset(keys.pred, "u1", "0.900000|f|1764000000")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(main, ["collect", run_id, "--out", str(out)])
    assert result.exit_code != 0 and "2 userids" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["collect", run_id, "--out", str(out), "--partial"])
    assert result.exit_code == 0, result.output
    assert [r["userid"] for r in read_csv(out)] == ["u1"]
    errors = read_csv(tmp_path / "out.errors.csv")
    assert [(r["userid"], r["error"].split(":")[0]) for r in errors] == [
        ("u2", reason),
        ("u3", reason),
    ]
