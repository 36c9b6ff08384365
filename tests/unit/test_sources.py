"""Picture sources: parsing, references, the URL policy, listing rules, manifests."""

from __future__ import annotations

import ipaddress
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from producer.manifest import ManifestError, read_manifest
from producer.sources import Entry, s3_partitions, select_pictures, version_token
from worker.settings import Settings
from worker.sources import (
    FolderSource,
    ManifestSource,
    PictureRef,
    PrefixSource,
    SourceError,
    check_name,
    check_ref,
    check_url,
    is_blocked,
    parse_source,
    parse_spec,
    redact_url,
)

EXTS = (".jpg", ".jpeg", ".png", ".webp")
SCHEMES = ("s3", "gs", "https", "http", "file")
BLOCKED = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")


# --- sources and references --------------------------------------------------------------


def test_sources_parse_and_round_trip_through_their_spec(tmp_path: Path) -> None:
    folder = parse_source(str(tmp_path), SCHEMES)
    assert folder == FolderSource(tmp_path.resolve())
    assert parse_source(f"file://{tmp_path}/", SCHEMES) == FolderSource(tmp_path.resolve())
    prefix = parse_source("s3://bucket/profiles/image", SCHEMES)
    assert prefix == PrefixSource("s3://bucket/profiles/image/")
    assert prefix.url_of("u1.jpg", EXTS) == "s3://bucket/profiles/image/u1.jpg"
    for source in (folder, prefix, ManifestSource("m.csv")):
        assert parse_spec(source.spec) == source
    with pytest.raises(SourceError, match="not an absolute path"):
        parse_spec("folder:relative/dir")
    with pytest.raises(SourceError, match="unknown source kind"):
        parse_spec("ftp:x")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("https://host/pics/", "cannot be listed; use --manifest"),
        ("ftp://host/pics/", "scheme 'ftp' is not allowed"),
        ("memory://pics/", "another host"),
        ("s3://KEY:s3kr1t@bucket/pics/", "credentials in the URL"),
        ("s3://bucket/pics/?X-Amz-Signature=abc", r"no \?query"),
        ("s3:///pics/", "no bucket"),
    ],
)
def test_bad_source_prefixes_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(SourceError, match=reason) as caught:
        parse_source(text, SCHEMES)
    assert "s3kr1t" not in str(caught.value) and "abc" not in str(caught.value)


def test_picture_refs_survive_the_wire_and_refuse_tampering() -> None:
    ref = PictureRef("u1", "u1.jpg", 1234, "e:abc:1234")
    assert PictureRef.from_wire(ref.to_wire()) == ref
    assert PictureRef.from_wire({"userid": "u2", "name": "u2.png"}).size is None
    for bad in (
        {"userid": "../x", "name": "x.jpg"},
        {"userid": "u1"},
        {"userid": "u1", "name": "u1.jpg", "size": -1},
        {"userid": "u1", "name": "u1.jpg", "size": True},
        {"userid": "u1", "name": "u1.jpg", "version": 3},
    ):
        with pytest.raises(SourceError):
            PictureRef.from_wire(bad)


def test_names_must_be_the_userids_picture() -> None:
    assert check_name("User_1-x.JPEG", EXTS) == "User_1-x"
    for bad in ("u1.gif", "../u1.jpg", "u1", "a.b.jpg", "é.jpg", "u1.jpg/x"):
        with pytest.raises(SourceError):
            check_name(bad, EXTS)
    prefix = PrefixSource("s3://b/p/")
    check_ref(prefix, PictureRef("u1", "u1.png"), SCHEMES, None, BLOCKED)
    check_ref(prefix, PictureRef("u1", "u1.gif"), SCHEMES, None, BLOCKED)  # the listing's rule
    with pytest.raises(SourceError, match="not the picture of userid u2"):
        check_ref(prefix, PictureRef("u2", "u1.png"), SCHEMES, None, BLOCKED)
    with pytest.raises(SourceError):
        check_ref(prefix, PictureRef("u1", "../u1.png"), SCHEMES, None, BLOCKED)


# --- URL policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://host/u1.jpg", "scheme 'ftp' is not allowed"),
        ("javascript:alert(1)", "scheme 'javascript' is not allowed"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data' is not allowed"),
        ("u1.jpg", "not a URL"),
        ("https://user:pw@host/u1.jpg", "credentials in the URL"),
        ("https://host/a b.jpg", "spaces"),
        ("http://169.254.169.254/latest/meta-data/", "blocked network"),
        ("http://[fd00:ec2::254]/latest/", "blocked network"),
        ("http://[::ffff:169.254.169.254]/x", "blocked network"),
        ("s3://bucket", "no object key"),
        ("https:///u1.jpg", "no host"),
        ("file:///etc/passwd", "GENDERSCORE_FILE_URL_ROOT"),
        ("https://host:99999/u1.jpg", "invalid port"),
        ("https://" + "a" * 3000, "longer than"),
    ],
)
def test_the_url_policy_refuses_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(SourceError, match=reason) as caught:
        check_url(url, SCHEMES, None, BLOCKED)
    assert "pw@" not in str(caught.value)


def test_file_urls_only_under_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "u1.jpg").write_bytes(b"x")
    (root / "out").symlink_to(tmp_path)
    assert check_url(f"file://{root}/u1.jpg", SCHEMES, root, BLOCKED) == "file"
    for url in (f"file://{tmp_path}/x.jpg", f"file://{root}/../x.jpg", f"file://{root}/out/x"):
        with pytest.raises(SourceError):
            check_url(url, SCHEMES, root, BLOCKED)
    with pytest.raises(SourceError, match="names no host"):
        check_url(f"file://otherhost{root}/u1.jpg", SCHEMES, root, BLOCKED)


def test_blocked_networks_see_through_ipv6_tricks() -> None:
    def blocked(text: str) -> bool:
        return is_blocked(ipaddress.ip_address(text), BLOCKED)

    assert blocked("169.254.169.254") and blocked("fd00:ec2::254") and blocked("fe80::1")
    assert blocked("::ffff:169.254.169.254")  # IPv4-mapped
    assert blocked("2002:a9fe:a9fe::1")  # 6to4
    assert blocked("64:ff9b::a9fe:a9fe")  # NAT64
    assert not blocked("127.0.0.1") and not blocked("10.1.2.3") and not blocked("::1")


def test_redaction_strips_userinfo_and_query() -> None:
    url = "https://AKIAKEY:secret@host.example/pics/u1.jpg?X-Amz-Signature=deadbeef#frag"
    shown = redact_url(url)
    assert shown == "https://host.example/pics/u1.jpg?…"
    assert "secret" not in shown and "deadbeef" not in shown and "AKIA" not in shown


# --- listing rules ---------------------------------------------------------------------------


def test_listing_rules_extensions_case_userids_and_ambiguous_userids() -> None:
    entries = [
        Entry("a.jpg", True, 10, "t1"),
        Entry("B.JPEG", True, 11, "t2"),
        Entry("c.Png", True, 12, "t3"),
        Entry("d.webp", True, 13, "t4"),
        Entry("e.gif", True),
        Entry("bad id.jpg", True),
        Entry("x.jpg", True),
        Entry("x.png", True),
        Entry("sub", False),
        Entry(".hidden", True),
        Entry("noext", True),
        Entry("f.jpg", True, skip="links outside the folder (/etc)"),
    ]
    listing = select_pictures(PrefixSource("s3://b/p/"), entries, EXTS)
    assert listing.pictures == [
        PictureRef("B", "B.JPEG", 11, "t2"),
        PictureRef("a", "a.jpg", 10, "t1"),
        PictureRef("c", "c.Png", 12, "t3"),
        PictureRef("d", "d.webp", 13, "t4"),
    ]
    reasons = dict(listing.skipped)
    assert reasons["e.gif"].startswith("not a picture")
    assert reasons["bad id.jpg"].startswith("not a valid userid")
    assert "x has 2 pictures" in reasons["x.jpg"] and reasons["x.png"] == reasons["x.jpg"]
    assert reasons["sub"] == "not a regular file"
    assert reasons["noext"].startswith("not a picture")
    assert reasons["f.jpg"].startswith("links outside")
    assert len(listing.skipped) == 8
    only_jpg = select_pictures(PrefixSource("s3://b/p/"), entries, (".jpg",))
    assert only_jpg.userids == ["a", "x"]  # x.png is no picture there: x.jpg is alone


def test_version_tokens_come_from_the_listing_entry() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    s3 = {"ETag": '"5d41402abc4b2a76b9719d911017c592"', "size": 5, "LastModified": when}
    assert version_token(s3) == "e:5d41402abc4b2a76b9719d911017c592:5"
    assert version_token({**s3, "VersionId": "v7"}) == "v:v7:5"
    assert version_token({**s3, "VersionId": "null"}) == "e:5d41402abc4b2a76b9719d911017c592:5"
    assert version_token({"generation": "171", "etag": "CJ", "size": 9}) == "g:171:9"
    assert version_token({"mtime": 1700000000.5, "size": 3}) == "m:1700000000.5:3"
    assert version_token({"LastModified": when, "size": 3}) == f"m:{when.isoformat()}:3"
    assert version_token({"size": 3}) is None


def test_s3_partitions_hold_every_key_exactly_once() -> None:
    prefix = "profiles/image/"
    names = [
        "",
        "-a",
        ".hidden",
        "/x",
        "0",
        "09.jpg",
        "9~",
        ":",
        "@",
        "A.jpg",
        "Z",
        "[",
        "_",
        "`x",
        "a",
        "z.png",
        "zz",
        "{",
        "~~",
        "é.jpg",
        "\U0010ffff",
        "\x01",
        "a/b",
    ]
    keys = [prefix + n for n in names] + ["other/x.jpg", "profiles/imag"]
    parts = s3_partitions(prefix)
    assert len(parts) == 64 + 6  # a range per userid character, and the gaps between

    def holds(part: tuple[str, str | None, str | None], key: str) -> bool:
        list_prefix, start_after, stop_at = part
        return (
            key.startswith(list_prefix)
            and (start_after is None or key.encode() > start_after.encode())
            and (stop_at is None or key.encode() < stop_at.encode())
        )

    for key in keys:
        count = sum(holds(part, key) for part in parts)
        assert count == (1 if key.startswith(prefix) else 0), (key, count)
    for _, start_after, _ in parts:
        assert start_after is None or len(start_after.encode()) <= 1024


# --- settings --------------------------------------------------------------------------------


def test_source_settings_parse_lists_and_refuse_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERSCORE_PICTURE_EXTENSIONS", "jpg, .PNG")
    monkeypatch.setenv("GENDERSCORE_URL_SCHEMES", '["s3", "HTTPS"]')
    monkeypatch.setenv("GENDERSCORE_FETCH_BLOCKED_NETWORKS", "169.254.0.0/16,10.0.0.0/8")
    loaded = Settings()
    assert loaded.picture_extensions == [".jpg", ".png"]
    assert loaded.url_schemes == ["s3", "https"]
    assert loaded.fetch_blocked_networks == ["169.254.0.0/16", "10.0.0.0/8"]
    for name, value in (
        ("GENDERSCORE_PICTURE_EXTENSIONS", ".j/pg"),
        ("GENDERSCORE_URL_SCHEMES", "javascript"),
        ("GENDERSCORE_FETCH_BLOCKED_NETWORKS", "not-a-net"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError):
            Settings()
        monkeypatch.delenv(name)


# --- manifests -------------------------------------------------------------------------------


def _manifest(tmp_path: Path, text: str | bytes, root: Path | None = None) -> object:
    path = tmp_path / "m.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return read_manifest(path, SCHEMES, root, BLOCKED)


def test_manifest_lines_are_accepted_or_refused_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    root.mkdir()
    text = (
        "\ufeffUserID, URL ,note\n"
        "u1,s3://bucket/p/u1.jpg,ok\n"
        "u2,https://host/u2.jpg?X-Amz-Signature=s3cr3t\n"
        "u3,ftp://host/u3.jpg\n"
        "u4,javascript:alert(1)\n"
        "u5,data:image/png;base64,AAAA\n"
        "../u6,https://host/u6.jpg\n"
        "u7,\n"
        "u1,s3://bucket/p/u1.jpg\n"
        "u8,https://host/a.jpg\n"
        "u8,https://host/b.jpg\n"
        "u9,https://me:pw@host/u9.jpg\n"
        "\n"
        f"u10,file://{root}/u10.jpg\n"
        "u11,http://169.254.169.254/latest/meta-data/\n"
    )
    manifest = _manifest(tmp_path, text, root)
    assert [(p.userid, p.name) for p in manifest.pictures] == [  # type: ignore[attr-defined]
        ("u1", "s3://bucket/p/u1.jpg"),
        ("u10", f"file://{root}/u10.jpg"),
        ("u2", "https://host/u2.jpg?X-Amz-Signature=s3cr3t"),
    ]
    refused = {(r.line, r.userid): r.reason for r in manifest.refused}  # type: ignore[attr-defined]
    assert "scheme 'ftp' is not allowed" in refused[(4, "u3")]
    assert "scheme 'javascript' is not allowed" in refused[(5, "u4")]
    assert "scheme 'data' is not allowed" in refused[(6, "u5")]
    assert refused[(7, "../u6")].startswith("not a valid userid")
    assert refused[(8, "u7")] == "no url"
    assert refused[(9, "u1")] == "duplicate of line 2"
    conflict = "userid u8 has different urls on lines 10, 11"
    assert refused[(10, "u8")] == refused[(11, "u8")] == conflict
    assert "credentials in the URL" in refused[(12, "u9")] and "pw" not in refused[(12, "u9")]
    assert "blocked network" in refused[(15, "u11")]
    assert len(refused) == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the manifest is empty"),
        ("  \n\n", "the manifest is empty"),
        ("userid,link\nu1,https://h/u1.jpg\n", "no 'url' column"),
        ("id,url\nu1,https://h/u1.jpg\n", "no 'userid' column"),
        ("userid,url\n", "no picture lines after the header"),
        (b"userid,url\nu1,https://h/\xff.jpg\n", "not UTF-8"),
    ],
)
def test_unusable_manifests_are_one_clear_error(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        _manifest(tmp_path, text)
    assert "\n" not in str(caught.value)


def test_a_missing_manifest_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        read_manifest(tmp_path / "none.csv", SCHEMES, None, BLOCKED)


# --- fetching from a folder ----------------------------------------------------------------


def _folder_of(tmp_path: Path, count: int) -> tuple[FolderSource, list[PictureRef]]:
    for n in range(count):
        (tmp_path / f"u{n}.jpg").write_bytes(b"picture %d" % n)
    refs = [PictureRef(f"u{n}", f"u{n}.jpg") for n in range(count)]
    return FolderSource(tmp_path.resolve()), refs


def _reads_on(monkeypatch: pytest.MonkeyPatch, delay: list[float]) -> list[int]:
    """Record the thread of each picture read; each read waits ``delay[0]`` seconds."""
    import worker.fetch
    from worker.preprocess import load_picture as real

    threads: list[int] = []

    def recorded(path: Path, max_bytes: int | None = None) -> bytes:
        if delay[0]:  # (sleep(0) would yield the CPU, a read from the page cache does not)
            time.sleep(delay[0])
        threads.append(threading.get_ident())
        return real(path, max_bytes)

    monkeypatch.setattr(worker.fetch, "load_picture", recorded)
    return threads


def test_a_folder_is_read_in_the_calling_thread_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.fetch import Fetcher

    source, refs = _folder_of(tmp_path, 40)
    threads = _reads_on(monkeypatch, [0.0])
    fetched = list(Fetcher().fetch_all(source, refs))
    assert [(ref, data) for ref, data in fetched] == [
        (ref, b"picture %d" % n) for n, ref in enumerate(refs)
    ]
    assert set(threads) == {threading.get_ident()}


def test_a_folder_whose_reads_are_slow_is_read_on_the_fetch_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.fetch import SLOW_FOLDER_READ, Fetcher

    source, refs = _folder_of(tmp_path, 60)
    delay = [0.0]
    threads = _reads_on(monkeypatch, delay)
    fetcher = Fetcher()
    here = threading.get_ident()
    # One read preempted for a while decides nothing.
    delay[0] = 5 * SLOW_FOLDER_READ
    list(fetcher.fetch_all(source, refs[:1]))
    delay[0] = 0.0
    list(fetcher.fetch_all(source, refs))
    assert set(threads) == {here}
    # Reads that keep being slow (a network mount) go to the threads, in order still;
    # then only each batch's first read is made (and timed) here.
    delay[0] = 3 * SLOW_FOLDER_READ
    list(fetcher.fetch_all(source, refs))
    threads.clear()
    fetched = list(fetcher.fetch_all(source, refs))
    assert [data for _, data in fetched] == [b"picture %d" % n for n in range(60)]
    assert threads[0] == here
    assert threads.count(here) == 1
    # Quick again (the files now in the page cache): read here again once a few
    # batches' first reads were quick, however busy the threads were meanwhile.
    delay[0] = 0.0
    for _ in range(20):
        threads.clear()
        list(fetcher.fetch_all(source, refs))
        if set(threads) == {here}:
            break
    assert set(threads) == {here}


def test_a_long_lived_fetcher_follows_a_bounded_number_of_folders(tmp_path: Path) -> None:
    from worker.fetch import MAX_FOLDERS_KNOWN, Fetcher

    fetcher = Fetcher()
    for n in range(MAX_FOLDERS_KNOWN + 5):
        folder = tmp_path / f"night{n}"
        folder.mkdir()
        source, refs = _folder_of(folder, 1)
        assert [data for _, data in fetcher.fetch_all(source, refs)] == [b"picture 0"]
    assert 0 < len(fetcher._folder_reads) <= MAX_FOLDERS_KNOWN
