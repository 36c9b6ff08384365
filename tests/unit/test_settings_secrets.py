"""Settings from a secrets folder (GENDERSCORE_SECRETS_DIR), as Compose mounts them.

pydantic-settings reads the environment first, then the secret files: a variable set in
the environment wins over its file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import SettingsError, describe, load_settings

URL = "redis://worker:s3cret-from-file@redis:6379/0"


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A secrets folder in force, and no URL in the environment (as in Compose)."""
    folder = tmp_path / "run-secrets"
    folder.mkdir()
    monkeypatch.setenv("GENDERSCORE_SECRETS_DIR", str(folder))
    monkeypatch.delenv("GENDERSCORE_REDIS_URL", raising=False)
    monkeypatch.delenv("GENDERSCORE_BROKER_URL", raising=False)
    return folder


def test_a_value_in_a_secret_file_is_used(secrets: Path) -> None:
    (secrets / "GENDERSCORE_REDIS_URL").write_text(URL + "\n")  # as an editor saves it
    (secrets / "genderscore_broker_url").write_text("amqp://gs:pw@rabbitmq:5672/gs")  # any case
    (secrets / "flower-config.py").write_text("basic_auth = ['ops:x']\n")  # not a setting
    loaded = load_settings()
    assert loaded.redis_url == URL
    assert loaded.broker_url == "amqp://gs:pw@rabbitmq:5672/gs"
    assert loaded.secrets_dir == secrets
    rows = {name: (value, source) for name, value, source in describe(loaded, {})}
    assert rows["GENDERSCORE_REDIS_URL"] == ("redis://worker:***@redis:6379/0", "secrets")
    assert rows["GENDERSCORE_BATCH_SIZE"][1] == "default"


def test_the_environment_wins_over_a_secret_file(
    secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (secrets / "GENDERSCORE_REDIS_URL").write_text(URL)
    monkeypatch.setenv("GENDERSCORE_REDIS_URL", "redis://env-host:6379/1")
    loaded = load_settings()
    assert loaded.redis_url == "redis://env-host:6379/1"
    env = {"GENDERSCORE_REDIS_URL": "redis://env-host:6379/1"}
    rows = {name: source for name, _, source in describe(loaded, env)}
    assert rows["GENDERSCORE_REDIS_URL"] == "environment"


def test_an_empty_broker_file_makes_redis_the_broker(secrets: Path) -> None:
    # docs/deploy.md, "Back to Redis as the broker": `: > secrets/broker-url`.
    (secrets / "GENDERSCORE_REDIS_URL").write_text(URL)
    (secrets / "GENDERSCORE_BROKER_URL").write_text("")
    assert load_settings().effective_broker_url == URL


def test_a_secret_file_is_validated_like_the_variable(secrets: Path) -> None:
    (secrets / "GENDERSCORE_BATCH_SIZE").write_text("lots")
    with pytest.raises(SettingsError, match="GENDERSCORE_BATCH_SIZE='lots'"):
        load_settings()


def test_a_missing_or_unreadable_secrets_folder_is_one_clear_error(
    secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENDERSCORE_SECRETS_DIR", str(secrets / "absent"))
    with pytest.raises(SettingsError, match="GENDERSCORE_SECRETS_DIR=.*absent.*no such folder"):
        load_settings()
    monkeypatch.setenv("GENDERSCORE_SECRETS_DIR", str(secrets))
    # A file that cannot be read, for root too: /proc/self/mem fails at offset 0 (EIO).
    (secrets / "GENDERSCORE_REDIS_URL").symlink_to("/proc/self/mem")
    unreadable = "cannot read GENDERSCORE_REDIS_URL of GENDERSCORE_SECRETS_DIR=.*Input/output"
    with pytest.raises(SettingsError, match=unreadable):
        load_settings()
