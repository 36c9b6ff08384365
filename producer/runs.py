"""Runs as an operator sees them: listing, existence, cancelling and deleting.

A run is *cancelled* by a ``cancelled`` field in its metadata: workers acknowledge the
run's messages without scoring or recording them (``worker.results.start_batch``), and
it cannot be extended again. Cancelling also drops the run's messages still waiting in
the queue where the broker allows it (``worker.broker.drop_queued``; on RabbitMQ they
stay and the workers skip them). *Deleting* a run cancels it, then removes its keys
and its entry in the runs index: a message already in a worker's hands then finds no
run and is dropped too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.broker import drop_queued
from worker.keys import run_keys, runs_index
from worker.results import RunCounts, UnknownRun, run_counts


class NoSuchRun(UnknownRun, KeyError):
    """An unknown run id given by the operator; the message says where to look.

    A KeyError too, as ``load_run`` has always raised for an unknown run.
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"no run {run_id!r} in Redis (`genderscore runs list` shows the runs there are)"
        )

    def __str__(self) -> str:
        return str(self.args[0])  # not KeyError's repr of it


def run_exists(client: redis.Redis, run_id: str) -> bool:
    """Whether Redis holds anything of the run."""
    keys = run_keys(run_id)
    return bool(client.exists(keys.meta, keys.ids, keys.pred, keys.err))


def require_run(client: redis.Redis, run_id: str) -> None:
    """Raise NoSuchRun unless the run exists."""
    if not run_exists(client, run_id):
        raise NoSuchRun(run_id)


def run_state(counts: RunCounts) -> str:
    """``cancelled``, ``finished``, ``running`` or ``expired`` (listed, keys gone)."""
    meta = counts.meta
    if meta.get("cancelled"):
        return "cancelled"
    if counts.finished:
        return "finished"
    if not meta and not counts.enqueued:
        return "expired"
    return "running"


def _number(value: str | None) -> float | None:
    return float(value) if value else None


def run_record(counts: RunCounts) -> dict[str, Any]:
    """A run as a JSON-ready dict (``runs list --json``, ``status --json``)."""
    meta = counts.meta
    return {
        "run": counts.run_id,
        "state": run_state(counts),
        "total": max(counts.total, counts.enqueued),
        "done": counts.done,
        "errors": counts.errors,
        "pending": counts.pending,
        "model_sha": meta.get("model_sha") or None,
        "model": meta.get("model") or None,
        "source": meta.get("source") or None,
        "started_at": _number(meta.get("started_at")),
        "finished_at": _number(meta.get("finished_at")),
        "cancelled_at": _number(meta.get("cancelled_at")),
    }


def newest_runs(client: redis.Redis, limit: int) -> list[RunCounts]:
    """The ``limit`` newest runs of the runs index, with their counts."""
    ids = [str(r) for r in client.zrevrange(runs_index(), 0, limit - 1)]
    return [run_counts(client, run_id) for run_id in ids]


@dataclass(frozen=True)
class Cancelled:
    """What ``cancel_run`` did; ``dropped`` is None when the broker keeps its messages."""

    run_id: str
    dropped: int | None


def cancel_run(client: redis.Redis, run_id: str) -> Cancelled:
    """Mark the run cancelled (workers skip its messages), then drop its queued ones."""
    require_run(client, run_id)
    client.hset(
        run_keys(run_id).meta, mapping={"cancelled": "1", "cancelled_at": f"{time.time():.3f}"}
    )
    return Cancelled(run_id, drop_queued(run_id))


def delete_run(client: redis.Redis, run_id: str) -> Cancelled:
    """Cancel the run, then delete its keys and its entry in the runs index."""
    cancelled = cancel_run(client, run_id)
    pipe = client.pipeline(transaction=True)
    pipe.delete(*run_keys(run_id).all())
    pipe.zrem(runs_index(), run_id)
    pipe.execute()
    return cancelled
