"""The worker's parent process must never import TensorFlow before the pool forks."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, worker_env


def test_worker_and_producer_modules_do_not_import_tensorflow() -> None:
    code = (
        "import sys, worker, worker.tasks, training.tasks, producer.nightly, producer.cli;"
        "from worker.celery import app; app.loader.import_default_modules();"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
