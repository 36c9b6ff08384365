"""Finding the pictures of a folder: ``<userid><ext>`` files, with every skip explained."""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from worker.ids import PICTURE_EXTENSIONS, InvalidUserid, picture_userid


@dataclass
class Scan:
    """Pictures found in a folder, sorted by userid, and the names skipped with a reason."""

    images_dir: Path
    pictures: list[tuple[str, str]] = field(default_factory=list)  # (userid, file name)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def userids(self) -> list[str]:
        """The userids found, sorted."""
        return [userid for userid, _ in self.pictures]


def _refusal(entry: os.DirEntry[str]) -> str | None:
    """Why a directory entry is not read as a picture (the worker applies the same rules)."""
    if entry.is_symlink():
        return "a symbolic link (links are not followed)"
    info = entry.stat(follow_symlinks=False)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink > 1:
        return "a hard link (only single-link files are read)"
    return None


def scan_pictures(images_dir: Path, extensions: tuple[str, ...] = PICTURE_EXTENSIONS) -> Scan:
    """List ``<userid><ext>`` in ``images_dir`` (not recursive), refusing unsafe names.

    The extension is matched in any case; a userid with two pictures (``a.jpg`` and
    ``a.png``) is ambiguous, and all its pictures are skipped.
    """
    root = images_dir.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{images_dir} is not a folder")
    scan = Scan(root)
    found: dict[str, list[str]] = defaultdict(list)
    with os.scandir(root) as entries:
        for entry in entries:
            try:
                userid = picture_userid(entry.name, extensions)
            except InvalidUserid as exc:
                scan.skipped.append((entry.name, str(exc)))
                continue
            problem = _refusal(entry)
            if problem:
                scan.skipped.append((entry.name, problem))
            else:
                found[userid].append(entry.name)
    for userid, names in sorted(found.items()):
        if len(names) == 1:
            scan.pictures.append((userid, names[0]))
        else:
            for name in names:
                scan.skipped.append((name, f"userid {userid} has {len(names)} pictures"))
    scan.skipped.sort()
    return scan
