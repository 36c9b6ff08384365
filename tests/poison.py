"""A test-only Celery app: the real one, whose decoding kills its process on a poison picture.

``celery -A tests.poison worker`` runs the real scoring task; only ``prepare`` (read and
decode one picture) is wrapped, so a picture whose userid contains "poison" ends its
pool process the way a crashing native decoder would. Production code has no such hook.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import worker.scoring as scoring
import worker.tasks  # noqa: F401  (registers genderscore.score on the app)
from worker import app

__all__ = ["app"]

_real_prepare = scoring.prepare


def _prepare(bundle: Any, item: tuple[str, Path]) -> scoring.Prepared:
    if "poison" in item[0]:
        os._exit(137)
    return _real_prepare(bundle, item)


scoring.prepare = _prepare
