"""bench.sources.s3_with_latency, the part of benchmark (d) that bench.run calls.

A real SeaweedFS store and the real delaying proxy: the pictures of a folder are under
the prefix it yields, and every request through its endpoint is late by the delay.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.sources import s3_with_latency
from tests.helpers import jpeg_bytes, picture
from worker.fetch import Fetcher, FetchPolicy
from worker.sources import PrefixSource

DELAY_MS = 150.0


def test_pictures_of_a_folder_behind_a_late_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    pictures = {f"u{n}": jpeg_bytes(picture("male", seed=n)) for n in range(3)}
    for userid, data in pictures.items():
        (folder / f"{userid}.jpg").write_bytes(data)
    (folder / "manifest.json").write_text("{}")  # not a picture: not uploaded
    with s3_with_latency(folder, DELAY_MS) as (url, env):
        assert url == "s3://benchpics/image/"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        from producer.sources import list_source

        listing = list_source(PrefixSource(url), (".jpg",))
        assert listing.userids == sorted(pictures) and not listing.skipped
        fetcher = Fetcher(FetchPolicy.from_settings())
        try:
            started = time.perf_counter()
            data = fetcher.fetch(PrefixSource(url), listing.pictures[0])
            elapsed = time.perf_counter() - started
        finally:
            fetcher.close()
        assert data == pictures["u0"]
        assert elapsed >= DELAY_MS / 1000
