"""``genderscore status``: runs, queues, workers and training tasks in one view.

The same facts as text for people (``render_status``) and as one JSON document for
scripts (``status_record``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import redis

from producer.runs import newest_runs, require_run, run_record
from worker.broker import queue_lengths
from worker.celery import SCORE_QUEUE, app
from worker.keys import training_index, training_progress
from worker.results import RunCounts, read_hash, run_counts


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")


def run_row(counts: RunCounts) -> list[str]:
    """One table row for a run."""
    meta = counts.meta
    return [
        counts.run_id,
        str(max(counts.total, counts.enqueued)),
        str(counts.done),
        str(counts.errors),
        str(counts.pending),
        meta.get("model_sha", "")[:12] or "-",
        _when(meta.get("started_at")),
        _when(meta.get("finished_at")),
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain text table with aligned columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def live_workers(timeout: float = 1.0) -> list[str]:
    """Workers answering a ping within ``timeout`` seconds."""
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:  # no broker: status still shows what Redis holds
        return []
    return sorted(name for reply in replies for name in reply)


def score_consumers(timeout: float = 1.0) -> list[str]:
    """Workers that consume the score queue (Celery's ``inspect active_queues``)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return sorted(
        name
        for name, queues in replies.items()
        if any(q.get("name") == SCORE_QUEUE for q in queues or [])
    )


def _runs(client: redis.Redis, run_id: str | None, limit: int) -> list[RunCounts]:
    if run_id is None:
        return newest_runs(client, limit)
    require_run(client, run_id)
    return [run_counts(client, run_id)]


def _trainings(client: redis.Redis) -> list[tuple[str, dict[str, str]]]:
    tasks = [str(t) for t in client.zrevrange(training_index(), 0, 4)]
    return [(task_id, read_hash(client, training_progress(task_id))) for task_id in tasks]


def status_record(
    client: redis.Redis, run_id: str | None = None, limit: int = 10
) -> dict[str, Any]:
    """The status view as one JSON-ready dict (``genderscore status --json``)."""
    return {
        "runs": [run_record(counts) for counts in _runs(client, run_id, limit)],
        "queues": queue_lengths(),
        "workers": live_workers(),
        "training": [{"task_id": task_id, **info} for task_id, info in _trainings(client)],
        "at": time.time(),
    }


def render_status(client: redis.Redis, run_id: str | None = None, limit: int = 10) -> str:
    """The whole status view as text (an unknown ``run_id`` raises UnknownRun)."""
    header = ["run", "total", "done", "errors", "pending", "model", "started", "finished"]
    rows = [run_row(counts) for counts in _runs(client, run_id, limit)]
    parts = [table(header, rows) if rows else "no runs"]
    queues = queue_lengths()
    parts.append("queues: " + ", ".join(f"{k} {v}" for k, v in queues.items()))
    workers = live_workers()
    parts.append(f"workers ({len(workers)}): " + (", ".join(workers) or "none answering"))
    trains = _trainings(client)
    if trains:
        train_rows = [
            [
                task_id[:12],
                info.get("state", "-"),
                f"{info.get('epoch', '-')}/{info.get('epochs', '-')}",
                info.get("val_accuracy", "-")[:6],
                info.get("val_loss", "-")[:6],
                _when(info.get("updated_at")),
            ]
            for task_id, info in trains
        ]
        parts.append(
            table(["training", "state", "epoch", "val_acc", "val_loss", "updated"], train_rows)
        )
    parts.append(f"at {datetime.fromtimestamp(time.time(), UTC):%Y-%m-%d %H:%M:%S} UTC")
    return "\n\n".join(parts)
