"""GENDERSCORE_NIGHTLY_SOURCE: a folder or a URL prefix, checked when the settings load;
GENDERSCORE_NIGHTLY_IMAGES_DIR keeps working alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.nightly import NightlyConfig, beat_schedule
from worker.settings import Settings, SettingsError, load_settings


def test_nightly_source_is_a_folder_or_a_prefix(tmp_path: Path) -> None:
    assert Settings().nightly_source_text is None
    assert beat_schedule(Settings()) == {}
    old = Settings(nightly_images_dir=tmp_path)
    assert old.nightly_source_text == str(tmp_path)
    assert NightlyConfig.from_settings(old).source == tmp_path.resolve()
    prefix = Settings(nightly_source="s3://bucket/profiles/image/")
    assert prefix.nightly_source_text == "s3://bucket/profiles/image/"
    assert NightlyConfig.from_settings(prefix).source == "s3://bucket/profiles/image/"
    assert set(beat_schedule(prefix)) == set(beat_schedule(old)) == {"genderscore-nightly"}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"NIGHTLY_SOURCE": "ftp://host/pictures/"}, "scheme 'ftp' is not allowed"),
        ({"NIGHTLY_SOURCE": "https://host/pictures/"}, "use --manifest"),
        ({"NIGHTLY_SOURCE": "s3://key:hunter2@bucket/p/"}, "credentials in the URL"),
        ({"NIGHTLY_SOURCE": "s3://b/p/", "NIGHTLY_IMAGES_DIR": "/srv"}, "both set"),
    ],
)
def test_a_bad_nightly_source_is_refused_at_start(
    env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"GENDERSCORE_{name}", value)
    with pytest.raises(SettingsError, match="GENDERSCORE_NIGHTLY_SOURCE") as caught:
        load_settings()
    assert says in str(caught.value) and "hunter2" not in str(caught.value)
