"""``genderscore status``: runs, queues, workers and training tasks in one view."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import redis

from worker.broker import queue_lengths
from worker.celery import app
from worker.keys import runs_index, training_index, training_progress
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


def render_status(client: redis.Redis, run_id: str | None = None, limit: int = 10) -> str:
    """The whole status view as text."""
    run_ids = [run_id] if run_id else [str(r) for r in client.zrevrange(runs_index(), 0, limit - 1)]
    header = ["run", "total", "done", "errors", "pending", "model", "started", "finished"]
    rows = [run_row(run_counts(client, r)) for r in run_ids]
    parts = [table(header, rows) if rows else "no runs"]
    queues = queue_lengths()
    parts.append("queues: " + ", ".join(f"{k} {v}" for k, v in queues.items()))
    workers = live_workers()
    parts.append(f"workers ({len(workers)}): " + (", ".join(workers) or "none answering"))
    trains = [str(t) for t in client.zrevrange(training_index(), 0, 4)]
    if trains:
        train_rows = []
        for task_id in trains:
            info = read_hash(client, training_progress(task_id))
            train_rows.append(
                [
                    task_id[:12],
                    info.get("state", "-"),
                    f"{info.get('epoch', '-')}/{info.get('epochs', '-')}",
                    info.get("val_accuracy", "-")[:6],
                    info.get("val_loss", "-")[:6],
                    _when(info.get("updated_at")),
                ]
            )
        parts.append(
            table(["training", "state", "epoch", "val_acc", "val_loss", "updated"], train_rows)
        )
    parts.append(f"at {datetime.fromtimestamp(time.time(), UTC):%Y-%m-%d %H:%M:%S} UTC")
    return "\n\n".join(parts)
