"""Several hosts on one machine: namespaces reach each other's Redis and S3; a cut link cuts.

The ground the multi-host tests of issue 10 stand on. Needs root (CI runs as root);
nothing is skipped when a tool is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import PREFIX, ip, network, redis_on
from tests.servers import ADMIN_KEY, ADMIN_SECRET, s3_store

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

S3_PROBE = """
import sys, s3fs
fs = s3fs.S3FileSystem(key=sys.argv[2], secret=sys.argv[3], endpoint_url=sys.argv[1],
                       skip_instance_cache=True, config_kwargs={"connect_timeout": 2,
                       "read_timeout": 2, "retries": {"total_max_attempts": 1}})
fs.pipe("hosts/probe.txt", b"from another host")
print(fs.cat("hosts/probe.txt").decode())
"""


def test_hosts_reach_each_other_and_a_cut_link_cuts(tmp_path: Path) -> None:
    with network() as net:
        store, worker = net.add_host("store"), net.add_host("worker1")
        assert store.address != worker.address
        # Each host has its own stack: the worker host does not see the store's ports.
        with redis_on(store, tmp_path / "redis") as redis_url:
            assert f"{store.address}:6379" not in worker.run(["ss", "-ltn"]).stdout
            ping = worker.run(["redis-cli", "-u", redis_url, "ping"])
            assert ping.stdout.strip() == "PONG", ping.stderr
            with s3_store(store.address, store.prefix) as s3:
                s3.filesystem().mkdir("hosts")
                probe = [sys.executable, "-c", S3_PROBE, s3.endpoint, ADMIN_KEY, ADMIN_SECRET]
                done = worker.run(probe, timeout=60)
                assert done.stdout.strip() == "from another host", done.stderr[-2000:]

                store.cut()
                cut = worker.run(["timeout", "3", "redis-cli", "-u", redis_url, "ping"])
                assert cut.returncode != 0 and "PONG" not in cut.stdout
                assert worker.run(probe, timeout=60).returncode != 0

                store.restore()
                back = worker.run(["redis-cli", "-u", redis_url, "ping"], timeout=30)
                assert back.stdout.strip() == "PONG"
    leftovers = ip("netns", "list").stdout + ip("-o", "link").stdout
    assert f"{net.tag}-" not in leftovers and net.bridge not in leftovers


def test_the_network_is_removed_when_the_block_fails() -> None:
    tag = ""
    with pytest.raises(RuntimeError, match="boom"), network() as net:
        tag = net.tag
        host = net.add_host("h1")
        host.popen(["sleep", "300"], stdout=subprocess.DEVNULL)
        raise RuntimeError("boom")
    assert tag.startswith(PREFIX)
    assert tag not in ip("netns", "list").stdout + ip("-o", "link").stdout
