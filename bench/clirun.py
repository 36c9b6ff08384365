"""``genderscore ARGS``, stamping when the command starts and when its model is loaded.

``python -m bench.clirun score DIR --local`` runs exactly ``genderscore score DIR
--local``. On stderr, ``bench-clirun-start <unix time> <cpu seconds>`` marks the
command's start (after Python's own start-up and the CLI's imports) with the CPU the
process has used by then, and ``bench-clirun-model-loaded <unix time>`` the end of
each ``worker.model.load_bundle`` call, so the benchmark can time ``--local`` with and
without TensorFlow's import and the model load; ``bench-clirun-peak-kib <KiB>``, as it
exits, the process's peak resident memory (``VmHWM``). Observing only: nothing else
changes.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from bench.procs import LOADED_MARK, PEAK_MARK, START_MARK, memory_kib


def main() -> None:
    """Import the CLI, stamp the time, run it with this process's arguments."""
    import worker.model
    from producer.cli import main as genderscore

    load_bundle = worker.model.load_bundle

    @functools.wraps(load_bundle)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        bundle = load_bundle(*args, **kwargs)
        print(f"{LOADED_MARK} {time.time():.6f}", file=sys.stderr, flush=True)
        return bundle

    worker.model.load_bundle = stamped  # producer.local imports it when it runs
    print(f"{START_MARK} {time.time():.6f} {time.process_time():.4f}", file=sys.stderr, flush=True)
    try:
        genderscore(sys.argv[1:], prog_name="genderscore")
    finally:  # click ends with SystemExit
        peak = memory_kib(os.getpid()).get("VmHWM", 0)
        print(f"{PEAK_MARK} {peak}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
