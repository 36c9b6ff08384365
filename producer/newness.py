"""``--only-new``: which pictures the current model has not scored, or that changed since."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import redis

from worker.keys import scored_index
from worker.scoring import content_digest

CHUNK = 1000


def only_new_userids(
    client: redis.Redis, model_sha: str, images_dir: Path, userids: Sequence[str]
) -> tuple[list[str], int]:
    """Userids whose picture this model has not scored as it is now; and how many were skipped.

    A picture counts as scored when the model's scored index holds the same content
    hash (written by the worker with the prediction).
    """
    new: list[str] = []
    key = scored_index(model_sha)
    for start in range(0, len(userids), CHUNK):
        chunk = list(userids[start : start + CHUNK])
        known = client.hmget(key, chunk)
        for userid, digest in zip(chunk, known, strict=True):
            if digest is None or digest != _digest(images_dir / f"{userid}.jpg"):
                new.append(userid)
    return new, len(userids) - len(new)


def _digest(path: Path) -> str | None:
    try:
        return content_digest(path.read_bytes())
    except OSError:
        return None
