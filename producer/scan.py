"""Finding the pictures of a folder: ``<userid>.jpg`` files, with every skip explained."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from worker.ids import InvalidUserid, is_valid_userid, picture_path


@dataclass
class Scan:
    """Userids found in a folder, sorted, and the names skipped with a reason."""

    images_dir: Path
    userids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def scan_pictures(images_dir: Path) -> Scan:
    """List ``<userid>.jpg`` in ``images_dir`` (not recursive), refusing unsafe names."""
    root = images_dir.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{images_dir} is not a folder")
    scan = Scan(root)
    with os.scandir(root) as entries:
        for entry in entries:
            name = entry.name
            stem, dot, ext = name.rpartition(".")
            if not dot or ext != "jpg":
                scan.skipped.append((name, "not a .jpg file"))
            elif not is_valid_userid(stem):
                scan.skipped.append((name, "not a valid userid ([A-Za-z0-9_-]{1,64})"))
            elif not entry.is_file():
                scan.skipped.append((name, "not a regular file"))
            else:
                try:
                    picture_path(root, stem)
                except InvalidUserid as exc:
                    scan.skipped.append((name, str(exc)))
                    continue
                scan.userids.append(stem)
    scan.userids.sort()
    scan.skipped.sort()
    return scan
