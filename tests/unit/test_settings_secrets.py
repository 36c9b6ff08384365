"""Settings from a secrets folder (GENDERSCORE_SECRETS_DIR), as Compose mounts them.

pydantic-settings reads the environment first, then the secret files: a variable set in
the environment wins over its file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
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


def test_a_missing_secrets_folder_is_one_clear_error(
    secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENDERSCORE_SECRETS_DIR", str(secrets / "absent"))
    with pytest.raises(SettingsError, match="GENDERSCORE_SECRETS_DIR=.*absent.*no such folder"):
        load_settings()


def _load_settings_as_nobody() -> str:
    """``load_settings()`` in a forked child that runs as nobody when this runs as root."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            try:
                said = f"loaded {load_settings().redis_url}"
            except SettingsError as exc:
                said = str(exc)
            os.write(write, said.encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as said:
        return said.read()


def test_a_secret_file_this_user_cannot_read_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A folder others may list (pytest's own tmp folders are private to root).
    folder = Path(tempfile.mkdtemp(prefix="genderscore-secrets-"))
    try:
        folder.chmod(0o755)
        secret = folder / "GENDERSCORE_REDIS_URL"
        secret.write_text(URL)
        secret.chmod(0)
        monkeypatch.setenv("GENDERSCORE_SECRETS_DIR", str(folder))
        monkeypatch.delenv("GENDERSCORE_REDIS_URL", raising=False)
        said = _load_settings_as_nobody()
    finally:
        shutil.rmtree(folder)
    assert re.fullmatch(
        "invalid genderscore settings: cannot read GENDERSCORE_REDIS_URL of "
        f"GENDERSCORE_SECRETS_DIR={folder}: Permission denied .*",
        said,
    ), said
    assert "s3cret" not in said


@pytest.mark.parametrize("kind", ["a link out of the folder", "a folder"])
def test_a_secret_file_that_would_be_skipped_is_one_clear_error(secrets: Path, kind: str) -> None:
    # pydantic-settings only warns and reads nothing: the default URL would be used.
    path = secrets / "GENDERSCORE_REDIS_URL"
    if kind == "a folder":
        path.mkdir()
    else:
        outside = secrets.parent / "elsewhere"
        outside.write_text(URL)
        path.symlink_to(outside)
    with pytest.raises(SettingsError, match=f"secret file .*{path}.*") as raised:
        load_settings()
    assert "s3cret" not in str(raised.value)
