"""Picture bytes for the worker: from a folder, an object store or an http(s) URL.

What a caller can rely on:

- ``Fetcher.fetch(source, ref)`` returns the picture's bytes, or raises
  - ``PictureError`` (``worker.preprocess``): the picture's own problem, recorded as a
    typed error and never retried: ``not_found``, ``forbidden``, ``too_large``,
    ``fetch_failed`` (a redirect loop, another 4xx, a TLS failure), ``blocked_url`` (the
    URL policy refused it: a scheme, a ``file://`` path outside its root, an address in
    a blocked network), ``invalid_reference`` (a name that is not its userid's picture);
    from a folder also the kinds of ``load_picture`` (``missing``, ``empty``, ...);
  - ``Unavailable``: the store did not answer properly after ``fetch_attempts``
    attempts with backoff (5xx, 408, 429, timeouts, connection errors). The caller hands
    the message back to the queue: a store outage never becomes an error record.
- ``Fetcher.fetch_all(source, refs)`` keeps up to ``fetch_concurrency`` fetches in
  flight on threads and yields ``(ref, bytes | PictureError | Unavailable)`` in input
  order, so the caller decodes one picture while the next ones download. Once a store
  ends ``Unavailable``, that call's later pictures of the same store end ``Unavailable``
  at once instead of each waiting out its own attempts. A folder's pictures are read in
  the calling thread: from the page cache a read takes tens of microseconds, and
  handing each to a thread cost more (two thread switches per picture, a pool process
  waiting for its reader while the other core sometimes idled: 5.7-6.4 % against
  3.9-4.7 % of the machine idle, docs/performance.md). A folder whose reads typically
  take over ``SLOW_FOLDER_READ`` (a network mount, a cold disk) is read on the threads,
  until they are quick again.
- Each attempt has ``fetch_timeout`` seconds, connect to last byte.
- ``too_large`` is decided before the body is read: from the listing's size carried by
  the reference, else the store's size (an object's HEAD, a response's Content-Length);
  a body is never read past ``max_image_bytes + 1`` bytes.

S3 (``s3://``) is signed by botocore with the standard credentials (AWS_* variables
including AWS_ENDPOINT_URL, profiles, roles) and fetched as one presigned GET with
urllib3: a third of aiobotocore's CPU per picture, and the response's Content-Length
is checked before its body is read. Other object stores (``gs://``, any fsspec
protocol) go through fsspec and their own configuration: a HEAD when the listing gave
no size, then a read capped at the limit.

http(s) goes through urllib3, not fsspec's aiohttp client, because the security rules
need control of every hop: redirects are followed here one at a time and each target
is checked against the URL policy; every connection is made to an address resolved and
checked here (link-local and cloud-metadata networks refused, IPv4 hidden in IPv6
included), so the address checked is the address connected to and DNS rebinding cannot
slip between the two. No proxy from the environment, no content decoding (a gzip bomb
stays compressed bytes, which the decoder refuses), and error messages show URLs only
through ``redact_url`` and never echo a store's error text.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProtocolError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from worker.preprocess import PictureError, load_picture
from worker.s3 import s3_client, split_s3_url
from worker.settings import Settings, settings
from worker.sources import (
    FolderSource,
    ManifestSource,
    PictureRef,
    PrefixSource,
    Source,
    SourceError,
    check_file_url,
    check_ref,
    check_url,
    is_blocked,
    redact_url,
    split_picture,
    url_scheme,
)

log = logging.getLogger(__name__)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRY_STATUS = frozenset({408, 425, 429})
USER_AGENT = "genderscore-fetch/1"
CHUNK = 65536
MAX_BACKOFF = 5.0
# A folder's pictures are read in the calling thread while its reads typically take
# under SLOW_FOLDER_READ seconds (a moving average, each read weighing
# FOLDER_READ_WEIGHT), else on the fetch threads like a store's (module docstring),
# except the first read of each batch, still timed here. A read from the page cache
# takes tens of microseconds; one read can take milliseconds when the process is
# preempted during it, so a single slow read decides nothing.
SLOW_FOLDER_READ = 0.001
FOLDER_READ_WEIGHT = 0.1
MAX_FOLDERS_KNOWN = 1024  # folders whose reads are followed at once (one per run, mostly)


class Unavailable(Exception):
    """The store did not answer after every attempt: requeue, never an error record."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # "timeout", "unreachable" or "server_error"
        self.message = message


class _Retry(Exception):
    """One attempt failed in a way another attempt may not (a transient fault)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class _Refused(Exception):
    """A connection the policy refuses (raised inside urllib3, caught by ``_read_http``)."""


class _HostNotFound(Exception):
    """The name does not exist (a permanent DNS answer, not a DNS outage)."""


Fetched = bytes | PictureError | Unavailable


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and rules of fetching; ``from_settings`` is what a worker uses."""

    timeout: float
    attempts: int
    concurrency: int
    max_bytes: int
    max_redirects: int
    schemes: tuple[str, ...]
    file_root: Path | None
    blocked: tuple[str, ...]
    backoff: float = 0.2

    @classmethod
    def from_settings(cls, config: Settings | None = None) -> FetchPolicy:
        """The policy of the ``GENDERSCORE_*`` settings."""
        s = config or settings
        return cls(
            timeout=s.fetch_timeout,
            attempts=s.fetch_attempts,
            concurrency=s.fetch_concurrency,
            max_bytes=s.max_image_bytes,
            max_redirects=s.fetch_max_redirects,
            schemes=tuple(s.url_schemes),
            file_root=s.file_url_root,
            blocked=tuple(s.fetch_blocked_networks),
        )


class Fetcher:
    """Fetches pictures for one worker process (create it after the pool forks)."""

    def __init__(self, policy: FetchPolicy | None = None) -> None:
        self.policy = policy or FetchPolicy.from_settings()
        self._http = _guarded_pool_manager(self.policy)
        # S3 endpoints are the operator's configuration, not user input: a plain pool.
        self._s3_pool = urllib3.PoolManager(
            num_pools=8, maxsize=self.policy.concurrency, retries=False
        )
        self._s3: Any = None
        self._filesystems: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.policy.concurrency, thread_name_prefix="fetch")
        # Each folder's typical read, in seconds (a moving average of the reads timed):
        # slow folders (a network mount, a cold disk) are read on the threads.
        self._folder_reads: dict[Path, float] = {}

    def _read_here(self, source: FolderSource, alone: bool) -> bool:
        """Whether to read the folder's next picture in the calling thread: while its
        reads are quick, and a slow folder's read made ``alone`` (no other read in
        flight: a batch's first). Only reads made here are timed, and a slow folder's
        only while no thread reads: a read's time would include waiting for the GIL
        that the threads hold (timed amid them, every 16th read, a folder quick again
        took 8-19 batches to come back here, against 5-7 now)."""
        typical = self._folder_reads.get(source.root)
        if typical is None:
            if len(self._folder_reads) >= MAX_FOLDERS_KNOWN:  # a long-lived process
                self._folder_reads.clear()
            typical = self._folder_reads[source.root] = 0.0
        return alone or typical <= SLOW_FOLDER_READ

    def _note_folder_read(self, source: FolderSource, seconds: float) -> None:
        typical = self._folder_reads[source.root]
        self._folder_reads[source.root] = typical + FOLDER_READ_WEIGHT * (seconds - typical)

    def close(self) -> None:
        """Stop the fetch threads and close pooled connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.clear()
        self._s3_pool.clear()

    # --- one picture ---------------------------------------------------------------

    def fetch(self, source: Source, ref: PictureRef) -> bytes:
        """The bytes of one picture; PictureError or Unavailable (module docstring)."""
        read = self._reader(source, ref)
        attempts = self.policy.attempts
        for attempt in range(attempts):
            try:
                return read()
            except _Retry as exc:
                if attempt + 1 == attempts:
                    raise Unavailable(exc.kind, f"{exc.message} ({attempts} attempts)") from None
                delay = min(self.policy.backoff * 2**attempt, MAX_BACKOFF)
                log.warning(
                    "%s: %s, attempt %d of %d, retrying in %.1fs",
                    ref.userid,
                    exc,
                    attempt + 1,
                    attempts,
                    delay,
                )
                time.sleep(delay * (1 + random.random() / 2))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _reader(self, source: Source, ref: PictureRef) -> Callable[[], bytes]:
        p = self.policy
        try:
            check_ref(source, ref, p.schemes, p.file_root, p.blocked)
        except SourceError as exc:
            kind = "blocked_url" if isinstance(source, ManifestSource) else "invalid_reference"
            raise PictureError(kind, str(exc)) from None
        if isinstance(source, FolderSource):
            return lambda: self._read_folder(source, ref)
        url = source.url_of(ref.name) if isinstance(source, PrefixSource) else ref.name
        scheme = url_scheme(url)
        if scheme in ("s3", "s3a"):
            return lambda: self._read_s3(url, ref.size)
        if scheme in ("http", "https") and isinstance(source, ManifestSource):
            return lambda: self._read_http(url)
        if scheme == "file" and isinstance(source, ManifestSource):
            return lambda: self._read_file_url(url)
        return lambda: self._read_fsspec(url, ref.size)

    # --- folders and file:// ----------------------------------------------------------

    def _read_folder(self, source: FolderSource, ref: PictureRef) -> bytes:
        try:
            path = source.path_of(ref.name)
        except SourceError as exc:
            raise PictureError("invalid_reference", str(exc)) from None
        return load_picture(path, self.policy.max_bytes)

    def _read_file_url(self, url: str) -> bytes:
        try:
            path = check_file_url(url, self.policy.file_root)
        except SourceError as exc:
            raise PictureError("blocked_url", str(exc)) from None
        if not path.exists():
            raise PictureError("not_found", f"no file at {redact_url(url)}")
        return load_picture(path, self.policy.max_bytes)

    # --- S3: botocore signs, urllib3 fetches --------------------------------------------

    def _s3_client(self) -> Any:
        with self._lock:
            if self._s3 is None:
                # It only signs: each picture is one presigned GET sent with urllib3.
                # Measured on this project's 2-core machine (bench/sources.py),
                # aiobotocore through s3fs spent 2.5 ms of CPU per picture, a presign and
                # a urllib3 GET 0.8 ms; the decoder and the model share those cores.
                self._s3 = s3_client(self.policy.timeout)
            return self._s3

    def _read_s3(self, url: str, size: int | None) -> bytes:
        shown = redact_url(url)
        limit = self.policy.max_bytes
        if size is not None and size > limit:  # the listing's size: no request at all
            raise PictureError("too_large", f"{shown}: {size} bytes is over the {limit}-byte limit")
        bucket, key = split_s3_url(url)
        try:
            signed = self._s3_client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900
            )
        except Exception as exc:  # noqa: BLE001 - no credentials or region on this host
            # This host's configuration, not the picture: requeue for a host that has it.
            raise _Retry("misconfigured", f"{shown}: cannot sign ({type(exc).__name__})") from None
        deadline = time.monotonic() + self.policy.timeout
        response = self._request(signed, self.policy.timeout, self._s3_pool, shown)
        complete = False
        try:
            status = response.status
            if status in REDIRECTS:  # a bucket in another region than the endpoint's
                raise PictureError("fetch_failed", f"{shown}: HTTP {status} (bucket region?)")
            _check_status(status, url)
            data = self._read_body(response, url, deadline)
            complete = True
            return data
        finally:
            if not complete:
                response.close()
            response.release_conn()

    # --- fsspec object stores ----------------------------------------------------------

    def _filesystem(self, protocol: str) -> Any:
        with self._lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                fs = _open_filesystem(protocol, self.policy)
                self._filesystems[protocol] = fs
            return fs

    def _read_fsspec(self, url: str, size: int | None) -> bytes:
        shown = redact_url(url)
        limit = self.policy.max_bytes
        try:
            fs = self._filesystem(url.split("://", 1)[0])
            path = fs._strip_protocol(url)
            if size is None:  # no listing size: ask the store (HEAD), never the body
                info = self._call(fs, "info", path)
                found = info.get("size")
                size = found if isinstance(found, int) else None
            if size is not None and size > limit:
                raise PictureError("too_large", f"{size} bytes is over the {limit}-byte limit")
            if size == 0:
                return b""  # the decoder calls it "empty"; a range read of 0 bytes fails
            # Capped read: an object replaced by a bigger one since the listing is still
            # not downloaded past the limit.
            data: bytes = self._call(fs, "cat_file", path, start=0, end=limit + 1)
        except PictureError:
            raise
        except Exception as exc:  # noqa: BLE001 - every store error is classified below
            raise _classify_store_error(exc, shown) from None
        if len(data) > limit:
            raise PictureError("too_large", f"over the {limit}-byte limit")
        return data

    def _call(self, fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """A filesystem call bounded by the timeout (async filesystems can be cancelled)."""
        from fsspec.asyn import AsyncFileSystem, sync

        if isinstance(fs, AsyncFileSystem) and not fs.asynchronous:
            coro = getattr(fs, "_" + method)
            return sync(fs.loop, coro, *args, timeout=self.policy.timeout, **kwargs)
        return getattr(fs, method)(*args, **kwargs)

    # --- http(s) -------------------------------------------------------------------

    def _read_http(self, url: str) -> bytes:
        p = self.policy
        deadline = time.monotonic() + p.timeout
        web_schemes = tuple(s for s in p.schemes if s in ("http", "https"))
        seen = {url}
        current = url
        for _ in range(p.max_redirects + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Retry("timeout", f"{redact_url(url)}: no answer in {p.timeout:g}s")
            response = self._request(current, remaining, self._http, redact_url(current))
            complete = False
            try:
                status = response.status
                if status in REDIRECTS:
                    target = urljoin(current, response.headers.get("Location", ""))
                    if target == current or not response.headers.get("Location"):
                        raise PictureError("fetch_failed", f"{redact_url(current)}: bad redirect")
                    try:
                        check_url(target, web_schemes, None, p.blocked)
                    except SourceError as exc:
                        raise PictureError(
                            "blocked_url", f"{redact_url(current)}: refused redirect: {exc}"
                        ) from None
                    if target in seen:
                        raise PictureError("fetch_failed", f"redirect loop at {redact_url(target)}")
                    seen.add(target)
                    current = target
                    continue
                _check_status(status, current)
                data = self._read_body(response, current, deadline)
                complete = True
                return data
            finally:
                if not complete:
                    response.close()  # never reuse a connection with an unread body
                response.release_conn()
        raise PictureError(
            "fetch_failed", f"{redact_url(url)}: more than {p.max_redirects} redirects"
        )

    def _request(
        self, url: str, remaining: float, pool: urllib3.PoolManager, shown: str
    ) -> urllib3.BaseHTTPResponse:
        """One GET, no redirect followed, body not read; errors named by ``shown``."""
        try:
            return pool.request(
                "GET",
                url,
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                },
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=urllib3.Timeout(connect=remaining, read=remaining),
            )
        except _Refused as exc:
            raise PictureError("blocked_url", f"{shown}: {exc}") from None
        except _HostNotFound:
            raise PictureError("fetch_failed", f"{shown}: no such host") from None
        except (ProtocolError, urllib3.exceptions.NewConnectionError, ConnectionError) as exc:
            # Before timeouts: urllib3's NewConnectionError is a ConnectTimeoutError too.
            raise _Retry("unreachable", f"{shown}: {_reason(exc)}") from None
        except Urllib3Timeout:
            raise _Retry("timeout", f"{shown}: no answer in {self.policy.timeout:g}s") from None
        except SSLError:
            raise PictureError("fetch_failed", f"{shown}: TLS handshake failed") from None
        except (Urllib3Error, ValueError) as exc:
            raise PictureError("fetch_failed", f"{shown}: {type(exc).__name__}") from None

    def _read_body(self, response: Any, url: str, deadline: float) -> bytes:
        limit = self.policy.max_bytes
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise PictureError(
                "too_large",
                f"{redact_url(url)}: {int(length)} bytes is over the {limit}-byte limit",
            )
        data = bytearray()
        try:
            while True:
                # read1: whatever has arrived, so a dripping server meets the deadline too
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise PictureError(
                        "too_large", f"{redact_url(url)}: over the {limit}-byte limit"
                    )
                if time.monotonic() > deadline:
                    raise _Retry(
                        "timeout",
                        f"{redact_url(url)}: body not complete in {self.policy.timeout:g}s",
                    )
        except Urllib3Timeout:
            raise _Retry("timeout", f"{redact_url(url)}: body stalled") from None
        except (ProtocolError, ConnectionError) as exc:
            raise _Retry("unreachable", f"{redact_url(url)}: {_reason(exc)}") from None
        return bytes(data)

    # --- many pictures ---------------------------------------------------------------

    def fetch_all(
        self, source: Source, refs: Iterable[PictureRef]
    ) -> Iterator[tuple[PictureRef, Fetched]]:
        """Fetch ``refs`` concurrently; yield each with its bytes or error, in order."""
        for (_, ref), result in self._fetch_pairs((source, ref) for ref in refs):
            yield ref, result

    def fetch_pictures(
        self, items: Sequence[tuple[str, str]]
    ) -> Iterator[tuple[str, str, Fetched]]:
        """``fetch_all`` for ``(userid, picture)`` pairs, a picture being one string: an
        absolute path or a URL (``worker.sources.split_picture``). Yields
        ``(userid, picture, bytes | PictureError | Unavailable)`` in order."""
        pairs: list[tuple[Source, PictureRef]] = []
        for userid, picture in items:
            source, name = split_picture(picture)
            pairs.append((source, PictureRef(userid, name)))
        results = self._fetch_pairs(pairs)
        for (userid, picture), (_, result) in zip(items, results, strict=True):
            yield userid, picture, result

    def _fetch_pairs(
        self, pairs: Iterable[tuple[Source, PictureRef]]
    ) -> Iterator[tuple[tuple[Source, PictureRef], Fetched]]:
        down: dict[str, Unavailable] = {}

        def one(pair: tuple[Source, PictureRef]) -> Fetched:
            source, ref = pair
            store = store_of(source, ref)
            if store in down:
                first = down[store]
                return Unavailable(first.kind, f"{first.message} (same store)")
            try:
                return self.fetch(source, ref)
            except PictureError as exc:
                return exc
            except Unavailable as exc:
                down.setdefault(store, exc)
                return exc
            except Exception as exc:  # anything else one picture raises is its own error
                return PictureError("fetch_failed", f"{type(exc).__name__}: {_reason(exc)}")

        def start(pair: tuple[Source, PictureRef]) -> Future[Fetched]:
            source = pair[0]
            alone = not pending  # a folder read here is in flight only while it is read
            if not isinstance(source, FolderSource) or not self._read_here(source, alone):
                return self._pool.submit(one, pair)
            began = time.monotonic()
            done: Future[Fetched] = Future()
            done.set_result(one(pair))
            self._note_folder_read(source, time.monotonic() - began)
            return done

        pending: deque[tuple[tuple[Source, PictureRef], Future[Fetched]]] = deque()
        todo = iter(pairs)
        try:
            for pair in todo:
                pending.append((pair, start(pair)))
                if len(pending) >= self.policy.concurrency:
                    break
            while pending:
                pair, future = pending.popleft()
                result = future.result()
                following = next(todo, None)
                if following is not None:
                    pending.append((following, start(following)))
                yield pair, result
        finally:
            for _, future in pending:
                future.cancel()


def store_of(source: Source, ref: PictureRef) -> str:
    """Which store a picture lives on (a folder, a bucket, a host), for grouping faults."""
    if isinstance(source, FolderSource):
        return f"folder:{source.root}"
    url = source.url if isinstance(source, PrefixSource) else ref.name
    try:
        parts = urlsplit(url)
    except ValueError:
        return "invalid"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _check_status(status: int, url: str) -> None:
    shown = redact_url(url)
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise PictureError("not_found", f"{shown}: HTTP {status}")
    if status in (401, 403):
        raise PictureError("forbidden", f"{shown}: HTTP {status}")
    if status >= 500 or status in RETRY_STATUS:
        raise _Retry("server_error", f"{shown}: HTTP {status}")
    raise PictureError("fetch_failed", f"{shown}: HTTP {status}")


def _reason(exc: BaseException) -> str:
    """A short cause for a log line: the exception's type, never its text (it may hold a URL)."""
    inner = exc.__context__ or exc.__cause__
    name = type(exc).__name__
    return f"{name} ({type(inner).__name__})" if inner is not None else name


# --- object store errors ---------------------------------------------------------------

S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
S3_FORBIDDEN = {
    "AccessDenied",
    "Forbidden",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}
S3_RETRY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify_store_error(exc: BaseException, shown: str) -> PictureError | _Retry:
    """An fsspec store's exception as a typed error or a transient fault."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore's ClientError
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            what = f"{shown}: {code or 'error'} (HTTP {status})"
            if code in S3_NOT_FOUND or status == 404:
                return PictureError("not_found", what)
            if code in S3_FORBIDDEN or status in (401, 403):
                return PictureError("forbidden", what)
            if code in S3_RETRY or status >= 500 or status in RETRY_STATUS:
                return _Retry("server_error", what)
            return PictureError("fetch_failed", what)
    for err in _chain(exc):
        if isinstance(err, FileNotFoundError):
            return PictureError("not_found", f"{shown}: no such object or bucket")
        if isinstance(err, PermissionError):
            return PictureError("forbidden", f"{shown}: access denied")
        if isinstance(err, TimeoutError):  # asyncio's and fsspec's timeouts are these
            return _Retry("timeout", f"{shown}: no answer in time")
        if _is_connection_error(err):
            return _Retry("unreachable", f"{shown}: {_reason(err)}")
    return PictureError("fetch_failed", f"{shown}: {type(exc).__name__}")


def _is_connection_error(err: BaseException) -> bool:
    if isinstance(err, ConnectionError | socket.gaierror):
        return True
    if isinstance(err, OSError) and err.errno in (
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    ):
        return True
    module = type(err).__module__
    name = type(err).__name__
    if module.startswith("botocore"):  # EndpointConnectionError, ReadTimeoutError, ...
        return "Connect" in name or "Timeout" in name or "Connection" in name
    if module.startswith("aiohttp"):  # ClientConnectorError, ServerDisconnectedError, ...
        return "Connect" in name or "Disconnected" in name or "Payload" in name
    return False


def _open_filesystem(protocol: str, policy: FetchPolicy) -> Any:
    """An fsspec filesystem for ``protocol``, configured by fsspec's own configuration."""
    import fsspec

    try:
        return fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)
    except (ImportError, ValueError) as exc:
        raise PictureError("fetch_failed", f"no filesystem for {protocol}:// ({exc})") from None


# --- guarded http connections ------------------------------------------------------------


def _guarded_pool_manager(policy: FetchPolicy) -> urllib3.PoolManager:
    """A urllib3 pool manager whose every connection goes to a checked address."""
    blocked = policy.blocked

    class GuardedHTTPConnection(urllib3.connection.HTTPConnection):
        """An HTTP connection to a checked address."""

        def _new_conn(self) -> socket.socket:
            return _connect_checked(self, blocked)

    class GuardedHTTPSConnection(urllib3.connection.HTTPSConnection):
        """An HTTPS connection to a checked address (SNI and certificate: the URL's host)."""

        def _new_conn(self) -> socket.socket:
            return _connect_checked(self, blocked)

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    manager = urllib3.PoolManager(num_pools=64, maxsize=policy.concurrency, retries=False)
    manager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}
    return manager


def _connect_checked(
    conn: urllib3.connection.HTTPConnection, blocked: Sequence[str]
) -> socket.socket:
    """Resolve the host, refuse if any address is blocked, connect to one of those addresses."""
    host, port = conn._dns_host, conn.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            raise _HostNotFound(host) from None
        raise urllib3.exceptions.NewConnectionError(
            conn, f"name resolution failed for {host}"
        ) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if is_blocked(address, blocked):
            raise _Refused(f"address {address} is in a blocked network")
    timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except TimeoutError:
            sock.close()
            raise urllib3.exceptions.ConnectTimeoutError(
                conn, f"connection to {host} timed out"
            ) from None
        except OSError as exc:
            sock.close()
            last = exc
    raise urllib3.exceptions.NewConnectionError(
        conn, f"cannot connect to {host}: {type(last).__name__}"
    )
