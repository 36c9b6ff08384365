"""Exit codes of the command-line entry points, so that a scheduler can tell failures apart.

    0  done
    1  anything else (a bug, a training task that failed)
    2  usage or bad input: a bad option, an invalid setting, an empty source, an
       unknown run id, a label file with no usable row
    3  infrastructure unreachable: Redis, the broker, the object store (retry later), or
       Redis refusing the configured user (its ACL or password)
    4  the run is incomplete, or a wait timed out (wait longer, or reconcile)
    5  model problem: missing, unverified, tampered or unreadable model

``genderscore`` and ``celery -A worker`` (invalid settings: 2) share them; training's
commands too, which is why they live in ``worker``. Each failure is a
``click.ClickException`` with its code: click prints one line, ``Error: ...``.
"""

from __future__ import annotations

from enum import IntEnum

import click


class ExitCode(IntEnum):
    """What a non-zero exit status means (README, "Exit codes")."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    UNREACHABLE = 3
    INCOMPLETE = 4
    MODEL = 5


class Failure(click.ClickException):
    """A failure the user can act on: one line, and the exit code of its kind."""

    exit_code = ExitCode.FAILED  # a class variable of click's (8.5: ClassVar)

    def show(self, file: object = None) -> None:
        """One line: ``Error: ...`` on stderr, or a JSON log record with JSON logs."""
        from worker.logs import json_logging

        if json_logging():
            import logging

            logging.getLogger("genderscore").error("%s", self.format_message())
            return
        super().show(file)  # type: ignore[arg-type]


class BadInput(Failure):
    """Usage or input the command refuses (exit 2)."""

    exit_code = ExitCode.BAD_INPUT


class Unreachable(Failure):
    """Redis, the broker or the object store did not answer (exit 3)."""

    exit_code = ExitCode.UNREACHABLE


class Incomplete(Failure):
    """The run is not complete, or waiting for it timed out (exit 4)."""

    exit_code = ExitCode.INCOMPLETE


class ModelProblem(Failure):
    """The model cannot be used (exit 5)."""

    exit_code = ExitCode.MODEL
