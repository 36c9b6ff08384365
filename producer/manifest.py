"""``--manifest FILE.csv``: the pictures of a run given as ``userid,url`` lines.

The file is CSV (UTF-8, a BOM allowed) with a header naming at least ``userid`` and
``url`` (any case, any order, other columns ignored). A problem with the whole file
(unreadable, not UTF-8, empty, no ``userid`` or ``url`` column, no line after the
header) is a ``ManifestError`` with one line to show. A bad line is refused with its
line number and a reason, like a skipped file of a folder, and the rest is scored:

- an invalid userid, an empty url;
- a URL the policy refuses (``worker.sources.check_url``): a scheme not in
  ``GENDERSCORE_URL_SCHEMES`` (``ftp:``, ``javascript:``, ``data:``), credentials in
  the URL, a ``file://`` URL outside ``GENDERSCORE_FILE_URL_ROOT``, a literal address
  in a blocked network;
- the same line again (refused as a duplicate of the first);
- a userid given with two different urls (every line of it refused: which picture is
  meant is not ours to guess).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from worker.ids import is_valid_userid
from worker.sources import ManifestSource, PictureRef, SourceError, check_url

REQUIRED = ("userid", "url")


class ManifestError(ValueError):
    """A manifest that cannot be used at all; the message is one line to show."""


@dataclass(frozen=True)
class Refused:
    """A manifest line that is not scored, and why."""

    line: int
    userid: str
    reason: str


@dataclass
class Manifest:
    """A manifest's pictures (sorted by userid) and its refused lines."""

    source: ManifestSource
    pictures: list[PictureRef] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)

    @property
    def userids(self) -> list[str]:
        """The accepted userids, sorted."""
        return [p.userid for p in self.pictures]


def read_manifest(
    path: Path,
    schemes: Sequence[str],
    file_root: Path | None,
    blocked: Sequence[str],
) -> Manifest:
    """Read and check a ``userid,url`` manifest (see the module docstring)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise ManifestError(f"{path}: the manifest is empty (expected a userid,url header)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except csv.Error as exc:
        raise ManifestError(f"{path}: line 1: not CSV ({exc})") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        shown = ",".join(header)[:120]
        raise ManifestError(
            f"{path}: no {' or '.join(repr(c) for c in missing)} column in the header "
            f"({shown!r}); expected userid,url"
        )
    uid_col, url_col = header.index("userid"), header.index("url")
    manifest = Manifest(ManifestSource(path.name))
    first: dict[str, tuple[int, str]] = {}  # userid -> (line, url) of its first line
    conflicted: dict[str, list[int]] = {}
    rows = 0
    try:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            rows += 1
            line = reader.line_num
            userid = row[uid_col].strip() if uid_col < len(row) else ""
            url = row[url_col].strip() if url_col < len(row) else ""
            reason = _line_problem(userid, url, schemes, file_root, blocked)
            if reason is None and userid in first:
                first_line, first_url = first[userid]
                if url == first_url:
                    reason = f"duplicate of line {first_line}"
                else:
                    conflicted.setdefault(userid, [first_line]).append(line)
                    continue
            if reason is not None:
                manifest.refused.append(Refused(line, userid[:80], reason))
                continue
            first[userid] = (line, url)
    except csv.Error as exc:
        raise ManifestError(f"{path}: line {reader.line_num}: not CSV ({exc})") from None
    if rows == 0:
        raise ManifestError(f"{path}: no picture lines after the header")
    for userid, lines in conflicted.items():
        reason = f"userid {userid} has different urls on lines {', '.join(map(str, lines))}"
        manifest.refused += [Refused(n, userid, reason) for n in lines]
    manifest.pictures = sorted(
        (PictureRef(u, url) for u, (_, url) in first.items() if u not in conflicted),
        key=lambda p: p.userid,
    )
    manifest.refused.sort(key=lambda r: r.line)
    return manifest


def _line_problem(
    userid: str,
    url: str,
    schemes: Sequence[str],
    file_root: Path | None,
    blocked: Sequence[str],
) -> str | None:
    if not is_valid_userid(userid):
        return "not a valid userid ([A-Za-z0-9_-]{1,64})"
    if not url:
        return "no url"
    try:
        check_url(url, schemes, file_root, blocked)
    except SourceError as exc:
        return str(exc)
    return None


def describe(refused: Refused) -> str:
    """One line for a refused manifest line (URLs in reasons are already redacted)."""
    return f"line {refused.line} ({refused.userid or '-'}): {refused.reason}"
