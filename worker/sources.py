"""Where a run's pictures live, and the reference one message carries to one picture.

A run has one **source**, recorded once in its metadata as ``source.spec``:

- ``FolderSource`` (spec ``folder:/abs/path``): a local folder. The only kind whose
  messages name a host path, and it works only where every worker sees that folder.
  A ``file://`` prefix is a folder.
- ``PrefixSource`` (spec ``prefix:s3://bucket/profiles/image/``): a URL prefix on an
  fsspec filesystem; the prefix is recorded once, each message names one object in it.
- ``ManifestSource`` (spec ``manifest:<file name>``): a ``userid,url`` CSV read by the
  producer; each message carries its picture's URL (the file name is for people only).

A **picture reference** (``PictureRef``) is what one message carries: the userid; the
``name`` of the picture inside its source (``<userid>.<ext>`` for folders and prefixes,
the URL for a manifest); and, from the listing, the picture's ``size`` (``too_large``
before any request) and ``version`` (the store's ETag, generation or mtime, which
``--only-new`` compares). Its wire form is a small JSON object (``to_wire``);
``from_wire`` and ``check_ref`` validate it again, so a worker never trusts a message.

No credentials ever travel: a URL with ``user:password@`` is refused (credentials come
from AWS_* variables, profiles and fsspec's configuration on each host). A manifest URL
may carry a query string (a presigned URL is how a user grants access to one picture);
``redact_url`` strips it, with any userinfo, from every log line and error record.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from worker.ids import is_valid_userid

MAX_URL_LENGTH = 2048
NAME_RE = re.compile(r"(?P<stem>[A-Za-z0-9_-]{1,64})\.(?P<ext>[A-Za-z0-9]{1,10})")
SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# Schemes that read no store a worker on another host could see, or cannot be listed.
UNLISTABLE = {"http", "https"}
HOST_LOCAL = {"memory", "data", "javascript", "local"}


class SourceError(ValueError):
    """A source, URL or reference that is malformed or not allowed; says which and why."""


# --- Sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderSource:
    """A local folder of ``<userid>.<ext>`` pictures (an absolute, resolved path)."""

    root: Path

    @property
    def spec(self) -> str:
        """What the run records: ``folder:/abs/path``."""
        return f"folder:{self.root}"

    def path_of(self, name: str, extensions: Sequence[str] | None = None) -> Path:
        """The file of picture ``name``, refusing a name that leaves the folder (a link
        is never followed: ``worker.preprocess.load_picture`` refuses it)."""
        check_name(name, extensions)
        return self.root / name


@dataclass(frozen=True)
class PrefixSource:
    """A URL prefix on an fsspec filesystem, ending with ``/``: ``s3://bucket/image/``."""

    url: str

    @property
    def protocol(self) -> str:
        """The URL's scheme (fsspec's protocol)."""
        return self.url.split("://", 1)[0]

    @property
    def spec(self) -> str:
        """What the run records: ``prefix:<url>``."""
        return f"prefix:{self.url}"

    def url_of(self, name: str, extensions: Sequence[str] | None = None) -> str:
        """The URL of object ``name`` under the prefix."""
        check_name(name, extensions)
        return self.url + name


@dataclass(frozen=True)
class ManifestSource:
    """A ``userid,url`` manifest; ``label`` is its file name, for people only."""

    label: str

    @property
    def spec(self) -> str:
        """What the run records: ``manifest:<file name>``."""
        return f"manifest:{self.label}"


Source = FolderSource | PrefixSource | ManifestSource


def parse_source(text: str, schemes: Sequence[str]) -> FolderSource | PrefixSource:
    """The SOURCE argument of ``score``: a folder path, a ``file://`` URL or a URL prefix."""
    scheme = url_scheme(text)
    if scheme is None:
        return FolderSource(Path(text).expanduser().resolve())
    parts = _split(text)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise SourceError(f"{redact_url(text)}: {CREDENTIALS_IN_URL}")
    if parts.query or parts.fragment:
        raise SourceError(f"{redact_url(text)}: a source prefix takes no ?query or #fragment")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise SourceError(f"{text}: a file:// URL names no host (file:///path)")
        return FolderSource(Path(unquote(parts.path)).resolve())
    if scheme in UNLISTABLE:
        raise SourceError(f"{text}: an {scheme} URL cannot be listed; use --manifest FILE.csv")
    if scheme in HOST_LOCAL:
        raise SourceError(f"{text}: {scheme}: holds nothing a worker on another host can read")
    if scheme not in schemes:
        raise SourceError(
            f"{text}: scheme {scheme!r} is not allowed (GENDERSCORE_URL_SCHEMES: "
            f"{','.join(schemes)})"
        )
    if not parts.netloc:
        raise SourceError(f"{text}: no bucket or host after {scheme}://")
    url = text if text.endswith("/") else text + "/"
    return PrefixSource(url)


def parse_spec(spec: str) -> Source:
    """Read back what a run recorded (``source.spec``)."""
    kind, sep, value = spec.partition(":")
    if not sep or not value:
        raise SourceError(f"not a source spec: {spec!r}")
    if kind == "folder":
        path = Path(value)
        if not path.is_absolute():
            raise SourceError(f"folder source {value!r} is not an absolute path")
        return FolderSource(path)
    if kind == "prefix":
        if url_scheme(value) is None or not value.endswith("/"):
            raise SourceError(f"prefix source {value!r} is not a URL ending with /")
        return PrefixSource(value)
    if kind == "manifest":
        return ManifestSource(value)
    raise SourceError(f"unknown source kind {kind!r} in {spec!r}")


# --- Picture references ----------------------------------------------------------------


@dataclass(frozen=True)
class PictureRef:
    """One picture of a run, as a message carries it (see the module docstring)."""

    userid: str
    name: str
    size: int | None = None
    version: str | None = None

    def to_wire(self) -> dict[str, str | int]:
        """The JSON object a message carries; unknown size and version are left out."""
        wire: dict[str, str | int] = {"userid": self.userid, "name": self.name}
        if self.size is not None:
            wire["size"] = self.size
        if self.version is not None:
            wire["version"] = self.version
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> PictureRef:
        """Rebuild from ``to_wire``'s object, checking each field's type and bounds."""
        userid, name = wire.get("userid"), wire.get("name")
        size, version = wire.get("size"), wire.get("version")
        if not isinstance(userid, str) or not is_valid_userid(userid):
            raise SourceError(f"invalid userid {str(userid)[:80]!r} in a picture reference")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_URL_LENGTH:
            raise SourceError(f"picture reference of {userid} has no valid name")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise SourceError(f"picture reference of {userid} has an invalid size")
        if version is not None and (not isinstance(version, str) or len(version) > 256):
            raise SourceError(f"picture reference of {userid} has an invalid version")
        return cls(userid, name, size, version)


def picture_string(source: Source, name: str) -> str:
    """The picture a message carries: ``name`` within the run's ``source``.

    A folder's file as an absolute path, a prefix's object as its URL, a manifest's
    picture as its own URL (``name`` already is one). ``split_picture`` reads it back.
    Called once per picture of a run: the caller parses the run's spec once.
    """
    if isinstance(source, FolderSource):
        return os.path.join(source.root, name)  # a third of pathlib's cost per picture
    if isinstance(source, PrefixSource):
        return source.url_of(name)
    return name


def split_picture(picture: str) -> tuple[FolderSource | ManifestSource, str]:
    """A message's picture as one string (an absolute path or a URL): source and name.

    An absolute path is a file of a folder source; a URL (a prefix's object or a
    manifest's line alike) is fetched as a manifest URL is, under the URL policy.
    """
    if picture.startswith("/"):
        path = Path(picture)
        return FolderSource(path.parent), path.name
    return ManifestSource("urls"), picture


def check_name(name: str, extensions: Sequence[str] | None) -> str:
    """The userid of picture file ``name`` (``<userid>.<ext>``), or SourceError.

    ``extensions=None`` accepts any extension of 1-10 letters or digits: a worker checks
    that a name cannot leave its source, while which extensions are pictures is the
    producer's listing rule (a worker with other settings must not refuse a run).
    """
    match = NAME_RE.fullmatch(name)
    if match is None:
        raise SourceError(
            f"{name[:80]!r} is not <userid>.<ext> with a userid of [A-Za-z0-9_-]{{1,64}}"
        )
    if extensions is not None and "." + match["ext"].lower() not in extensions:
        raise SourceError(f"{name}: not a picture extension ({' '.join(extensions)})")
    return match["stem"]


def check_ref(
    source: Source,
    ref: PictureRef,
    schemes: Sequence[str],
    file_root: Path | None,
    blocked: Sequence[str],
) -> None:
    """Refuse a reference that does not belong to its source (a worker's own check)."""
    if isinstance(source, ManifestSource):
        check_url(ref.name, schemes, file_root, blocked)
        return
    if check_name(ref.name, None) != ref.userid:
        raise SourceError(f"picture {ref.name!r} is not the picture of userid {ref.userid}")


# --- URL policy ------------------------------------------------------------------------

CREDENTIALS_IN_URL = (
    "credentials in the URL; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile "
    "or fsspec's configuration on each host"
)


def url_scheme(text: str) -> str | None:
    """The lower-case scheme of ``text`` if it is a URL (``x://...`` or ``x:...``)."""
    match = SCHEME_RE.match(text)
    if match is None or len(match[1]) == 1:  # "C:\\..." is a Windows path, not a URL
        return None
    scheme = match[1].lower()
    if "://" not in text[: len(scheme) + 3] and scheme not in ("data", "javascript"):
        return None  # "name:with:colons" is a relative path
    return scheme


def _split(url: str) -> Any:
    try:
        return urlsplit(url)
    except ValueError as exc:  # e.g. an invalid IPv6 literal
        raise SourceError(f"{redact_url(url)}: not a valid URL ({exc})") from None


def redact_url(url: str) -> str:
    """``url`` without userinfo, query string or fragment, at most 200 characters.

    Every log line and error record shows URLs through this: a presigned URL's
    signature and any ``user:password@`` never leave the process.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    if parts.query:
        shown += "?…"
    return shown if len(shown) <= 200 else shown[:199] + "…"


def check_url(
    url: str,
    schemes: Sequence[str],
    file_root: Path | None,
    blocked: Sequence[str],
) -> str:
    """Check a manifest URL against the policy; return its scheme or raise SourceError.

    Literal addresses in a blocked network are refused here; names are checked by the
    worker against the address it actually connects to (``worker.fetch``).
    """
    if len(url) > MAX_URL_LENGTH:
        raise SourceError(f"URL longer than {MAX_URL_LENGTH} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise SourceError(f"{redact_url(url)}: spaces or control characters in the URL")
    scheme = url_scheme(url)
    if scheme is None:
        raise SourceError(f"{redact_url(url)}: not a URL (no scheme://)")
    if scheme not in schemes or scheme in ("data", "javascript"):
        raise SourceError(
            f"scheme {scheme!r} is not allowed (GENDERSCORE_URL_SCHEMES: {','.join(schemes)})"
        )
    parts = _split(url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise SourceError(f"{redact_url(url)}: {CREDENTIALS_IN_URL}")
    if scheme == "file":
        check_file_url(url, file_root)
        return scheme
    if not parts.netloc:
        raise SourceError(f"{redact_url(url)}: no host or bucket after {scheme}://")
    if scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host:
            raise SourceError(f"{redact_url(url)}: no host")
        try:
            port = parts.port
        except ValueError:
            raise SourceError(f"{redact_url(url)}: invalid port") from None
        del port
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and is_blocked(literal, blocked):
            raise SourceError(f"{redact_url(url)}: address {host} is in a blocked network")
    elif parts.path in ("", "/"):
        raise SourceError(f"{redact_url(url)}: no object key after the bucket")
    return scheme


def check_file_url(url: str, file_root: Path | None) -> Path:
    """The path of a ``file://`` manifest URL, which must lie under ``file_root``."""
    parts = _split(url)
    if parts.netloc not in ("", "localhost"):
        raise SourceError(f"{redact_url(url)}: a file:// URL names no host (file:///path)")
    if file_root is None:
        raise SourceError(
            f"{redact_url(url)}: file:// URLs need GENDERSCORE_FILE_URL_ROOT, "
            "the folder they must be under"
        )
    raw = unquote(parts.path)
    if "\x00" in raw or not raw.startswith("/"):
        raise SourceError(f"{redact_url(url)}: not an absolute path")
    lexical = PurePosixPath(raw)
    if ".." in lexical.parts:
        raise SourceError(f"{redact_url(url)}: '..' in a file:// URL")
    path = Path(lexical)
    root = file_root.resolve()
    if not path.resolve().is_relative_to(root):
        raise SourceError(f"{redact_url(url)}: outside GENDERSCORE_FILE_URL_ROOT ({root})")
    return path


def embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Any]:
    """The address, plus any IPv4 address hidden in an IPv6 one (mapped, 6to4, NAT64)."""
    found: list[Any] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address in ipaddress.ip_network("64:ff9b::/96") or address in ipaddress.ip_network(
            "::/96"
        ):  # NAT64's well-known prefix; deprecated IPv4-compatible addresses
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_blocked(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, blocked: Iterable[str]
) -> bool:
    """True when ``address`` (or an IPv4 address hidden in it) is in a blocked network."""
    networks = [ipaddress.ip_network(n, strict=False) for n in blocked]
    candidates = embedded_ipv4(address)
    return any(a in net for a in candidates for net in networks if a.version == net.version)
