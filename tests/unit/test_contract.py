"""Pinned contracts: the Redis key schema, the stored prediction format, settings, README."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from tests.helpers import ROOT
from worker import keys
from worker.labels import encode_gender_like, parse_gender
from worker.results import decode_prediction, encode_prediction
from worker.scoring import Scored
from worker.settings import Settings, SettingsError, load_settings, settings


def test_key_schema_is_pinned() -> None:
    with mock.patch.object(settings, "key_prefix", "gs"):
        run = keys.run_keys("r1")
        assert run.all() == (
            "gs:run:r1:meta",
            "gs:run:r1:ids",
            "gs:run:r1:pred",
            "gs:run:r1:err",
            "gs:run:r1:tries",
        )
        assert keys.runs_index() == "gs:runs"
        assert keys.scored_index("abc") == "gs:scored:abc"
        assert keys.training_progress("t") == "gs:train:t"
        assert keys.nightly_lock() == "gs:lock:nightly"
        assert keys.model_loads() == "gs:model_loads"


def test_prediction_round_trip_is_compact() -> None:
    value = encode_prediction(Scored("u", 0.1234567, "male"), 1764000000.9)
    assert value == "0.123457|m|1764000000"
    stored = decode_prediction(value)
    assert (stored.p_female, stored.gender, stored.scored_at) == (0.123457, "male", 1764000000)


@pytest.mark.parametrize(
    ("raw", "word"),
    [
        ("0", "male"),
        ("1.0", "female"),
        (" female ", "female"),
        ("M", "male"),
        ("2", None),
        ("", None),
        ("nan", None),
    ],
)
def test_gender_parsing(raw: str, word: str | None) -> None:
    assert parse_gender(raw) == word


def test_gender_is_written_in_the_files_own_coding() -> None:
    assert encode_gender_like("female", ["0.0", "1.0"]) == "1.0"
    assert encode_gender_like("male", ["1", "0"]) == "0"
    assert encode_gender_like("female", ["male"]) == "female"
    assert encode_gender_like("male", []) == "0.0"


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERSCORE_BATCH_SIZE", "zero")
    with pytest.raises(SettingsError, match="GENDERSCORE_BATCH_SIZE"):
        load_settings()
    monkeypatch.setenv("GENDERSCORE_BATCH_SIZE", "64")
    monkeypatch.setenv("GENDERSCORE_SCORE_TIME_LIMIT", "2000")
    with pytest.raises(SettingsError, match="must be below"):
        load_settings()


def test_readme_lists_every_setting_and_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"GENDERSCORE_{name.upper()}" in readme, name
    assert "pip install -e '.[dev]' && genderscore demo" in readme
    assert "python3 -m pytest" in readme
    assert "python3 -m pytest" in (ROOT / ".ci" / "run").read_text()
    assert Path(ROOT / "models").is_dir()


def test_a_redis_queue_entry_is_the_amqp_message_with_fresh_ids() -> None:
    """The Redis entry is filled into a JSON template: it must decode to the very message
    the AMQP path publishes (``parts``), in kombu's Redis envelope, with new ids each time."""
    import base64
    import json

    from worker.broker import ScoreTask, TaskMessages
    from worker.celery import SCORE_QUEUE, app

    messages = TaskMessages(app)
    task = ScoreTask("20261127-000000-abcd", "user_1", "/p/user_1.jpg", "/m.h5", "a" * 64, "e1")
    first, second = (json.loads(messages.redis_entry(task)) for _ in range(2))
    _, headers, body = messages.parts(task)
    for entry in (first, second):
        task_id = entry["headers"]["id"]
        assert entry["headers"] == headers | {"id": task_id, "root_id": task_id}
        assert json.loads(base64.b64decode(entry["body"])) == json.loads(body)
        assert entry["properties"] == {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": SCORE_QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": entry["properties"]["delivery_tag"],
        }
        assert (entry["content-type"], entry["content-encoding"]) == ("application/json", "utf-8")
    assert first["headers"]["argsrepr"] == "run=20261127-000000-abcd userid=user_1"
    assert first["headers"]["id"] != second["headers"]["id"]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    assert first["properties"]["delivery_tag"] != first["headers"]["id"]
    # Many entries at once: every id and tag is new.
    many = [json.loads(e) for e in messages.redis_entries([task] * 500)]
    ids = [e["headers"]["id"] for e in many] + [e["properties"]["delivery_tag"] for e in many]
    assert len(set(ids)) == 1000


def test_uuid4_texts_are_what_uuid4_writes() -> None:
    """Random version-4 UUIDs in ``str(uuid4())``'s form, none twice."""
    import uuid

    from worker.broker import uuid4_texts

    texts = uuid4_texts(4000)
    assert len(set(texts)) == 4000
    for text in texts:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    # The random bits are random: each hex digit outside the fixed ones takes many values.
    fixed = (8, 13, 14, 18, 19, 23)  # dashes, the version, the variant's digit
    assert all(len({t[i] for t in texts}) == 16 for i in range(36) if i not in fixed)


def test_queue_entries_and_message_bodies_are_read_as_kombu_reads_them() -> None:
    """The fast reader gives what kombu's ``loads`` gives: for a plain queue entry and
    message body, one with kombu's typed values (a date, a UUID, also spelt with ``\\u``
    escapes), a huge integer, non-ASCII text, and one orjson refuses; and the worker's
    app makes it kombu's decoder of JSON message bodies."""
    import datetime
    import uuid

    from kombu.serialization import loads as registry_loads
    from kombu.serialization import registry
    from kombu.utils.json import dumps, loads

    from worker.broker import ScoreTask, TaskMessages
    from worker.celery import app
    from worker.fastjson import loads as fast_loads

    task = ScoreTask("20261127-000000-abcd", "user_1", "/p/user_1.jpg", "/m.h5", "a" * 64, "e1")
    plain = TaskMessages(app).redis_entry(task)
    body = dumps([["run", "user_1", "/p/user_1.jpg"], {}, {"callbacks": None}])
    typed = dumps(
        {
            "headers": {
                "eta": datetime.datetime(2026, 11, 27, 1, 2, 3),
                "id": uuid.UUID("7c9e6679-7425-40de-944b-e07fc1f90ae7"),
            },
            "body": "e30=",
        }
    )
    escaped = typed.replace('"__type__"', '"\\u005f_type__"')
    huge = '{"headers": {"retries": 100000000000000000000000}, "body": ""}'
    accented = '["r\u00e9mi", "rémi", 1.5e300]'
    for text in (plain, body, typed, escaped, huge, accented):
        assert fast_loads(text.encode()) == loads(text)
        assert fast_loads(text) == loads(text)
        assert registry_loads(text.encode(), "application/json", "utf-8") == loads(text)
    for text in (typed, escaped):
        assert isinstance(fast_loads(text.encode())["headers"]["eta"], datetime.datetime)
    with pytest.raises(ValueError):
        fast_loads(b'{"body": ')
    assert registry._decoders["application/json"] is fast_loads
