"""``--only-new``: which pictures the current model has not scored, or that changed since."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import redis

from worker.keys import scored_index
from worker.preprocess import PictureError, load_picture
from worker.scoring import content_digest

CHUNK = 1000


def only_new_pictures(
    client: redis.Redis, model_sha: str, images_dir: Path, pictures: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str]], int]:
    """The ``(userid, name)`` pictures this model has not scored as they are now; and how
    many were skipped.

    A picture counts as scored when the model's scored index holds the same content
    hash (written by the worker with the prediction).
    """
    new: list[tuple[str, str]] = []
    key = scored_index(model_sha)
    for start in range(0, len(pictures), CHUNK):
        chunk = list(pictures[start : start + CHUNK])
        known = client.hmget(key, [userid for userid, _ in chunk])
        for picture, digest in zip(chunk, known, strict=True):
            if digest is None or digest != _digest(images_dir / picture[1]):
                new.append(picture)
    return new, len(pictures) - len(new)


def _digest(path: Path) -> str | None:
    try:
        return content_digest(load_picture(path))
    except PictureError:
        return None
