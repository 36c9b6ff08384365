"""Userid and run-id validation: the one rule shared by producer and worker."""

from __future__ import annotations

import re
from pathlib import Path

# ASCII only: no path separators, no dots, no look-alike Unicode, no NUL.
USERID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class InvalidUserid(ValueError):
    """A userid (or picture name) that could escape its folder or is malformed."""


def is_valid_userid(userid: str) -> bool:
    """True when ``userid`` matches ``[A-Za-z0-9_-]{1,64}``."""
    return USERID_RE.fullmatch(userid) is not None


def check_userid(userid: str) -> str:
    """Return ``userid`` or raise InvalidUserid."""
    if not isinstance(userid, str) or not is_valid_userid(userid):
        raise InvalidUserid(f"invalid userid {userid!r}: expected [A-Za-z0-9_-]{{1,64}}")
    return userid


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` or raise ValueError."""
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise ValueError(f"invalid run id {run_id!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return run_id


def picture_path(images_dir: Path, userid: str) -> Path:
    """The picture of ``userid`` inside ``images_dir``, refusing anything that leaves it.

    Symlinks are resolved: a link pointing outside the folder is refused.
    """
    check_userid(userid)
    root = images_dir.resolve()
    path = (root / f"{userid}.jpg").resolve()
    if path.parent != root:
        raise InvalidUserid(f"picture of {userid!r} resolves outside {root}: {path}")
    return path
