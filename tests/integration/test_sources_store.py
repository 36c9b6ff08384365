"""Listing and fetching pictures against real servers: SeaweedFS S3 and an HTTP server.

No S3 or HTTP mock: the stores are real processes (``tests.servers``); failures are
the servers' own answers (a 403 from an identity without the right, a 404 of a key
that is not there), or real network conditions (a closed port, a delaying proxy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.sources import _fsspec_entries, list_source, only_new_pictures, select_pictures
from tests.helpers import ROOT, jpeg_bytes, picture
from tests.servers import (  # noqa: F401 - fixtures
    LISTER_KEY,
    LISTER_SECRET,
    READER_KEY,
    READER_SECRET,
    HttpPictures,
    S3Store,
    free_ports,
    http_server,
    s3_server,
    wait_port,
)
from worker.fetch import Fetcher, FetchPolicy, Unavailable
from worker.keys import scored_index
from worker.preprocess import PictureError, preprocess
from worker.sources import (
    FolderSource,
    ManifestSource,
    PictureRef,
    PrefixSource,
    SourceError,
    parse_source,
)

EXTS = (".jpg", ".jpeg", ".png", ".webp")
BUCKET = "pictures"


def make_policy(**changes: object) -> FetchPolicy:
    """The settings' policy with short timeouts for tests, and ``changes``."""
    base = FetchPolicy.from_settings()
    quick = dataclasses.replace(
        base, timeout=2.0, attempts=2, backoff=0.05, schemes=("s3", "gs", "https", "http", "file")
    )
    return dataclasses.replace(quick, **changes)  # type: ignore[arg-type]


@pytest.fixture
def aws_env(s3_server: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:  # noqa: F811
    """The standard AWS_* variables of the test store, as a user would set them."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """A few real JPEG pictures."""
    return {f"u{i}": jpeg_bytes(picture("female" if i % 2 else "male", seed=i)) for i in range(6)}


@pytest.fixture(scope="module")
def bucket(s3_server: S3Store, jpegs: dict[str, bytes]) -> str:  # noqa: F811
    """A bucket with ``profiles/image/``: pictures of every rule, and odd entries."""
    fs = s3_server.filesystem()
    fs.mkdir(BUCKET)
    files = {
        "u0.jpg": jpegs["u0"],
        "u1.JPG": jpegs["u1"],
        "u2.jpeg": jpegs["u2"],
        "u3.png": jpegs["u3"],
        "u4.webp": jpegs["u4"],
        "u5.jpg": jpegs["u5"],
        "u5.png": jpegs["u5"],
        "notes.txt": b"not a picture",
        "bad id.jpg": jpegs["u0"],
        "nested/u9.jpg": jpegs["u0"],
        "big.jpg": b"\xff\xd8\xff" + b"\0" * 300_000,
        "empty.jpg": b"",
        "page.jpg": b"<!doctype html><html><body>hello</body></html>",
        ".hidden.jpg": b"x",
        "~tilde.jpg": b"x",
        "\u00e9t\u00e9.jpg": b"x",
        "Zz.jpg": jpegs["u0"],
    }
    fs.pipe({f"{BUCKET}/profiles/image/{name}": data for name, data in files.items()})
    return BUCKET


# --- listing -------------------------------------------------------------------------------


def test_folder_listing_rules_and_version_tokens(tmp_path: Path, jpegs: dict[str, bytes]) -> None:
    folder = tmp_path / "image"
    folder.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpegs["u0"])
    for name in ("u0.jpg", "u1.JPG", "u2.jpeg", "u3.png", "u4.webp", "u5.jpg", "u5.png"):
        (folder / name).write_bytes(jpegs[name.split(".")[0]])
    (folder / "notes.txt").write_text("x")
    (folder / "bad id.jpg").write_bytes(b"x")
    (folder / "sub.jpg").mkdir()
    (folder / "in.jpg").symlink_to(folder / "u0.jpg")
    (folder / "out.jpg").symlink_to(outside)
    (folder / "dangling.jpg").symlink_to(tmp_path / "nothing")
    listing = list_source(parse_source(str(folder), ("s3",)), EXTS)
    assert listing.userids == ["in", "u0", "u1", "u2", "u3", "u4"]
    reasons = dict(listing.skipped)
    assert reasons["out.jpg"].startswith("links outside the folder")
    assert reasons["dangling.jpg"] == reasons["sub.jpg"] == "not a regular file"
    assert "u5 has 2 pictures" in reasons["u5.jpg"] and "u5.png" in reasons
    assert reasons["notes.txt"].startswith("not a picture")
    assert reasons["bad id.jpg"].startswith("not a valid userid")
    tokens = {p.userid: p.version for p in listing.pictures}
    size = len(jpegs["u1"])
    assert tokens["u1"] is not None and tokens["u1"].startswith(f"f:{size}:")
    os.utime(folder / "u1.JPG", ns=(1, 1))
    again = {p.userid: p.version for p in list_source(FolderSource(folder), EXTS).pictures}
    assert again["u1"] == f"f:{size}:1" and again["u2"] == tokens["u2"]
    with pytest.raises(SourceError, match="is not a folder"):
        list_source(FolderSource(tmp_path / "missing"), EXTS)


def test_prefix_listing_has_the_folder_rules_and_store_tokens(
    aws_env: S3Store, bucket: str, jpegs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lister may list but not read: the tokens come from the listing, no download.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LISTER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LISTER_SECRET)
    source = parse_source(f"s3://{bucket}/profiles/image", ("s3",))
    listing = list_source(source, EXTS)
    assert listing.userids == ["Zz", "big", "empty", "page", "u0", "u1", "u2", "u3", "u4"]
    reasons = dict(listing.skipped)
    assert reasons["nested"] == "not a regular file"
    for odd in (".hidden.jpg", "~tilde.jpg", "\u00e9t\u00e9.jpg"):
        assert reasons[odd].startswith("not a valid userid"), odd
    # The ranges listed side by side find what one plain listing (fsspec's) finds.
    plain = select_pictures(source, _fsspec_entries(source), EXTS)  # type: ignore[arg-type]
    assert (plain.pictures, plain.skipped) == (listing.pictures, listing.skipped)
    assert "u5 has 2 pictures" in reasons["u5.jpg"]
    assert reasons["notes.txt"].startswith("not a picture")
    assert reasons["bad id.jpg"].startswith("not a valid userid")
    by_id = {p.userid: p for p in listing.pictures}
    md5, size = hashlib.md5(jpegs["u1"]).hexdigest(), len(jpegs["u1"])
    assert by_id["u1"] == PictureRef("u1", "u1.JPG", size, f"e:{md5}:{size}")
    # Rewritten with other bytes: a new token; with the same bytes: the same (ETag = MD5).
    admin = aws_env.filesystem()
    admin.pipe(f"{bucket}/profiles/image/u2.jpeg", jpegs["u3"])
    admin.pipe(f"{bucket}/profiles/image/u1.JPG", jpegs["u1"])
    after = {p.userid: p.version for p in list_source(source, EXTS).pictures}
    assert after["u2"] != by_id["u2"].version and after["u1"] == by_id["u1"].version
    admin.pipe(f"{bucket}/profiles/image/u2.jpeg", jpegs["u2"])


def test_prefix_listing_failures_are_clear(
    aws_env: S3Store, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SourceError, match="no such bucket or prefix"):
        list_source(PrefixSource("s3://no-such-bucket/image/"), EXTS)
    with pytest.raises(SourceError, match="no such bucket or prefix"):
        list_source(PrefixSource(f"s3://{bucket}/no/such/prefix/"), EXTS)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_KEY)  # may read, may not list
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET)
    with pytest.raises(SourceError, match="access denied") as caught:
        list_source(PrefixSource(f"s3://{bucket}/profiles/image/"), EXTS)
    assert READER_KEY not in str(caught.value) and READER_SECRET not in str(caught.value)


def test_only_new_compares_listing_tokens_without_downloading(
    aws_env: S3Store,
    bucket: str,
    jpegs: dict[str, bytes],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = PrefixSource(f"s3://{bucket}/profiles/image/")
    sha = "only-new-test-model"
    listing = list_source(source, EXTS)
    new, unchanged = only_new_pictures(redis_client, sha, listing.pictures)
    assert (len(new), unchanged) == (len(listing.pictures), 0)
    # What the worker stores with each prediction: the token its message carried.
    redis_client.hset(scored_index(sha), mapping={p.userid: p.version for p in listing.pictures})
    aws_env.filesystem().pipe(f"{bucket}/profiles/image/u3.png", jpegs["u4"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LISTER_KEY)  # listing rights only: no download
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LISTER_SECRET)
    relisted = list_source(source, EXTS).pictures
    new, unchanged = only_new_pictures(redis_client, sha, relisted)
    assert [p.userid for p in new] == ["u3"] and unchanged == len(relisted) - 1
    untokened = [PictureRef("u0", "https://host/u0.jpg")]  # a manifest line: always new
    assert only_new_pictures(redis_client, sha, untokened) == (untokened, 0)
    aws_env.filesystem().pipe(f"{bucket}/profiles/image/u3.png", jpegs["u3"])


# --- fetching from the object store ----------------------------------------------------------


def _fetch(fetcher: Fetcher, source: object, ref: PictureRef) -> bytes | Exception:
    try:
        return fetcher.fetch(source, ref)  # type: ignore[arg-type]
    except (PictureError, Unavailable) as exc:
        return exc


def test_prefix_pictures_fetch_concurrently_and_decode(
    aws_env: S3Store, bucket: str, jpegs: dict[str, bytes]
) -> None:
    source = PrefixSource(f"s3://{bucket}/profiles/image/")
    listing = list_source(source, EXTS)
    fetcher = Fetcher(make_policy(concurrency=3))
    results = list(fetcher.fetch_all(source, listing.pictures))
    assert [ref.userid for ref, _ in results] == listing.userids  # in order
    got = dict((ref.userid, data) for ref, data in results)
    for userid in ("u0", "u1", "u2", "u3", "u4"):
        assert got[userid] == jpegs[userid]
        assert preprocess(got[userid], (32, 32)).shape == (32, 32, 3)  # type: ignore[arg-type]
    assert got["empty"] == b""
    with pytest.raises(PictureError, match="empty"):
        preprocess(got["empty"], (32, 32))  # type: ignore[arg-type]
    with pytest.raises(PictureError) as caught:  # an HTML page named .jpg: bytes, then refused
        preprocess(got["page"], (32, 32))  # type: ignore[arg-type]
    assert caught.value.kind == "not_an_image"
    fetcher.close()


def test_store_failures_are_typed_errors(
    aws_env: S3Store, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = PrefixSource(f"s3://{bucket}/profiles/image/")
    manifest = ManifestSource("m.csv")
    small = Fetcher(make_policy(max_bytes=100_000))
    cases = {
        "missing key": (prefix, PictureRef("zz", "zz.jpg")),
        "missing bucket": (manifest, PictureRef("zz", "s3://no-such-bucket/zz.jpg")),
        "listing says too big": (prefix, PictureRef("big", "big.jpg", size=10**12)),
        "store says too big": (prefix, PictureRef("big", "big.jpg")),
        "listing size lies": (prefix, PictureRef("big", "big.jpg", size=10)),
        "not its picture": (prefix, PictureRef("u1", "u0.jpg")),
    }
    kinds = {name: _fetch(small, *case) for name, case in cases.items()}
    assert {name: getattr(exc, "kind", exc) for name, exc in kinds.items()} == {
        "missing key": "not_found",
        "missing bucket": "not_found",
        "listing says too big": "too_large",
        "store says too big": "too_large",
        "listing size lies": "too_large",
        "not its picture": "invalid_reference",
    }
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LISTER_KEY)  # may list, may not read
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LISTER_SECRET)
    denied = _fetch(Fetcher(make_policy()), prefix, PictureRef("u0", "u0.jpg", size=5))
    assert isinstance(denied, PictureError) and denied.kind == "forbidden"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-xyz")
    wrong = _fetch(Fetcher(make_policy()), prefix, PictureRef("u0", "u0.jpg"))
    assert isinstance(wrong, PictureError) and wrong.kind == "forbidden"
    for exc in (denied, wrong):
        assert LISTER_KEY not in str(exc) and "wrong-secret-xyz" not in str(exc)


@pytest.fixture
def delay_proxy(s3_server: S3Store) -> Iterator[tuple[str, int]]:  # noqa: F811
    """A proxy before the S3 store that holds every request for 60 s: a store that hangs."""
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.delayproxy", "--listen", f"127.0.0.1:{port}"]
        + ["--upstream", f"{s3_server.host}:{s3_server.port}", "--delay-ms", "60000"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port, 15, proc)
        yield "127.0.0.1", port
    finally:
        proc.kill()
        proc.wait(10)


def test_a_store_that_hangs_or_is_down_means_requeue(
    aws_env: S3Store,
    bucket: str,
    delay_proxy: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = PrefixSource(f"s3://{bucket}/profiles/image/")
    refs = [PictureRef(f"u{i}", f"u{i}.jpg", size=100) for i in range(6)]
    policy = make_policy(timeout=1.0, attempts=2, concurrency=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{delay_proxy[0]}:{delay_proxy[1]}")
    started = time.monotonic()
    hung = list(Fetcher(policy).fetch_all(source, refs))
    took = time.monotonic() - started
    assert all(isinstance(r, Unavailable) and r.kind == "timeout" for _, r in hung), hung
    # Two in flight time out together; the four after them fail at once ("same store").
    assert took < 2 * policy.timeout * policy.attempts + 2
    assert sum("same store" in str(r) for _, r in hung) >= 3
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    down = _fetch(Fetcher(policy), source, refs[0])
    assert isinstance(down, Unavailable) and down.kind == "unreachable", down
    assert "(2 attempts)" in str(down)


def test_a_host_without_credentials_hands_pictures_back(
    aws_env: S3Store, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    source = PrefixSource(f"s3://{bucket}/profiles/image/")
    result = _fetch(Fetcher(make_policy()), source, PictureRef("u0", "u0.jpg"))
    # Not the picture's fault: another host, with credentials, will score it.
    assert isinstance(result, Unavailable) and result.kind == "misconfigured", result


# --- fetching URLs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(http_server: HttpPictures, jpegs: dict[str, bytes]) -> HttpPictures:  # noqa: F811
    """The HTTP server with the test pictures in its folder."""
    for userid, data in jpegs.items():
        (http_server.folder / f"{userid}.jpg").write_bytes(data)
    return http_server


def _url_kind(fetcher: Fetcher, url: str) -> str:
    result = _fetch(fetcher, ManifestSource("m.csv"), PictureRef("u0", url))
    if isinstance(result, bytes):
        return f"{len(result)} bytes"
    assert isinstance(result, PictureError | Unavailable)
    return f"{type(result).__name__}:{result.kind}"


def test_each_url_failure_has_its_kind(served: HttpPictures, jpegs: dict[str, bytes]) -> None:
    fetcher = Fetcher(make_policy(max_bytes=1_000_000, timeout=1.5))
    size = len(jpegs["u0"])
    expected = {
        "/pics/u0.jpg": f"{size} bytes",
        "/pics/zz.jpg": "PictureError:not_found",
        "/status/410": "PictureError:not_found",
        "/status/403": "PictureError:forbidden",
        "/status/401": "PictureError:forbidden",
        "/status/418": "PictureError:fetch_failed",
        "/status/503": "Unavailable:server_error",
        "/status/429": "Unavailable:server_error",
        "/flaky/1/once/u0.jpg": f"{size} bytes",  # a 503, then the picture
        "/hang": "Unavailable:timeout",
        "/drip": "Unavailable:timeout",
        "/huge": "PictureError:too_large",
        "/endless": "PictureError:too_large",
        "/loop/a": "PictureError:fetch_failed",
        "/page.jpg": "64 bytes",
        "/redirect?to=/pics/u0.jpg": f"{size} bytes",
        "/redirect?to=http://169.254.169.254/latest/meta-data/": "PictureError:blocked_url",
        "/redirect?to=http://[fd00:ec2::254]/latest/": "PictureError:blocked_url",
        "/redirect?to=file:///etc/passwd": "PictureError:blocked_url",
        "/redirect?to=s3://pictures/profiles/image/u0.jpg": "PictureError:blocked_url",
    }
    got = {path: _url_kind(fetcher, served.url(path)) for path in expected}
    assert got == expected
    stats = served.stats()
    # The 5 GiB body was refused from its Content-Length: at most socket buffers went out.
    assert stats["huge"] == 1 and stats.get("huge_bytes", 0) < 8 * 1024**2
    assert stats.get("endless_bytes", 0) < 64 * 1024**2  # read stopped at the limit
    assert stats["flaky:once"] == 2 and stats["status"] == 4 + 2 * 2  # 503, 429: twice
    fetcher.close()


def test_a_url_host_that_refuses_connections_is_retried_then_handed_back() -> None:
    url = f"http://127.0.0.1:{free_ports(1)[0]}/u0.jpg"
    assert _url_kind(Fetcher(make_policy()), url) == "Unavailable:unreachable"


def test_an_html_page_named_jpg_is_not_an_image(served: HttpPictures) -> None:
    data = Fetcher(make_policy()).fetch(
        ManifestSource("m.csv"), PictureRef("u0", served.url("/page.jpg"))
    )
    with pytest.raises(PictureError) as caught:
        preprocess(data, (32, 32))
    assert caught.value.kind == "not_an_image"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://0xA9FEA9FE/latest/meta-data/",  # the same address, in hex
        "http://2852039166/latest/meta-data/",  # and as one number
        "http://[0:0:0:0:0:ffff:a9fe:a9fe]:80/x",
        "http://169.254.0.1:8080/",
        "http://[fd00:ec2::254]/latest/meta-data/",
    ],
)
def test_metadata_addresses_are_refused_in_every_spelling(url: str) -> None:
    started = time.monotonic()
    assert _url_kind(Fetcher(make_policy()), url) == "PictureError:blocked_url"
    assert time.monotonic() - started < 1  # refused before any connection attempt


def test_blocking_loopback_too_is_one_setting(served: HttpPictures) -> None:
    fetcher = Fetcher(make_policy(blocked=("127.0.0.0/8",)))
    assert _url_kind(fetcher, served.url("/pics/u0.jpg")) == "PictureError:blocked_url"
    named = f"http://localhost:{served.port}/pics/u0.jpg"  # a name resolving to it
    assert _url_kind(fetcher, named) == "PictureError:blocked_url"


def test_fetch_concurrency_is_bounded_and_overlaps(served: HttpPictures) -> None:
    fetcher = Fetcher(make_policy(concurrency=4))
    refs = [PictureRef("u0", served.url("/slow/300/u0.jpg")) for _ in range(10)]
    results = list(fetcher.fetch_all(ManifestSource("m.csv"), refs))
    assert all(isinstance(data, bytes) for _, data in results)
    assert served.stats()["slow_max_inflight"] == 4


def test_signed_urls_and_keys_stay_out_of_errors_and_logs(
    served: HttpPictures, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "X-Amz-Credential=AKIASECRETKEY&X-Amz-Signature=f00dfeed"
    fetcher = Fetcher(make_policy())
    caplog.set_level(logging.DEBUG)
    errors = [
        _fetch(fetcher, ManifestSource("m.csv"), PictureRef("u0", served.url(path) + secret))
        for path in ("/status/403?", "/status/500?", "/pics/zz.jpg?", "/loop/a?")
    ]
    assert [getattr(e, "kind", None) for e in errors] == [
        "forbidden",
        "server_error",
        "not_found",
        "fetch_failed",
    ]
    for text in [str(e) for e in errors] + [caplog.text]:
        assert "AKIASECRETKEY" not in text and "f00dfeed" not in text


def test_file_urls_read_only_under_their_root(tmp_path: Path, jpegs: dict[str, bytes]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "u0.jpg").write_bytes(jpegs["u0"])
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    fetcher = Fetcher(make_policy(file_root=root))
    assert _url_kind(fetcher, f"file://{root}/u0.jpg") == f"{len(jpegs['u0'])} bytes"
    assert _url_kind(fetcher, f"file://{root}/none.jpg") == "PictureError:not_found"
    assert _url_kind(fetcher, f"file://{root}/escape.jpg") == "PictureError:blocked_url"
    assert _url_kind(fetcher, f"file://{tmp_path}/secret.jpg") == "PictureError:blocked_url"
    closed = Fetcher(make_policy(file_root=None))
    assert _url_kind(closed, f"file://{root}/u0.jpg") == "PictureError:blocked_url"


def test_folder_sources_read_through_the_same_fetcher(
    tmp_path: Path, jpegs: dict[str, bytes]
) -> None:
    (tmp_path / "u0.png").write_bytes(jpegs["u0"])
    source = FolderSource(tmp_path)
    fetcher = Fetcher(make_policy())
    assert fetcher.fetch(source, PictureRef("u0", "u0.png")) == jpegs["u0"]
    missing = _fetch(fetcher, source, PictureRef("u1", "u1.jpg"))
    assert isinstance(missing, PictureError) and missing.kind == "missing"
    wrong = _fetch(fetcher, source, PictureRef("u1", "../u1.jpg"))
    assert isinstance(wrong, PictureError) and wrong.kind == "invalid_reference"


def test_pictures_as_one_string_each_path_or_url(
    aws_env: S3Store, bucket: str, served: HttpPictures, tmp_path: Path, jpegs: dict[str, bytes]
) -> None:
    (tmp_path / "u0.jpg").write_bytes(jpegs["u0"])
    items = [
        ("u0", str(tmp_path / "u0.jpg")),
        ("u1", f"s3://{bucket}/profiles/image/u1.JPG"),
        ("u2", served.url("/pics/u2.jpg")),
        ("u3", "relative/u3.jpg"),
        ("u4", str(tmp_path / "u5.jpg")),
    ]
    results = list(Fetcher(make_policy()).fetch_pictures(items))
    assert [(u, p) for u, p, _ in results] == items
    got = [r if isinstance(r, bytes) else getattr(r, "kind", r) for _, _, r in results]
    assert got == [jpegs["u0"], jpegs["u1"], jpegs["u2"], "blocked_url", "invalid_reference"]
