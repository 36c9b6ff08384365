"""The worker's and the producer's machinery around each picture (issue 12), on a real
Redis and a real worker: what the cuts in CPU per picture must not change, and the
two waits they remove.

- A partial batch is scored as soon as the queue is empty, not after the flush interval.
- ``score --wait`` returns as soon as the run finishes, not at its next poll.
- The Redis channel takes a batch per round trip, records it as unacknowledged, and
  keeps one client per connection pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub

from tests.helpers import ROOT, celery_worker, make_pictures, worker_env
from worker.results import record_outcomes, seal_run
from worker.scoring import Scored


def _own_prefix(tag: str) -> str:
    return f"gsmach{tag}{os.getpid()}"


def _delete(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


def test_a_partial_batch_is_scored_when_the_queue_drains(
    tiny_model: Path, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Five pictures, batches of 16, a flush interval of 120 s: the run finishes in
    seconds, because the worker sends the partial batch once the queue is empty."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    make_pictures(folder, 5, size=(40, 40))
    prefix = _own_prefix("d")
    env = {"GENDERSCORE_KEY_PREFIX": prefix, "GENDERSCORE_FLUSH_INTERVAL": "120"}
    out = tmp_path / "scored.csv"
    try:
        with celery_worker("score", 2, extra_env=env, log_path=tmp_path / "w.log", name="drain"):
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "producer.cli", "score", str(folder), "--wait"]
                + ["--out", str(out), "--timeout", "100"],
                cwd=ROOT,
                env=worker_env(env),
                capture_output=True,
                text=True,
                timeout=150,
            )
            elapsed = time.monotonic() - started
    finally:
        _delete(redis_client, prefix)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 6  # header + 5 rows
    assert elapsed < 60, f"the partial batch waited for the flush interval ({elapsed:.1f}s)"


def test_wait_returns_when_the_run_finishes_not_at_its_next_poll(
    redis_client: redis.Redis,
) -> None:
    """Polling every 60 s, the wait still ends within a moment of the last outcome."""
    from producer.enqueue import new_run_id
    from producer.follow import wait_for_run
    from worker.keys import run_keys

    run_id = new_run_id()
    keys = run_keys(run_id)
    redis_client.hset(keys.meta, mapping={"model": "m.h5", "model_sha": "0" * 64})
    redis_client.hset(keys.ids, mapping={"u1": "u1.jpg", "u2": "u2.jpg"})
    seal_run(redis_client, run_id, 2)
    record_outcomes(redis_client, run_id, "0" * 64, [Scored("u1", 0.2, "male")])
    returned: list[float] = []

    def follow() -> None:
        wait_for_run(redis_client, run_id, timeout=100, interval=60)
        returned.append(time.monotonic())

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(1.0)  # the wait has looked once and sleeps now
    assert not returned
    finished = time.monotonic()
    record_outcomes(redis_client, run_id, "0" * 64, [Scored("u2", 0.9, "female")])
    thread.join(timeout=30)
    try:
        assert returned, "the wait did not end"
        assert returned[0] - finished < 5
        assert redis_client.hexists(keys.meta, "finished_at")
    finally:
        for key in keys.all():
            redis_client.delete(key)


def test_the_wait_asks_for_workers_only_while_the_run_makes_no_progress(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not asked while outcomes keep coming from the start, asked after a pause; a run
    that finishes while it progresses is seen at once, not after a question's reply
    timeout."""
    import producer.follow
    from producer.enqueue import new_run_id
    from worker.keys import run_keys

    monkeypatch.setattr(producer.follow, "FIRST_ASK_AFTER", 1.0)
    monkeypatch.setattr(producer.follow, "CONSUMERS_EVERY", 1.0)
    run_id = new_run_id()
    keys = run_keys(run_id)
    userids = [f"u{n}" for n in range(12)]
    redis_client.hset(keys.meta, mapping={"model": "m.h5", "model_sha": "0" * 64})
    redis_client.hset(keys.ids, mapping={u: f"{u}.jpg" for u in userids})
    seal_run(redis_client, run_id, len(userids))
    asked: list[float] = []

    def consumers() -> list[str]:
        asked.append(time.monotonic())
        time.sleep(1.0)  # Celery's inspect waits its whole reply timeout
        return ["w@host"]

    returned: list[float] = []

    def follow() -> None:
        producer.follow.wait_for_run(
            redis_client, run_id, timeout=100, interval=0.2, consumers=consumers
        )
        returned.append(time.monotonic())

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        for userid in userids[:10]:  # progress from the start, for 3 s: no question
            record_outcomes(redis_client, run_id, "0" * 64, [Scored(userid, 0.2, "male")])
            time.sleep(0.3)
        progressing = list(asked)
        time.sleep(2.5)  # no progress for 2.5 s: asked, once the question is over
        paused = list(asked)
        record_outcomes(redis_client, run_id, "0" * 64, [Scored(userids[10], 0.9, "female")])
        time.sleep(0.3)
        finished = time.monotonic()  # the run progresses: no question delays its end
        record_outcomes(redis_client, run_id, "0" * 64, [Scored(userids[11], 0.9, "female")])
        thread.join(timeout=30)
        assert progressing == []
        assert paused
        assert returned and returned[0] - finished < 0.5
    finally:
        for key in keys.all():
            redis_client.delete(key)


@pytest.fixture
def broker(redis_client: redis.Redis) -> tuple[Connection, str]:
    """A kombu connection through the project's Redis transport, under its own prefix."""
    from worker.settings import settings

    prefix = _own_prefix("t")
    url = settings.effective_broker_url
    options = {"global_keyprefix": f"{prefix}:"}
    conn = Connection(url, transport="worker.redis_transport:Transport", transport_options=options)
    yield conn, prefix
    conn.release()
    _delete(redis_client, prefix)


def _queue_with(conn: Connection, count: int) -> Queue:
    """The tests' queue, with ``count`` messages ``{"n": 0}``, ``{"n": 1}``... published."""
    queue = Queue("machinery", Exchange("machinery", type="direct"), routing_key="machinery")
    with conn.Producer() as producer:
        for n in range(count):
            producer.publish(
                {"n": n}, exchange=queue.exchange, routing_key="machinery", declare=[queue]
            )
    return queue


def test_the_channel_takes_a_batch_per_round_trip_and_keeps_one_client(
    broker: tuple[Connection, str], redis_client: redis.Redis
) -> None:
    conn, prefix = broker
    queue = _queue_with(conn, 20)
    got: list[object] = []
    channel = conn.default_channel
    drained: list[int] = []
    channel.on_drained.append(lambda: drained.append(len(got)))
    channel.basic_qos(0, 100, False)
    with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
        conn.drain_events(timeout=5)
        # One BRPOP, then the rest up to a batch (GENDERSCORE_BATCH_SIZE, 16) in one take.
        assert len(got) == 17
        assert not drained  # the queue still held 3
        unacked = redis_client.hkeys(f"{prefix}:unacked")
        assert sorted(unacked) == sorted(m.delivery_tag for m in got)  # type: ignore[attr-defined]
        conn.drain_events(timeout=5)
        assert len(got) == 20
        assert drained == [20]  # the take found less than it asked for
        for message in got:
            message.ack()  # type: ignore[attr-defined]
    assert redis_client.hlen(f"{prefix}:unacked") == 0
    assert redis_client.zcard(f"{prefix}:unacked_index") == 0
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
    channel._disconnect_pools()  # what kombu does after a fork
    with channel.conn_or_acquire() as third:
        assert third is not first and third.connection_pool is channel.pool


def _loop_until(hub: Hub, done: Callable[[], bool], turns: int = 100) -> None:
    for _ in range(turns):
        if done():
            return
        hub.run_once()
    raise AssertionError("the event loop did not get there")


def test_in_the_event_loop_a_brpopd_message_is_recorded_with_the_next_take(
    broker: tuple[Connection, str], redis_client: redis.Redis
) -> None:
    """The BRPOP'd message's unacked record waits for the next take; a requeue or an ack
    that comes first (here from the consumer's callback, as Celery does for a message it
    refuses) writes it first: the requeued message comes back, the acked one leaves no
    record behind."""
    conn, prefix = broker
    queue = _queue_with(conn, 17)  # one BRPOP and one take of a batch (16)
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)
    channel = conn.default_channel
    channel.basic_qos(0, 100, False)
    got: list[Any] = []
    waited: list[bool] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(message)
        if body["n"] != 0:
            return
        waited.append(not redis_client.hexists(f"{prefix}:unacked", message.delivery_tag))
        if len(waited) == 1:
            message.reject(requeue=True)  # back to the queue: delivered again
        else:
            message.ack()

    try:
        with conn.Consumer(queue, callbacks=[on_message]):
            # The first n=0 is requeued from its callback, then the take brings 1..16,
            # and a BRPOP brings n=0 back.
            _loop_until(hub, lambda: len(got) == 18 and not channel.unrecorded)
            assert sorted(m.payload["n"] for m in got) == [0, *range(17)]
            assert waited == [True, True]  # both times BRPOP'd, its record waiting
            others = [m for m in got if m.payload["n"] != 0]
            unacked = redis_client.hkeys(f"{prefix}:unacked")
            assert sorted(unacked) == sorted(m.delivery_tag for m in others)
            assert redis_client.zcard(f"{prefix}:unacked_index") == 16
            for message in others:
                message.ack()
    finally:
        hub.close()
    assert redis_client.hlen(f"{prefix}:unacked") == 0
    assert redis_client.zcard(f"{prefix}:unacked_index") == 0


def test_an_acknowledgement_refills_the_worker_with_a_take_not_a_brpop(
    broker: tuple[Connection, str], redis_client: redis.Redis
) -> None:
    """With prefetch full, acknowledging a batch (``QoS.ack_many``) or one message
    (kombu's ``ack``) frees room that the next turn's take fills, in one round trip:
    kombu sends no ``BRPOP`` for one message first."""
    conn, prefix = broker
    queue = _queue_with(conn, 40)
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)
    channel = conn.default_channel
    channel.basic_qos(0, 16, False)  # prefetch: one batch
    got: list[Any] = []
    brpops: list[float] = []
    brpop_start = channel._brpop_start

    def counted(*args: Any, **kwargs: Any) -> Any:
        brpops.append(time.monotonic())
        return brpop_start(*args, **kwargs)

    channel._brpop_start = counted
    try:
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
            _loop_until(hub, lambda: len(got) == 16)  # one BRPOP, then a take of 15
            assert len(brpops) == 1
            for _ in range(5):
                hub.run_once()
            assert len(got) == 16  # prefetch is full: nothing more, no BRPOP
            channel.qos.ack_many([m.delivery_tag for m in got])
            _loop_until(hub, lambda: len(got) == 32)
            got[16].ack()
            _loop_until(hub, lambda: len(got) == 33)
            assert len(brpops) == 1, "the freed room was filled by a BRPOP, not the take"
            acked = {m.delivery_tag for m in got[:17]}
            assert not acked & set(redis_client.hkeys(f"{prefix}:unacked"))
            assert redis_client.zcard(f"{prefix}:unacked_index") == 16
            for message in got[17:]:
                message.ack()
    finally:
        hub.close()
    assert redis_client.llen(f"{prefix}:machinery") == 40 - 33
