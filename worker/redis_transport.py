"""kombu's Redis transport, taking a batch's worth of messages per round trip.

kombu's Redis channel takes one message per ``BRPOP``, then records it as
unacknowledged with a second round trip (``ZADD`` to the unacked index, ``HSET`` of the
message): two round trips and a new client object per message, in the worker's one
main process. This channel keeps that first ``BRPOP`` (it is what waits for work), then,
while the queue holds more and prefetch allows, takes up to ``GENDERSCORE_BATCH_SIZE``
messages at once with one Lua script that pops them and records them as
unacknowledged in the same atomic step: kombu's own unacked index and hash, so
acknowledgement, requeue and restore work unchanged.

The script also narrows celery/celery#7950: a message it takes is never popped without
being recorded. Only the first, ``BRPOP``'d message is, as in kombu; the same script
records it, at the next turn of the event loop (kombu: its own MULTI/EXEC round trip at
once, 10 % of the worker's main process on a 2-core Xeon). Until then it is recorded
before anything else touches the unacked records (an ack, a reject, a restore), so
those work unchanged; a worker killed in between loses it as kombu's could, and the
workers' repairer puts it back (``worker.runs``). Selected by ``worker.celery`` for a
Redis broker.

Three more costs of kombu's channel are cut here, measured in the worker's main
process and its pool processes (``docs/performance.md``):

- kombu builds a new redis-py client for every command outside ``BRPOP`` (an ack, an
  event's ``PUBLISH``, the unacked record of a ``BRPOP``'d message): about 60 us each,
  most of it copying redis-py's table of reply callbacks. This channel keeps one client
  per connection pool (redis-py clients are thread-safe; pipelines are per call).
- When a take finds the queue empty, the channel says so (``on_drained``): the scoring
  task then sends its partial batch to the pool at once, instead of after its flush
  interval while the pool processes sit idle (the tail of every run).
- An acknowledgement schedules the next take (``Channel.refill``): the take fills the
  room it freed in one round trip. kombu's next poll would otherwise send a ``BRPOP``
  for one message first, and the take would follow its reply: 14 % of the worker's main
  process went to that reply and the poll's set-up (7 % less CPU side by side).
- In the worker's event loop, the take runs at the start of the next loop iteration,
  not inside the read of the ``BRPOP`` reply. The loop writes jobs to pool processes
  after it has handled every read of an iteration; a batch's acknowledgement frees
  prefetch room, so the next ``BRPOP`` reply and the freed process's next job come
  together, and taking and parsing a batch of messages first (about 3 ms) kept that
  process waiting for its job: 5 % of its time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.json import dumps

from worker.fastjson import loads
from worker.settings import settings

# KEYS: unacked hash, unacked index, queue ; ARGV: count, now, then tag, record pairs
# Records the given (BRPOP'd) messages, then pops up to `count` messages from the
# queue's tail (the same end as BRPOP) and records each as kombu does:
# unacked[tag] = [message, exchange, routing_key], index[tag] = now.
_TAKE = """
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i])
end
if tonumber(ARGV[1]) == 0 then return {} end
local popped = redis.call('RPOP', KEYS[3], tonumber(ARGV[1]))
if not popped then return {} end
for _, raw in ipairs(popped) do
  local props = cjson.decode(raw)['properties']
  local info = props['delivery_info'] or {}
  local tag = props['delivery_tag']
  -- The message as it was queued, not decoded and encoded again: the same bytes, and
  -- an encoding less (Lua's cjson would also write an empty or all-null list as {}).
  redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '')
    .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
end
return popped
"""


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, recording a ``BRPOP``'d message with the channel's next take.

    Before anything reads or changes the unacked records (``pipe_or_acquire``: an ack,
    a reject without requeue, a batch's acknowledgement; ``restore_by_tag``: a requeue,
    a restore at close), the records still waiting are written.
    """

    channel: Channel

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Remember the message as delivered; its record waits for the next take (without
        an event loop, it is written now)."""
        info = message.delivery_info
        record = dumps([message._raw, info["exchange"], info["routing_key"]])
        self.channel.unrecorded[delivery_tag] = record
        VirtualQoS.append(self, message, delivery_tag)
        if getattr(self.channel.connection, "hub", None) is None:
            self.channel.record_unrecorded()
        else:
            self.channel.schedule_take()

    def ack(self, delivery_tag: Any) -> None:
        """kombu's acknowledgement; then the freed room is filled by a take."""
        super().ack(delivery_tag)
        self.channel.refill()

    def ack_many(self, delivery_tags: Sequence[Any]) -> None:
        """Acknowledge several messages in one round trip; then fill the freed room.

        kombu acknowledges a message with its own MULTI/EXEC (ZREM from the unacked
        index, HDEL from the unacked hash); these are one ZREM and one HDEL of every tag
        in one MULTI/EXEC (kombu's two commands per message cost the main process more
        to encode than Redis to run), then each delivery is forgotten as kombu's
        ``ack`` forgets it.
        """
        if not delivery_tags:
            return
        with self.pipe_or_acquire() as pipe:  # keys prefixed by kombu's client
            pipe.zrem(self.unacked_index_key, *delivery_tags)
            pipe.hdel(self.unacked_key, *delivery_tags).execute()
        for tag in delivery_tags:
            VirtualQoS.ack(self, tag)
        self.channel.refill()

    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        """kombu's, after the waiting records are written."""
        self.channel.record_unrecorded()
        with super().pipe_or_acquire(pipe, client) as acquired:
            yield acquired

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu's, after the waiting records are written (it restores what is recorded)."""
        self.channel.record_unrecorded()
        super().restore_by_tag(tag, client=client, leftmost=leftmost)


class Channel(kombu_redis.Channel):
    """A Redis channel that delivers up to a batch of messages per round trip."""

    QoS = QoS
    take_max = 0  # set from the settings by Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync_client: Any = None  # conn_or_acquire's client, of the current pool
        # Delivered messages not yet recorded as unacknowledged: tag -> kombu's record.
        self.unrecorded: dict[str, str] = {}
        super().__init__(*args, **kwargs)
        self._consumers_of: dict[str, Any] = {}  # queue -> the consumer's own callback
        self._take_script: Any = None
        self._take_pending = False  # a take is scheduled on the event loop
        # Called (in the event loop) when a take left the queue empty.
        self.on_drained: list[Callable[[], None]] = []

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """``client``, else this channel's one synchronous client (kombu: a new one per
        call). Made again when kombu replaces the pool (after a fork or a failed ping)."""
        if client:
            yield client
            return
        if self._sync_client is None or self._sync_client.connection_pool is not self.pool:
            self._sync_client = self._create_client()  # type: ignore[attr-defined]
        yield self._sync_client

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str | None, **kwargs: Any
    ) -> Any:
        """Consume as kombu does; remember the callback to deliver taken messages to."""
        if not no_ack:
            self._consumers_of[queue] = callback
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        """Stop consuming; taken messages are no longer delivered to that queue."""
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._consumers_of.pop(queue, None)
        return super().basic_cancel(consumer_tag)

    def _brpop_read(self, **options: Any) -> Any:
        delivered = super()._brpop_read(**options)  # type: ignore[misc]
        if delivered:
            self.schedule_take()
        return delivered

    def schedule_take(self) -> None:
        """Take more (and record what waits) at the next turn of the event loop; at once
        without one (``drain_events``)."""
        hub = getattr(self.connection, "hub", None)
        if hub is None:
            self._take_more()
        elif not self._take_pending:
            self._take_pending = True
            hub.call_soon(self._take_scheduled)

    def refill(self) -> None:
        """After an acknowledgement, in the event loop: take at its next turn.

        The take fills the freed prefetch room itself, in one round trip; otherwise
        kombu's next poll would send a ``BRPOP`` for one message first, and the take
        would follow its reply (two round trips, two turns of the loop). When the queue
        is empty the take finds less than it asked for, and kombu's ``BRPOP`` then waits
        for work as before.
        """
        if getattr(self.connection, "hub", None) is not None:
            self.schedule_take()

    def _take_scheduled(self) -> None:
        self._take_pending = False
        if not self.closed:
            self._take_more()

    def record_unrecorded(self) -> None:
        """Write the records of delivered messages that wait for a take, now."""
        if self.unrecorded:
            self._take(None, 0)

    def _take_more(self) -> None:
        """Take what the queues hold, up to prefetch and a batch, in one round trip each
        (the first also writes the records that wait); call ``on_drained`` when a queue
        had less than was asked for."""
        drained = False
        for queue, callback in list(self._consumers_of.items()):
            room = self.qos.can_consume_max_estimate()
            count = min(self.take_max, room if room is not None else self.take_max)
            if count <= 0:
                break  # prefetch is full: the queue may hold more
            taken = self._take(queue, count)
            for raw in taken:
                payload = loads(raw)
                message = self.Message(payload, channel=self)
                VirtualQoS.append(self.qos, message, str(message.delivery_tag))
                callback(message)
            drained |= len(taken) < count
        self.record_unrecorded()
        if drained:
            for hook in list(self.on_drained):
                hook()

    def _take(self, queue: str | None, count: int) -> list[Any]:
        """Record the waiting records, then pop and record up to ``count`` of ``queue``."""
        prefix = self.global_keyprefix or ""
        pool = self.pool
        script = self._take_script
        if script is None or script.registered_client.connection_pool is not pool:
            # A plain client (keys prefixed here, not by kombu's client), made once per pool.
            self._take_script = redis.Redis(connection_pool=pool).register_script(_TAKE)
        keys = [prefix + self.unacked_key, prefix + self.unacked_index_key]
        if queue is not None:
            keys.append(prefix + self._q_for_pri(queue, 0))  # type: ignore[attr-defined]
        waiting = self.unrecorded
        # Whole seconds: the index stays a listpack (at most prefetch entries), where an
        # integer score is compared as it is and a float's text is parsed at every ZADD
        # for each entry (3 against 10 us per message in Redis). Restoring by visibility
        # timeout needs no finer time.
        args: list[Any] = [count, int(time.time())]
        for tag, record in waiting.items():
            args += (tag, record)
        taken = list(self._take_script(keys=keys, args=args))
        for tag in args[2::2]:  # written: forget them (only once Redis has them)
            waiting.pop(tag, None)
        return taken


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Channel.take_max = max(1, settings.batch_size)
        self.hub: Any = None  # the worker's event loop, once registered with it

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Register as kombu does; keep the loop, to schedule takes on it."""
        super().register_with_event_loop(connection, loop)
        self.hub = loop
