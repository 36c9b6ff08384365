"""Operator-facing contracts without a broker: settings, secrets, CSV cells, logs, CLI basics."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from producer.cli import main
from producer.metrics import error_kinds
from tests.helpers import ROOT
from worker.evaluation import read_scored
from worker.files import (
    neutralise,
    neutralise_column,
    unneutralise,
    write_csv_atomic,
    write_frame_atomic,
)
from worker.logs import JsonFormatter
from worker.results import redact
from worker.settings import (
    Settings,
    SettingsError,
    describe,
    load_settings,
    markdown_table,
    unknown_variables,
)

# --- settings ---------------------------------------------------------------------------


def test_a_cross_field_error_names_both_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERSCORE_SCORE_TIME_LIMIT", "2000")
    monkeypatch.setenv("GENDERSCORE_TRAINING_TIME_LIMIT", "9999999")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    for name in (
        "GENDERSCORE_SCORE_TIME_LIMIT=2000",
        "GENDERSCORE_VISIBILITY_TIMEOUT=900",
        "GENDERSCORE_TRAINING_TIME_LIMIT=9999999",
        "GENDERSCORE_TRAINING_VISIBILITY_TIMEOUT=604800",
    ):
        assert name in message
    assert "GENDERSCORE_?" not in message and "Value error" not in message


def test_a_field_error_shows_the_value_but_never_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERSCORE_BATCH_SIZE", "abc")
    with pytest.raises(SettingsError, match=r"GENDERSCORE_BATCH_SIZE='abc': Input should be"):
        load_settings()
    monkeypatch.delenv("GENDERSCORE_BATCH_SIZE")
    monkeypatch.setenv("GENDERSCORE_LOG_FORMAT", "yaml")
    with pytest.raises(SettingsError, match="GENDERSCORE_LOG_FORMAT='yaml'"):
        load_settings()


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    warnings = unknown_variables(
        {
            "GENDERSCORE_BATCHSIZE": "8",
            "GENDERSCORE_REDIS_URLL": "redis://x",
            "GENDERSCORE_ZZZ": "1",
            "GENDERSCORE_BATCH_SIZE": "8",  # a setting
            "GENDERSCORE_UID": "1000",  # docker-compose.yml's own
            "GENDERSCORE_TEST_REDIS_URL": "redis://x",  # the test suite's
            "PATH": "/bin",
        }
    )
    assert warnings == [
        "GENDERSCORE_BATCHSIZE is not a genderscore setting and is ignored "
        "(did you mean GENDERSCORE_BATCH_SIZE?)",
        "GENDERSCORE_REDIS_URLL is not a genderscore setting and is ignored "
        "(did you mean GENDERSCORE_REDIS_URL?)",
        "GENDERSCORE_ZZZ is not a genderscore setting and is ignored",
    ]


def test_describe_gives_every_setting_its_source_and_masks_passwords() -> None:
    s = Settings(redis_url="redis://app:hunter2@db:6379/0", batch_size=8)
    env = {"GENDERSCORE_REDIS_URL": "x", "genderscore_batch_size": "8"}
    rows = {name: (value, source) for name, value, source in describe(s, env)}
    assert set(rows) == {f"GENDERSCORE_{f.upper()}" for f in Settings.model_fields}
    assert rows["GENDERSCORE_REDIS_URL"] == ("redis://app:***@db:6379/0", "environment")
    assert rows["GENDERSCORE_BATCH_SIZE"] == ("8", "environment")
    assert rows["GENDERSCORE_MAX_DELIVERIES"] == ("3", "default")
    assert rows["GENDERSCORE_BROKER_URL"] == ("(none)", "default")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw1@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:p%40w2@h/0", "redis://user:***@h/0"),
        (
            "rediss://u:pw3@h:6380/0?ssl_cert_reqs=none",
            "rediss://u:***@h:6380/0?ssl_cert_reqs=none",
        ),
        ("unix://:pw4@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("unix:///run/redis.sock?db=0&password=pw5", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://h:6379/0?password=pw6&db=2", "redis://h:6379/0?password=***&db=2"),
        ("redis://h/0?PASSWORD=pw7", "redis://h/0?PASSWORD=***"),
        ("sentinel://:pw8@h1:1;sentinel://:pw9@h2:2", "sentinel://:***@h1:1;sentinel://:***@h2:2"),
        ("amqp://guest:pw10@rabbit//", "amqp://guest:***@rabbit//"),
    ],
)
def test_redact_masks_every_password_form(url: str, masked: str) -> None:
    assert redact(url) == masked
    assert not re.search(r"pw\d", redact(url))


def test_readme_settings_table_is_generated_from_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings table:")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- end of settings table -->")]
    assert block == markdown_table(), "regenerate it: python -m worker.settings --markdown"


# --- CSV cells ----------------------------------------------------------------------------

HOSTILE = ["=cmd|' /C calc'!A0", "@SUM(1+1)", "+1", "-A1", "\tx", "\rx", "ok", "a,b", 'say "hi"']


def test_formula_cells_are_neutralised_and_read_back() -> None:
    assert [neutralise(c) for c in HOSTILE] == [
        "'=cmd|' /C calc'!A0",
        "'@SUM(1+1)",
        "'+1",
        "'-A1",
        "'\tx",
        "'\rx",
        "ok",
        "a,b",
        'say "hi"',
    ]
    assert [unneutralise(neutralise(c)) for c in HOSTILE] == HOSTILE
    column = neutralise_column(pd.Series(HOSTILE, dtype="str"))
    assert list(column) == [neutralise(c) for c in HOSTILE]


def test_both_csv_writers_neutralise_and_write_the_same_bytes(tmp_path: Path) -> None:
    header = ["userid", "=note"]
    rows = [[c, c] for c in HOSTILE]
    write_csv_atomic(tmp_path / "rows.csv", header, rows)
    frame = pd.DataFrame(rows, columns=header)
    write_frame_atomic(tmp_path / "frame.csv", frame)
    plain = pd.DataFrame({"userid": ["-A1", "b"], "gender": ["female", "male"]})
    write_frame_atomic(tmp_path / "plain.csv", plain)  # no quoting needed: Arrow writes it
    write_csv_atomic(tmp_path / "plain_rows.csv", ["userid", "gender"], plain.values.tolist())
    assert (tmp_path / "rows.csv").read_bytes() == (tmp_path / "frame.csv").read_bytes()
    assert (tmp_path / "plain.csv").read_bytes() == b"userid,gender\n'-A1,female\nb,male\n"
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "plain_rows.csv").read_bytes()
    with (tmp_path / "rows.csv").open(newline="") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_evaluate_reads_a_neutralised_userid_back(tmp_path: Path) -> None:
    scored = tmp_path / "scored.csv"
    write_csv_atomic(
        scored,
        ["userid", "gender", "p_female"],
        [["-A1", "female", "0.900000"], ["b2", "male", "0.100000"]],
    )
    frame, skipped = read_scored(scored)
    assert list(frame["userid"]) == ["-A1", "b2"] and skipped == 0


# --- logs and metrics -----------------------------------------------------------------------


def test_json_log_records_are_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("genderscore.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('two\nlines and "quotes"')
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == 'two\nlines and "quotes"' and first["level"] == "WARNING"
    assert first["logger"] == "genderscore.test.json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    assert isinstance(first["process"], int) and first["process_name"]
    assert "ValueError: boom" in second["exception"]


def test_error_kinds_are_bounded() -> None:
    kinds = error_kinds(
        ["corrupt: x", "corrupt: y", "model_error: z", "$\\alpha$: crafted", "no colon", ""]
    )
    assert kinds == {"corrupt": 2, "model_error": 1, "other": 3}


# --- command line basics ------------------------------------------------------------------------


def test_version_and_short_help() -> None:
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and re.fullmatch(r"genderscore, version \S+\n", version.output)
    for args in (["-h"], ["score", "-h"], ["runs", "-h"], ["runs", "cancel", "-h"]):
        shown = runner.invoke(main, args)
        assert shown.exit_code == 0 and "Usage:" in shown.output, args


@pytest.mark.parametrize(
    "args",
    [
        ["score", "/nonexistent/folder"],
        ["collect", "some-run"],
        ["runs", "frobnicate"],
        ["status", "--limit", "many"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_a_query_password_is_moved_where_celery_masks_it() -> None:
    from kombu.utils.url import maybe_sanitize_url  # what Celery's banner prints with

    from worker.celery import password_in_userinfo

    url = password_in_userinfo("redis://127.0.0.1:6379/0?password=s3cr%40t&socket_timeout=3")
    assert url == "redis://:s3cr%40t@127.0.0.1:6379/0?socket_timeout=3"
    assert "s3cr" not in maybe_sanitize_url(url)
    assert password_in_userinfo("redis://u:pw@h/0") == "redis://u:pw@h/0"
    assert password_in_userinfo("amqp://g:g@h//") == "amqp://g:g@h//"
