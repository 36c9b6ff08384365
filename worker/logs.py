"""Logging for the CLI and the workers: text or one JSON object per line, no native noise.

``GENDERSCORE_LOG_FORMAT=json`` makes every record one JSON object on its own line,
with ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``process``,
``process_name`` and, inside a Celery task, ``task_name`` and (except for a batch of
messages, which has none) ``task_id``. The CLI calls ``configure``; a worker keeps
Celery's own handlers and gets this formatter through Celery's ``after_setup_logger``
and ``after_setup_task_logger`` signals (``worker.celery``), which also keep Celery's
banner, early warnings and shutdown notice from writing plain text.

TensorFlow writes C++ log lines straight to file descriptor 2, before Python's
logging exists: some while its shared libraries load (absl's "before
InitializeLog" lines, oneDNN, CUDA stubs), the rest later at ``TF_CPP_MIN_LOG_LEVEL``
(among them ``failed call to cuInit`` on every machine without a GPU).
``quiet_native_logs`` sets that level before anything imports TensorFlow, and
``import_tensorflow`` imports it with descriptor 2 sent to a temporary file, whose
text is logged at DEBUG (at ERROR if the import fails). A variable set by the
operator is kept: ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose INFO is noise for an operator.
NOISY = {
    "absl": logging.ERROR,
    "tensorflow": logging.WARNING,
    "h5py": logging.WARNING,
    "PIL": logging.WARNING,
    "matplotlib": logging.WARNING,
}

_json = False
_handler: logging.Handler | None = None  # the CLI's stderr handler, once configured


def json_logging() -> bool:
    """Whether this process logs JSON (set by ``configure`` or the worker's hooks)."""
    return _json


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as ``{"timestamp", "level", "logger", "message", ...}``."""
        data: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "process_name": record.processName,
        }
        data.update(_task_fields())
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str)


def _task_fields() -> dict[str, str]:
    """``task_id`` and ``task_name`` of the Celery task this process runs, if any."""
    celery_state = sys.modules.get("celery._state")
    if celery_state is None:
        return {}
    task = celery_state.get_current_task()
    if task is None:
        return {}
    fields = {"task_name": str(task.name)}
    task_id = getattr(task.request, "id", None)
    if task_id is not None:  # a batch of messages (celery-batches) has no id of its own
        fields["task_id"] = str(task_id)
    return fields


def json_warnings() -> None:
    """Python warnings as JSON lines on stderr until logging captures them.

    Celery warns (running as root, for one) before it sets up logging; once it has,
    ``logging.captureWarnings`` sends warnings through the JSON handlers instead.
    """

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = f"{filename}:{lineno}: {category.__name__}: {message}"
        record = logging.LogRecord(
            "py.warnings", logging.WARNING, filename, lineno, text, None, None
        )
        (file or sys.stderr).write(JsonFormatter().format(record) + "\n")

    warnings.showwarning = show


def use_json(handlers: list[logging.Handler]) -> None:
    """Give ``handlers`` the JSON formatter (the worker's Celery handlers)."""
    global _json
    _json = True
    for handler in handlers:
        handler.setFormatter(JsonFormatter())


def configure(fmt: str = "text", verbose: bool = False) -> None:
    """The CLI's logging: one stderr handler on the root logger, text or JSON."""
    global _json, _handler
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    if _handler is not None:  # configured before in this process (tests): replace ours
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if fmt == "json":
        use_json([handler])
    else:
        _json = False
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    for name, level in NOISY.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)


def quiet_native_logs() -> None:
    """Hide TensorFlow's C++ log lines below FATAL in this process and its children.

    Called before TensorFlow can load (the CLI's start, the worker's parent at import):
    pool processes inherit the environment when they fork.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file during the block, then log its text."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace").strip()
            if text:
                log.log(logging.ERROR if failed else logging.DEBUG, "%s said: %s", what, text)


def import_tensorflow() -> ModuleType:
    """``import tensorflow`` without the C++ lines it writes to stderr while loading."""
    quiet_native_logs()
    loaded = sys.modules.get("tensorflow")
    if loaded is not None:
        return loaded
    with native_stderr_to_log("tensorflow"):
        import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]
