"""Userid, run-id and picture-name validation: the one rule shared by producer and worker."""

from __future__ import annotations

import re
from pathlib import Path

# ASCII only: no path separators, no dots, no look-alike Unicode, no NUL.
USERID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A picture is named <userid><extension>; the extension is matched without regard to case.
PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class InvalidUserid(ValueError):
    """A userid (or picture name) that could escape its folder or is malformed."""


def is_valid_userid(userid: str) -> bool:
    """True when ``userid`` matches ``[A-Za-z0-9_-]{1,64}``."""
    return isinstance(userid, str) and USERID_RE.fullmatch(userid) is not None


def describe(value: object, limit: int = 80) -> str:
    """A short, printable description of an untrusted value (never the whole of it)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!a}... ({len(value)} characters)"
    text = ascii(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def check_userid(userid: str) -> str:
    """Return ``userid`` or raise InvalidUserid."""
    if not is_valid_userid(userid):
        raise InvalidUserid(f"invalid userid {describe(userid)}: expected [A-Za-z0-9_-]{{1,64}}")
    return userid


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` or raise ValueError."""
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise ValueError(f"invalid run id {describe(run_id)}: expected [A-Za-z0-9_.-]{{1,64}}")
    return run_id


def picture_userid(name: str, extensions: tuple[str, ...] = PICTURE_EXTENSIONS) -> str:
    """The userid of a picture file name ``<userid><ext>``; InvalidUserid when it is not one."""
    stem, dot, ext = name.rpartition(".")
    if not dot or f".{ext.lower()}" not in extensions:
        raise InvalidUserid(f"{describe(name)} is not a picture ({', '.join(extensions)})")
    return check_userid(stem)


def picture_path(images_dir: Path, userid: str) -> Path:
    """``<images_dir>/<userid>.jpg``: the training set's naming (the course's format)."""
    return images_dir / f"{check_userid(userid)}.jpg"
