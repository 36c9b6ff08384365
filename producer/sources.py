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

``gather`` is what ``genderscore score`` (and the nightly run) list: a folder through
``producer.scan`` (the fastest, and the worker's own rules for links), a URL prefix
through ``list_source``, a manifest through ``producer.manifest``.
"""

from __future__ import annotations

import logging
import os
import stat
import string
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus
from xml.etree import ElementTree

import redis

from producer.manifest import Refused, read_manifest
from producer.scan import scan_pictures
from worker.ids import is_valid_userid
from worker.keys import scored_index
from worker.s3 import s3_client, split_s3_url
from worker.sources import (
    FolderSource,
    ManifestSource,
    PictureRef,
    PrefixSource,
    SourceError,
    parse_source,
    redact_url,
)

log = logging.getLogger(__name__)
CHUNK = 1000
# botocore says at INFO where it found the endpoint and the credentials: not for a
# person running a command (worker.s3 caps botocore itself at INFO).
for _name in ("botocore.configprovider", "botocore.credentials"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

QUOTE = '"'
INVALID_USERID = "not a valid userid ([A-Za-z0-9_-]{1,64})"


class EmptyPrefix(SourceError):
    """The listing found nothing: a prefix with no object, or one that does not exist
    (S3 cannot tell them apart when the bucket exists)."""


class StoreUnreachable(SourceError):
    """The store did not answer the listing (down, or no route to it): try again later."""


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
        elif not is_valid_userid(stem):
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


@dataclass
class RunPictures:
    """What a run enqueues: its source, its pictures (sorted by userid), and what was
    left out: skipped names of a folder or prefix, refused lines of a manifest."""

    source: FolderSource | PrefixSource | ManifestSource
    pictures: list[PictureRef]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)

    @property
    def shown(self) -> str:
        """The source as a person reads it (a URL without query or credentials)."""
        if isinstance(self.source, FolderSource):
            return str(self.source.root)
        if isinstance(self.source, PrefixSource):
            return redact_url(self.source.url)
        return f"manifest {self.source.label}"

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``(userid, name)`` of every picture, as ``enqueue_run`` takes them."""
        return [(p.userid, p.name) for p in self.pictures]

    @property
    def versions(self) -> dict[str, str]:
        """userid -> the listing's version token, for the pictures that have one."""
        return {p.userid: p.version for p in self.pictures if p.version}


def gather(source: str | None, manifest: Path | None, allow_empty: bool = False) -> RunPictures:
    """The pictures of a SOURCE argument (a folder, ``file://`` URL or URL prefix) or of
    a manifest file, under the settings' picture extensions and URL policy:
    ``SourceError`` or ``producer.manifest.ManifestError`` when it cannot be read at all
    (a missing folder, bucket or prefix, a 403, a bad manifest). ``allow_empty``: a
    prefix with nothing under it is an empty source, not an error (a missing bucket
    still is)."""
    from worker.settings import settings

    extensions, schemes = settings.picture_extensions, settings.url_schemes
    file_root, blocked = settings.file_url_root, settings.fetch_blocked_networks
    if manifest is not None:
        read = read_manifest(manifest, schemes, file_root, blocked)
        return RunPictures(read.source, read.pictures, refused=read.refused)
    if source is None:
        raise SourceError("no source given")
    parsed = parse_source(source, schemes)
    if isinstance(parsed, PrefixSource):
        try:
            listing = list_source(parsed, extensions)
        except EmptyPrefix:
            if not allow_empty:
                raise
            return RunPictures(parsed, [])
        return RunPictures(parsed, listing.pictures, listing.skipped)
    if not parsed.root.is_dir():
        what = "not a folder" if parsed.root.exists() else "no such folder"
        raise SourceError(f"{source}: {what}")
    try:
        scan = scan_pictures(parsed.root, tuple(e.lower() for e in extensions))
    except PermissionError:
        raise SourceError(f"{source}: permission denied listing the folder") from None
    pictures = [PictureRef(userid, name) for userid, name in scan.pictures]
    return RunPictures(FolderSource(scan.images_dir), pictures, scan.skipped)


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
    """The fsspec filesystem of a prefix (credentials from fsspec's configuration)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(
            source.url, use_listings_cache=False, skip_instance_cache=True
        )
    except (ImportError, ValueError) as exc:
        raise SourceError(f"{redact_url(source.url)}: no filesystem for it ({exc})") from None
    return fs, path


def _prefix_entries(source: PrefixSource) -> Iterable[Entry]:
    if source.protocol in ("s3", "s3a"):
        return _s3_entries(source)
    return _fsspec_entries(source)


def _fsspec_entries(source: PrefixSource) -> Iterable[Entry]:
    fs, path = prefix_filesystem(source)
    shown = redact_url(source.url)
    try:
        infos = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise SourceError(f"{shown}: no such bucket or prefix") from None
    except PermissionError:
        raise SourceError(f"{shown}: access denied (check the credentials)") from None
    except (ConnectionError, TimeoutError) as exc:
        raise StoreUnreachable(f"{shown}: cannot reach the store ({type(exc).__name__})") from None
    except OSError as exc:
        raise SourceError(f"{shown}: cannot list ({type(exc).__name__})") from None
    if not infos:
        raise EmptyPrefix(f"{shown}: no such bucket or prefix, or nothing in it")
    base = path.rstrip("/") + "/"
    entries = []
    for info in infos:
        full = str(info.get("name", ""))
        name = full[len(base) :] if full.startswith(base) else full.rsplit("/", 1)[-1]
        is_file = info.get("type") == "file" and "/" not in name
        size = info.get("size")
        entries.append(
            Entry(
                name or full,
                is_file,
                size if isinstance(size, int) else None,
                version_token(info) if is_file else None,
            )
        )
    return entries


# --- S3: partitioned listing ------------------------------------------------------------

# A userid starts with one of these; every other first character falls in a gap range.
USERID_CHARS = sorted("-_" + string.digits + string.ascii_letters)
LIST_THREADS = 8
LIST_ATTEMPTS = 3
MAX_KEY_BYTES = 1024


def s3_partitions(prefix: str) -> list[tuple[str, str | None, str | None]]:
    """Ranges that together hold every key under ``prefix``, listable side by side.

    Each is ``(list_prefix, start_after, stop_at)``: one per first character a userid can
    have (``prefix + c``), and the gaps between them (``start_after`` the largest key
    below the gap, ``stop_at`` its end). S3 lists keys in UTF-8 byte order, which is
    code point order, so the ranges neither overlap nor leave a key out.
    """
    ranges: list[tuple[str, str | None, str | None]] = []
    low = "\x00"
    for char in [*USERID_CHARS, None]:
        high = char if char is not None else None
        if high is None or ord(low) < ord(high):  # a gap [low, high) before this char
            start = None if low == "\x00" else _largest_key_below(prefix + low)
            ranges.append((prefix, start, None if high is None else prefix + high))
        if char is not None:
            ranges.append((prefix + char, None, None))
            low = chr(ord(char) + 1)
    return ranges


def _largest_key_below(key: str) -> str:
    """The largest valid S3 key (at most 1,024 UTF-8 bytes) that sorts before ``key``."""
    head = key[:-1] + chr(ord(key[-1]) - 1)
    room = (MAX_KEY_BYTES - len(head.encode())) // 4
    return head + "\U0010ffff" * max(room, 0)


S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _s3_entries(source: PrefixSource) -> list[Entry]:
    """List an S3 prefix, ``LIST_THREADS`` ranges at a time (``s3_partitions``).

    Each page is a ListObjectsV2 request that botocore signs (presigned, the standard
    credential chain) and urllib3 sends; the XML is read with ElementTree. botocore's own
    response parsing took ~45 us of CPU per key, 4.5 s for 100,000 (cProfile); this ~5.
    Side by side, the ranges overlap the store's time with the parsing (bench/sources.py).
    """
    from concurrent.futures import ThreadPoolExecutor

    import urllib3

    shown = redact_url(source.url)
    bucket, prefix = split_s3_url(source.url)
    client = s3_client(connections=LIST_THREADS)
    # Retried here, not by urllib3: its retry warnings print the request's URL, and a
    # presigned URL carries the access key id and a signature valid for minutes.
    http = urllib3.PoolManager(maxsize=LIST_THREADS, retries=False)

    def page(args: dict[str, Any]) -> ElementTree.Element:
        url = client.generate_presigned_url("list_objects_v2", Params=args, ExpiresIn=900)
        for attempt in range(LIST_ATTEMPTS):
            try:
                response = http.request("GET", url, timeout=urllib3.Timeout(connect=30, read=60))
                break
            except urllib3.exceptions.HTTPError:
                if attempt + 1 == LIST_ATTEMPTS:
                    raise
                time.sleep(0.2 * 2**attempt)
        root = ElementTree.fromstring(response.data)
        if response.status != 200:
            code = root.findtext("Code") or ""
            raise _ListError(code, response.status)
        return root

    def list_range(part: tuple[str, str | None, str | None]) -> list[Entry]:
        list_prefix, start_after, stop_at = part
        args: dict[str, Any] = {
            "Bucket": bucket,
            "Prefix": list_prefix,
            "Delimiter": "/",
            "EncodingType": "url",
        }
        if start_after is not None:
            args["StartAfter"] = start_after
        found: list[Entry] = []
        while True:
            root = page(args)
            past = False  # a name of the next range: this one is complete
            for item in root.iter(f"{S3_NS}Contents"):
                key = unquote_plus(item.findtext(f"{S3_NS}Key") or "")
                if stop_at is not None and key >= stop_at:
                    past = True
                else:
                    found.append(_s3_object(key[len(prefix) :], item))
            for item in root.iter(f"{S3_NS}CommonPrefixes"):
                folder = unquote_plus(item.findtext(f"{S3_NS}Prefix") or "")
                if stop_at is not None and folder >= stop_at:
                    past = True
                else:
                    found.append(Entry(folder[len(prefix) :].rstrip("/"), False))
            token = root.findtext(f"{S3_NS}NextContinuationToken")
            if past or root.findtext(f"{S3_NS}IsTruncated") != "true" or not token:
                return found
            args["ContinuationToken"] = token

    try:
        with ThreadPoolExecutor(LIST_THREADS) as pool:
            parts = list(pool.map(list_range, s3_partitions(prefix)))
    except Exception as exc:  # noqa: BLE001 - the store's and the network's errors, named
        problem = _s3_list_problem(exc)
        if problem.startswith("cannot reach"):
            raise StoreUnreachable(f"{shown}: {problem}") from None
        raise SourceError(f"{shown}: {problem}") from None
    entries = {e.name: e for part in parts for e in part if e.name}  # "": the placeholder
    if not entries:
        raise EmptyPrefix(f"{shown}: no such bucket or prefix, or nothing in it")
    return list(entries.values())


def _s3_object(name: str, item: ElementTree.Element) -> Entry:
    size_text = item.findtext(f"{S3_NS}Size")
    size = int(size_text) if size_text and size_text.isdigit() else None
    info = {"ETag": item.findtext(f"{S3_NS}ETag"), "size": size}
    return Entry(name, True, size, version_token(info))


class _ListError(Exception):
    """A ListObjectsV2 answered with an S3 error."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def _s3_list_problem(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = str(response["Error"].get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or status == 404:
            return "no such bucket or prefix"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
            status == 403
        ):
            return f"access denied (check the credentials: {code or 'HTTP 403'})"
        return f"cannot list ({code or 'error'}, HTTP {status})"
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            "no S3 credentials on this host: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    if isinstance(exc, ElementTree.ParseError):
        return "the store's answer is not S3 XML (is AWS_ENDPOINT_URL an S3 endpoint?)"
    return f"cannot reach the store ({type(exc).__name__})"


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
