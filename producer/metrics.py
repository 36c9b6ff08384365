"""``genderscore metrics``: a Prometheus exporter for what Flower's ``/metrics`` lacks.

Flower exports workers and task events; it knows nothing of runs. This exporter reads
Redis on every scrape (no state of its own, so any number may run) and serves:

    genderscore_run_total{run,model}         userids in the run
    genderscore_run_done{run,model}          userids with a prediction
    genderscore_run_errors{run,model}        userids with an error
    genderscore_run_pending{run,model}       userids with neither yet
    genderscore_run_finished{run,model}      1 once every userid is settled
    genderscore_run_started_timestamp_seconds{run,model}
    genderscore_run_errors_by_kind{run,model,kind}  error records by kind (model_error,
                                             corrupt, missing, ...; any other "other")
    genderscore_queue_length{queue}          messages waiting (score, training)
    genderscore_queue_unacked{queue}         delivered, not yet acknowledged (Redis broker)
    genderscore_queue_consumers{queue}       workers consuming the queue (RabbitMQ broker)
    genderscore_nightly_running              1 while a nightly run holds its lock
    genderscore_nightly_last_success_timestamp_seconds   when the last nightly run wrote
                                             its CSV (absent until one did)
    genderscore_nightly_last_failure_timestamp_seconds   when the last nightly run failed
    genderscore_nightly_last_failure_info{reason}        1, with that failure's reason
    genderscore_redis_up                     0 when Redis did not answer the scrape

Only the newest ``--runs`` runs are exported, to bound the number of series; error
kinds are bounded too (a kind that is not a short lowercase word counts as "other").
Alert on ``time() - genderscore_nightly_last_success_timestamp_seconds > 26 * 3600``:
it fires whatever stopped the nightly run, beat included.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator

import click
import redis
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
_RUN_GAUGES = {
    "total": "Userids in the run.",
    "done": "Userids of the run with a prediction.",
    "errors": "Userids of the run with an error.",
    "pending": "Userids of the run with neither a prediction nor an error yet.",
    "finished": "1 once every userid of the sealed run is settled.",
    "started_timestamp_seconds": "When the run started (unix time).",
}


_KIND = re.compile(r"[a-z][a-z0-9_]{0,39}")
REASON_CHARS = 200  # a failure reason is a label value: kept short


def error_kinds(reasons: list[str]) -> Counter[str]:
    """Error records by kind (``kind: message``), unknown shapes as ``other``."""
    kinds: Counter[str] = Counter()
    for reason in reasons:
        kind = reason.split(":", 1)[0].strip()
        kinds[kind if _KIND.fullmatch(kind) else "other"] += 1
    return kinds


class RunsCollector(Collector):
    """Reads runs and queues from Redis at each scrape."""

    def __init__(self, client: redis.Redis, runs: int = 20) -> None:
        self.client = client
        self.runs = runs

    def collect(self) -> Iterator[Metric]:
        """The gauges of the newest runs, the queues and the nightly lock."""
        up = GaugeMetricFamily("genderscore_redis_up", "1 when Redis answered this scrape.")
        try:
            families = self._families()
        except redis.RedisError as exc:
            log.warning("metrics: Redis did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[Metric]:
        from worker.broker import queue_lengths
        from worker.celery import SCORE_QUEUE, TRAINING_QUEUE
        from worker.keys import nightly_lock, run_keys, runs_index
        from worker.results import run_counts

        runs = {
            name: GaugeMetricFamily(f"genderscore_run_{name}", doc, labels=["run", "model"])
            for name, doc in _RUN_GAUGES.items()
        }
        by_kind = GaugeMetricFamily(
            "genderscore_run_errors_by_kind",
            "Error records of the run by kind.",
            labels=["run", "model", "kind"],
        )
        for run_id in map(str, self.client.zrevrange(runs_index(), 0, self.runs - 1)):
            counts = run_counts(self.client, run_id)
            if not counts.meta:  # expired since it was listed
                continue
            labels = [run_id, counts.meta.get("model_sha", "")[:12]]
            values = {
                "total": max(counts.total, counts.enqueued),
                "done": counts.done,
                "errors": counts.errors,
                "pending": counts.pending,
                "finished": int(counts.finished),
                "started_timestamp_seconds": float(counts.meta.get("started_at") or 0),
            }
            for name, value in values.items():
                runs[name].add_metric(labels, value)
            if counts.errors:
                reasons = [str(r) for r in self.client.hvals(run_keys(run_id).err)]
                for kind, number in sorted(error_kinds(reasons).items()):
                    by_kind.add_metric([*labels, kind], number)
        lengths = queue_lengths()
        waiting = GaugeMetricFamily(
            "genderscore_queue_length", "Messages waiting in the queue.", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "genderscore_queue_unacked",
            "Messages delivered to a worker and not yet acknowledged (Redis broker).",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "genderscore_queue_consumers",
            "Workers consuming the queue (RabbitMQ broker).",
            labels=["queue"],
        )
        for queue in (SCORE_QUEUE, TRAINING_QUEUE):
            waiting.add_metric([queue], lengths[queue])
            # Each broker tells what it knows: Redis its unacked index, RabbitMQ its
            # consumers (its unacknowledged count needs the management API).
            if f"unacked ({queue})" in lengths:
                unacked.add_metric([queue], lengths[f"unacked ({queue})"])
            if f"consumers ({queue})" in lengths:
                consumers.add_metric([queue], lengths[f"consumers ({queue})"])
        nightly = GaugeMetricFamily(
            "genderscore_nightly_running", "1 while a nightly run holds its lock."
        )
        nightly.add_metric([], int(bool(self.client.exists(nightly_lock()))))
        outcomes = self._nightly_outcomes()
        return [*runs.values(), by_kind, waiting, unacked, consumers, nightly, *outcomes]

    def _nightly_outcomes(self) -> list[Metric]:
        """The last nightly success and failure, from what the nightly run records."""
        from worker.keys import nightly_last_failure, nightly_last_success

        families: list[Metric] = []
        success = _seconds(self.client.get(nightly_last_success()))
        if success is not None:
            last = GaugeMetricFamily(
                "genderscore_nightly_last_success_timestamp_seconds",
                "When the last nightly run wrote its CSV (unix time).",
            )
            last.add_metric([], success)
            families.append(last)
        failure = {str(k): str(v) for k, v in self.client.hgetall(nightly_last_failure()).items()}
        failed_at = _seconds(failure.get("at"))
        if failed_at is not None:
            when = GaugeMetricFamily(
                "genderscore_nightly_last_failure_timestamp_seconds",
                "When the last nightly run failed (unix time).",
            )
            when.add_metric([], failed_at)
            info = GaugeMetricFamily(
                "genderscore_nightly_last_failure_info",
                "1, labelled with the reason the last nightly run failed.",
                labels=["reason"],
            )
            info.add_metric([failure.get("reason", "")[:REASON_CHARS]], 1)
            families += [when, info]
        return families


def _seconds(value: object) -> float | None:
    """A unix time stored as text, or None when absent or unreadable."""
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        log.warning("metrics: unreadable time %r in Redis", value)
        return None


def make_registry(client: redis.Redis, runs: int = 20) -> CollectorRegistry:
    """A registry holding only the genderscore collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunsCollector(client, runs))
    return registry


@click.command()
@click.option("--port", default=DEFAULT_PORT, show_default=True, help="Port to serve /metrics.")
@click.option(
    "--addr",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 in a container).",
)
@click.option(
    "--runs",
    default=20,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Newest runs to export.",
)
def metrics(port: int, addr: str, runs: int) -> None:
    """Serve Prometheus metrics of runs and queues at http://ADDR:PORT/metrics."""
    from producer.cli import _redis

    registry = make_registry(_redis(), runs)
    try:
        server, _thread = start_http_server(port, addr, registry=registry)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {addr}:{port}: {exc}") from None
    log.info("serving genderscore metrics on http://%s:%d/metrics", addr, port)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
