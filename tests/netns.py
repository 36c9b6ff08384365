"""Several real network hosts on this machine: Linux network namespaces on a bridge.

``Network()`` is a context manager (root only, as in CI): it creates a bridge in the
root namespace and, per ``add_host``, a namespace joined to the bridge by a veth pair,
with its own address. The root namespace gets the subnet's first address, so the
test process can reach every host; hosts reach each other and nothing else (no
route out). ``host.cut()`` sets the root side of the host's veth down: the host is
cut off from all others, as a pulled cable would; ``host.restore()`` plugs it back.

Everything is removed when the block ends, on failure too, processes started with
``host.popen`` first; ``sweep_stale()`` removes what a killed session left behind
(names carry the creating process id). Addresses come from 198.18.0.0/15, the range
reserved for network benchmarks, one /24 per network, never one that a route of
this machine already uses.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "gsn"  # every name this module creates starts with it


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise with its message if it fails and ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One network namespace on the bridge."""

    name: str  # the namespace
    address: str
    veth: str  # the root side of its veth pair
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def prefix(self) -> tuple[str, ...]:
        """The command prefix that runs a command inside this host."""
        return ("ip", "netns", "exec", self.name)

    def run(self, cmd: Sequence[str], timeout: float = 60, **kwargs: Any) -> Any:
        """Run ``cmd`` inside the host and wait (``subprocess.run`` arguments)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run([*self.prefix, *cmd], timeout=timeout, **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the host; it is stopped when the network is removed."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.prefix, *cmd], **kwargs)
        self.processes.append(proc)
        return proc

    def cut(self) -> None:
        """Cut the host off the network (its link down, as a pulled cable)."""
        ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        """Plug the host back in."""
        ip("link", "set", self.veth, "up")

    def stop_processes(self) -> None:
        """Stop what ``popen`` started here: SIGTERM, then SIGKILL to the group."""
        for proc in self.processes:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self.processes.clear()


class Network:
    """A bridge and the namespaces on it (see the module docstring)."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}b"
        self.hosts: dict[str, Host] = {}
        self.subnet = _free_subnet()
        self.gateway = f"{self.subnet}.1"

    def __enter__(self) -> Network:
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, short: str) -> Host:
        """A new namespace ``<tag>-<short>`` on the bridge, with the next address."""
        if not re.fullmatch(r"[a-z0-9]{1,8}", short) or short in self.hosts:
            raise ValueError(f"host name {short!r}: [a-z0-9]{{1,8}}, once per network")
        index = len(self.hosts) + 2  # .1 is the root namespace's
        name, veth, inner = f"{self.tag}-{short}", f"{self.tag}h{index}", f"{self.tag}i{index}"
        host = Host(name, f"{self.subnet}.{index}", veth)
        self.hosts[short] = host
        ip("netns", "add", name)
        ip("link", "add", veth, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", name)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "set", inner, "name", "eth0"),
            ("addr", "add", f"{host.address}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
        ):
            ip("netns", "exec", name, "ip", *args)
        return host

    def close(self) -> None:
        """Stop the hosts' processes, delete the namespaces (and veths), the bridge."""
        for host in self.hosts.values():
            host.stop_processes()
            ip("netns", "del", host.name, check=False)
            ip("link", "del", host.veth, check=False)
        self.hosts.clear()
        ip("link", "del", self.bridge, check=False)


def _free_subnet() -> str:
    used = ip("-4", "route").stdout + ip("-4", "addr").stdout
    start = os.getpid() % 512
    for step in range(512):
        n = (start + step) % 512
        subnet = f"198.{18 + n // 256}.{n % 256}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError("no free /24 in 198.18.0.0/15")


def sweep_stale() -> list[str]:
    """Remove namespaces and links left by sessions whose process is gone."""
    removed = []
    names = ip("netns", "list", check=False).stdout.split()
    links = re.findall(r"^\d+: ([^:@]+)", ip("-o", "link").stdout, re.M)
    for name in [*names, *links]:
        match = re.match(rf"{PREFIX}(\d+)", name)
        if match and not Path(f"/proc/{match[1]}").exists():
            kind = "netns" if name in names else "link"
            ip(kind, "del", name, check=False)
            removed.append(name)
    return removed


@contextmanager
def network() -> Iterator[Network]:
    """A ``Network``, after sweeping what killed sessions left."""
    sweep_stale()
    with Network() as net:
        yield net


@contextmanager
def redis_on(host: Host, workdir: Path, port: int = 6379) -> Iterator[str]:
    """A private redis-server listening on ``host``'s address; yields its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = host.popen(
        ["redis-server", "--bind", host.address, "--port", str(port), "--save", ""]
        + ["--appendonly", "no", "--protected-mode", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from tests.servers import wait_port

    wait_port(host.address, port, 15, proc)
    yield f"redis://{host.address}:{port}/0"
