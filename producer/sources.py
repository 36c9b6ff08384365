"""Listing a run's pictures: ``<userid>.<ext>`` in a folder or under a URL prefix.

One rule for both kinds of source: a picture is a file (an object) directly inside the
source whose name is ``<userid>.<ext>``, the extension one of
``GENDERSCORE_PICTURE_EXTENSIONS`` in any case, the userid ``[A-Za-z0-9_-]{1,64}``
(the stem, case kept). Everything else is skipped with a reason, and so is every
picture of a userid that has several (``a.jpg`` and ``a.png``: which one is meant is
not ours to guess).

Each picture comes with its size and a **version token** taken from the listing
itself, with no download: for an object store the ETag (or generation, or version
id), for a folder the size and modification time. ``--only-new`` compares this token
with the one stored when the picture was scored (see ``version_token``).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from worker.keys import scored_index
from worker.sources import FolderSource, PictureRef, PrefixSource, SourceError, redact_url

log = logging.getLogger(__name__)
CHUNK = 1000

QUOTE = '"'
INVALID_USERID = "not a valid userid ([A-Za-z0-9_-]{1,64})"


@dataclass
class Listing:
    """A source's pictures, sorted by userid, and the names skipped with a reason."""

    source: FolderSource | PrefixSource
    pictures: list[PictureRef] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def userids(self) -> list[str]:
        """The listed userids, sorted."""
        return [p.userid for p in self.pictures]


@dataclass(frozen=True)
class Entry:
    """One name found in a source, before the picture rules are applied."""

    name: str
    is_file: bool
    size: int | None = None
    version: str | None = None
    skip: str | None = None  # a reason found while listing (a link leaving the folder)


def list_source(source: FolderSource | PrefixSource, extensions: Sequence[str]) -> Listing:
    """List the pictures of a folder or URL prefix; SourceError if it cannot be listed."""
    entries = (
        _folder_entries(source) if isinstance(source, FolderSource) else _prefix_entries(source)
    )
    return select_pictures(source, entries, extensions)


def select_pictures(
    source: FolderSource | PrefixSource, entries: Iterable[Entry], extensions: Sequence[str]
) -> Listing:
    """Apply the picture rules to listed entries (the same for folders and prefixes)."""
    allowed = frozenset(e.lower() for e in extensions)
    listing = Listing(source)
    by_userid: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        name = entry.name
        stem, dot, ext = name.rpartition(".")
        if not entry.is_file:
            listing.skipped.append((name, "not a regular file"))
        elif not dot or "." + ext.lower() not in allowed:
            listing.skipped.append((name, f"not a picture ({' '.join(sorted(allowed))})"))
        elif not _valid_stem(stem):
            listing.skipped.append((name, INVALID_USERID))
        elif entry.skip is not None:
            listing.skipped.append((name, entry.skip))
        else:
            by_userid[stem].append(entry)
    for userid, found in by_userid.items():
        if len(found) == 1:
            only = found[0]
            listing.pictures.append(PictureRef(userid, only.name, only.size, only.version))
        else:
            names = ", ".join(sorted(e.name for e in found))
            reason = f"userid {userid} has {len(found)} pictures ({names}): which one is meant?"
            listing.skipped += [(e.name, reason) for e in found]
    listing.pictures.sort(key=lambda p: p.userid)
    listing.skipped.sort()
    return listing


def _valid_stem(stem: str) -> bool:
    # worker.ids.is_valid_userid, inlined: this runs once per listed name (100,000s).
    return (
        0 < len(stem) <= 64
        and stem.isascii()
        and stem.replace("_", "a").replace("-", "a").isalnum()
    )


# --- Folders ---------------------------------------------------------------------------


def _folder_entries(source: FolderSource) -> Iterable[Entry]:
    root = source.root
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder")
    real_root = root.resolve()
    try:
        with os.scandir(root) as found:
            for item in found:
                yield _folder_entry(item, real_root)
    except PermissionError:
        raise SourceError(f"{root}: permission denied listing the folder") from None


def _folder_entry(item: os.DirEntry[str], real_root: Any) -> Entry:
    try:
        info = item.stat()  # follows a link: the picture is what it points to
    except OSError:
        return Entry(item.name, False)
    if not stat.S_ISREG(info.st_mode):
        return Entry(item.name, False)
    skip = None
    if item.is_symlink():
        target = (real_root / item.name).resolve()
        if target.parent != real_root:
            skip = f"links outside the folder ({target})"
    return Entry(item.name, True, info.st_size, f"f:{info.st_size}:{info.st_mtime_ns}", skip)


# --- URL prefixes ----------------------------------------------------------------------


def prefix_filesystem(source: PrefixSource) -> tuple[Any, str]:
    """The fsspec filesystem of a prefix (credentials from its standard configuration)."""
    import fsspec

    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if source.protocol in ("s3", "s3a"):
        options["session"] = _s3_session()
    try:
        fs, path = fsspec.core.url_to_fs(source.url, **options)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"{redact_url(source.url)}: no filesystem for it ({exc})") from None
    return fs, path


def _s3_session() -> Any:
    """An aiobotocore session (the standard credential chain) that parses times fast.

    botocore reads each object's LastModified with dateutil: three quarters of the CPU
    time of listing 1,000 keys (measured with cProfile, bench/sources.py). The listing's
    ISO 8601 times parse with ``datetime.fromisoformat`` in a fraction of that.
    """
    from aiobotocore.session import AioSession
    from botocore.utils import parse_timestamp

    def parse_time(value: str) -> datetime:
        try:
            return datetime.fromisoformat(value)
        except (TypeError, ValueError):
            parsed: datetime = parse_timestamp(value)  # RFC 1123 headers, epoch numbers
            return parsed

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_time
    )
    return session


def _prefix_entries(source: PrefixSource) -> Iterable[Entry]:
    fs, path = prefix_filesystem(source)
    shown = redact_url(source.url)
    try:
        infos = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise SourceError(f"{shown}: no such bucket or prefix") from None
    except PermissionError:
        raise SourceError(f"{shown}: access denied (check the credentials)") from None
    except OSError as exc:
        raise SourceError(f"{shown}: cannot list ({type(exc).__name__})") from None
    if not infos:
        raise SourceError(f"{shown}: no such bucket or prefix, or nothing in it")
    base = path.rstrip("/") + "/"
    for info in infos:
        full = str(info.get("name", ""))
        name = full[len(base) :] if full.startswith(base) else full.rsplit("/", 1)[-1]
        is_file = info.get("type") == "file" and "/" not in name
        size = info.get("size")
        yield Entry(
            name or full,
            is_file,
            size if isinstance(size, int) else None,
            version_token(info) if is_file else None,
        )


def version_token(info: Mapping[str, Any]) -> str | None:
    """A short token that changes when an object changes, from its listing entry.

    The first the store gives of: a version id (``v:``), a GCS generation (``g:``),
    an ETag (``e:``, an MD5 of the content for plain uploads), a modification time
    (``m:``); followed by ``:<size>``. None when the listing tells nothing (then
    ``--only-new`` must treat the picture as new).
    """
    size = info.get("size", info.get("Size"))
    suffix = f":{size}" if isinstance(size, int) else ""
    version_id = info.get("VersionId") or info.get("version_id")
    if version_id and version_id != "null":
        return f"v:{version_id}{suffix}"
    generation = info.get("generation")
    if generation:
        return f"g:{generation}{suffix}"
    etag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    if etag:
        return f"e:{str(etag).removeprefix('W/').strip(QUOTE)}{suffix}"
    for key in ("LastModified", "last_modified", "mtime", "updated", "modified"):
        value = info.get(key)
        if value:
            stamp = value.isoformat() if isinstance(value, datetime) else str(value)
            return f"m:{stamp}{suffix}"
    return None


# --- --only-new ------------------------------------------------------------------------


def only_new_pictures(
    client: redis.Redis, model_sha: str, pictures: Sequence[PictureRef]
) -> tuple[list[PictureRef], int]:
    """Pictures this model has not scored as the listing shows them; and how many not.

    A picture counts as scored when the model's scored index holds its listing's
    version token (the worker stores ``ref.version`` there with the prediction). A
    picture without a token (a manifest URL, a store that tells nothing) is new.
    One HMGET per thousand pictures; nothing is downloaded.
    """
    key = scored_index(model_sha)
    new: list[PictureRef] = []
    for start in range(0, len(pictures), CHUNK):
        chunk = pictures[start : start + CHUNK]
        stored = client.hmget(key, [p.userid for p in chunk])
        new += [
            p
            for p, token in zip(chunk, stored, strict=True)
            if p.version is None or token != p.version
        ]
    return new, len(pictures) - len(new)
