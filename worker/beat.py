"""Celery beat with a heartbeat, so that a health check notices a beat that stopped.

``HeartbeatScheduler`` is Celery's persistent scheduler that also rewrites
``<schedule file>.heartbeat`` (the unix time) on every pass of its loop: beat sleeps at
most ``--max-interval`` seconds between passes, so the file is never older than that
while beat works. A beat that hangs or died leaves it to age:

    celery -A worker beat -S worker.beat:HeartbeatScheduler --max-interval 60 -s FILE
    python -m worker.beat FILE --max-age 180      # exit 0 while beat is alive, else 1

docker-compose.yml runs beat and its health check this way. Importing this module
reads no setting.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

log = logging.getLogger(__name__)
SUFFIX = ".heartbeat"


def heartbeat_path(schedule_file: str | Path) -> Path:
    """The heartbeat file of a beat schedule file."""
    return Path(f"{schedule_file}{SUFFIX}")


class HeartbeatScheduler(PersistentScheduler):
    """PersistentScheduler that writes a heartbeat file on each pass of its loop."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One pass of the scheduler, then the heartbeat."""
        interval = float(super().tick(*args, **kwargs))
        self.beat()
        return interval

    def beat(self) -> None:
        """Write the time to the heartbeat file (atomically, by a rename)."""
        target = heartbeat_path(str(getattr(self, "schedule_filename", "")))
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            temporary.write_text(f"{time.time():.0f}\n")
            os.replace(temporary, target)
        except OSError as exc:  # a full or read-only disk must not stop the schedule
            log.warning("beat: cannot write the heartbeat %s: %s", target, exc)


def heartbeat_age(schedule_file: str | Path) -> float | None:
    """Seconds since beat's last pass, or None when it never wrote a heartbeat."""
    try:
        return max(0.0, time.time() - heartbeat_path(schedule_file).stat().st_mtime)
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    """The health check: 0 while the heartbeat is fresh, 1 otherwise (and why)."""
    parser = argparse.ArgumentParser(description="Is celery beat alive?")
    parser.add_argument("schedule", help="beat's schedule file (-s)")
    parser.add_argument("--max-age", type=float, default=180.0, help="seconds (default 180)")
    args = parser.parse_args(argv)
    age = heartbeat_age(args.schedule)
    if age is None:
        sys.stderr.write(f"beat: no heartbeat at {heartbeat_path(args.schedule)}\n")
        return 1
    if age > args.max_age:
        sys.stderr.write(f"beat: last heartbeat {age:.0f}s ago (> {args.max_age:.0f}s)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
