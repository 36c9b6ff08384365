"""Brokers for the tests: the session Redis, the session RabbitMQ, private RabbitMQ nodes.

Redis: the test Redis is the one at ``GENDERSCORE_TEST_REDIS_URL``; where nothing
listens on a local URL, ``session_redis`` starts a private server on the URL's port
(``producer.localredis``: ``redis-server`` on the PATH, else the embedded Valkey).

RabbitMQ, in this order:

1. the broker answering at 127.0.0.1:5672 (guest/guest), in a virtual host of this
   session (created with the machine's ``rabbitmqctl``, deleted at the end), so that
   the queues and the worker broadcasts of two sessions never meet;
2. else a private node, where ``rabbitmq-server`` is installed;
3. else (or when 5672 answers but neither ``rabbitmqctl`` nor ``rabbitmq-server`` is
   usable) the default virtual host of the broker at 5672, with a warning; and with no
   broker at all, ``BrokerUnavailable`` saying how to install one (a failure, not a skip).

``RabbitNode`` is a private node on free ports with its own node name, Mnesia, log and
cookie folders under one base folder and no plugins. ``stop()`` (graceful or
``kill=True``) and ``start()`` again keep its data: durable queues and persistent
messages survive, for broker restart and outage tests. ``add_vhost_user`` gives a test
its own virtual host and user.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote, urlsplit

import kombu

from producer.localredis import (
    LOOPBACK_HOSTS,
    LocalRedis,
    LocalRedisError,
    free_port,
    port_open,
    start_server,
)

log = logging.getLogger(__name__)

MACHINE_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
INSTALL_HINT = (
    "rabbitmq-server is not installed: install it (Debian: apt-get install rabbitmq-server)"
    " or run a broker at 127.0.0.1:5672 (docker run -d -p 5672:5672 rabbitmq:3)"
)


class BrokerUnavailable(RuntimeError):
    """No broker answers and none can be started here."""


def session_redis(url: str, workdir: Path) -> LocalRedis | None:
    """A private server on the port of a local, credential-less ``url`` where nothing
    listens; None where something listens or the URL is not such (nothing to start)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    local = host in LOOPBACK_HOSTS and not (parts.username or parts.password)
    if not local or parts.scheme != "redis" or port_open(port, host):
        return None
    try:
        server = start_server(port, workdir=workdir)
    except LocalRedisError as exc:
        raise BrokerUnavailable(f"tests need Redis at {url}: {exc}") from None
    log.warning("no Redis listened at %s: started %s", url, server.binary.describe())
    return server


def path_without(program: str) -> str:
    """This PATH less every folder that holds ``program`` (a machine without it)."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(f for f in folders if not (Path(f) / program).exists())


def amqp_answers(url: str, timeout: float = 3) -> bool:
    """Whether an AMQP broker accepts a connection (handshake and login) at ``url``."""
    conn = kombu.Connection(url, connect_timeout=timeout)
    try:
        conn.connect()
        return True
    except (OSError, *conn.connection_errors, *conn.channel_errors) as exc:
        log.debug("no AMQP at %s: %s", url, exc)
        return False
    finally:
        conn.release()


def rabbitmq_scripts() -> tuple[Path, Path] | None:
    """``(rabbitmq-server, rabbitmqctl)`` runnable by this user, or None if not installed.

    Debian's /usr/sbin scripts switch to the ``rabbitmq`` user, who could not write our
    folders; the real scripts are in /usr/lib/rabbitmq/bin.
    """
    for folder in (Path("/usr/lib/rabbitmq/bin"), Path("/usr/local/lib/rabbitmq/bin")):
        if (folder / "rabbitmq-server").exists():
            return folder / "rabbitmq-server", folder / "rabbitmqctl"
    found = shutil.which("rabbitmq-server", path=os.environ["PATH"] + ":/usr/sbin:/sbin")
    if found is None:
        return None
    server = Path(found).resolve()
    return server, server.with_name("rabbitmqctl")


def _amqp_url(port: int, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
    return f"amqp://{quote(user, '')}:{quote(password, '')}@127.0.0.1:{port}/{quote(vhost, '')}"


class RabbitNode:
    """A private RabbitMQ node; its data lives in ``base`` across stops and starts."""

    def __init__(self, base: Path, name: str | None = None) -> None:
        scripts = rabbitmq_scripts()
        if scripts is None:
            raise BrokerUnavailable(INSTALL_HINT)
        self.server_script, self.ctl_script = scripts
        self.base = base
        self.name = f"{name or 'gstest-' + uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        # Our own config and env files: the machine's (/etc/rabbitmq) name port 5672.
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")
        self.env = dict(
            os.environ,
            HOME=str(base),  # the Erlang cookie of this node and of its rabbitmqctl
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "node.pid"),
        )

    @property
    def url(self) -> str:
        """guest on the default virtual host."""
        return _amqp_url(self.port)

    @property
    def log_path(self) -> Path:
        """The node's console output (boot banner, then its log lines)."""
        return self.base / "console.log"

    def log_tail(self, lines: int = 8) -> str:
        """The end of the node's log file, for error messages."""
        path = self.base / "log" / f"{self.name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        """Whether the node's process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 90) -> float:
        """Boot the node (again, with its data) and wait until AMQP answers; seconds taken."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        if port_open(self.port):
            raise BrokerUnavailable(f"port {self.port} of {self.name} is taken by another process")
        began = time.monotonic()
        with self.log_path.open("ab") as console:
            self.proc = subprocess.Popen(
                [str(self.server_script)],
                env=self.env,
                cwd=self.base,
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # kill=True takes the whole VM (and only it)
            )
        deadline = began + timeout
        while not (port_open(self.port) and amqp_answers(self.url, timeout=2)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = "exited" if self.proc.poll() is not None else "is not ready"
                self.stop(kill=True)
                raise BrokerUnavailable(
                    f"RabbitMQ node {self.name} {state} after {time.monotonic() - began:.0f} s:"
                    f"\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return time.monotonic() - began

    def stop(self, kill: bool = False, timeout: float = 60) -> None:
        """Stop the node: SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL to all of it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None and not kill:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        if proc.poll() is None:
            # The script leads the session of the VM, erl_child_setup and the disk monitor;
            # it is not reaped yet, so the group id is still ours.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE ARGS``; its stdout, or an error with its output."""
        proc = subprocess.run(
            [str(self.ctl_script), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def add_vhost_user(self, vhost: str, user: str, password: str) -> str:
        """A virtual host and a user with every right on it (only); the user's URL."""
        self.ctl("add_vhost", vhost)
        self.ctl("add_user", user, password)
        self.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return _amqp_url(self.port, user, password, vhost)


@contextmanager
def private_rabbitmq(base: Path, name: str | None = None) -> Iterator[RabbitNode]:
    """A started private node, stopped (and its processes gone) when the block ends."""
    node = RabbitNode(base, name)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _machine_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    """The machine's ``rabbitmqctl`` (Debian's switches to the rabbitmq user, as root)."""
    ctl = shutil.which("rabbitmqctl", path=os.environ["PATH"] + ":/usr/sbin:/sbin")
    if ctl is None:
        raise FileNotFoundError("rabbitmqctl")
    return subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60, check=False)


@contextmanager
def session_rabbitmq(base: Path) -> Iterator[str]:
    """The AMQP URL the tests use (see the module docstring), cleaned up when the block ends."""
    if amqp_answers(MACHINE_AMQP_URL):
        vhost = f"gstest{os.getpid()}"
        try:
            created = _machine_ctl("add_vhost", vhost).returncode == 0
        except (FileNotFoundError, subprocess.TimeoutExpired):
            created = False
        if created:
            try:
                _machine_ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
                yield _amqp_url(5672, vhost=vhost)
            finally:
                _machine_ctl("delete_vhost", vhost)
            return
        if rabbitmq_scripts() is None:
            log.warning(
                "RabbitMQ at 127.0.0.1:5672: no rabbitmqctl to make this session's virtual"
                " host; using '/' (other sessions on that broker share its queues)"
            )
            yield MACHINE_AMQP_URL
            return
    elif rabbitmq_scripts() is None:
        raise BrokerUnavailable(
            f"tests need RabbitMQ: nothing answers at 127.0.0.1:5672 and {INSTALL_HINT}"
        )
    with private_rabbitmq(base) as node:
        log.warning("started a private RabbitMQ node %s at %s", node.name, node.url)
        yield node.url
