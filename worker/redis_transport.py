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
being recorded (only the first, ``BRPOP``'d one is, as in kombu). Selected by
``worker.celery`` for a Redis broker.

Three more costs of kombu's channel are cut here, measured in the worker's main
process and its pool processes (``docs/performance.md``):

- kombu builds a new redis-py client for every command outside ``BRPOP`` (an ack, an
  event's ``PUBLISH``, the unacked record of a ``BRPOP``'d message): about 60 us each,
  most of it copying redis-py's table of reply callbacks. This channel keeps one client
  per connection pool (redis-py clients are thread-safe; pipelines are per call).
- When a take finds the queue empty, the channel says so (``on_drained``): the scoring
  task then sends its partial batch to the pool at once, instead of after its flush
  interval while the pool processes sit idle (the tail of every run).
- In the worker's event loop, the take runs at the start of the next loop iteration,
  not inside the read of the ``BRPOP`` reply. The loop writes jobs to pool processes
  after it has handled every read of an iteration; a batch's acknowledgement frees
  prefetch room, so the next ``BRPOP`` reply and the freed process's next job come
  together, and taking and parsing a batch of messages first (about 3 ms) kept that
  process waiting for its job: 5 % of its time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.json import loads

from worker.settings import settings

# KEYS: queue, unacked hash, unacked index ; ARGV: count, now
# Pops up to `count` messages from the queue's tail (the same end as BRPOP) and records
# each as kombu does: unacked[tag] = [message, exchange, routing_key], index[tag] = now.
_TAKE = """
local popped = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not popped then return {} end
for _, raw in ipairs(popped) do
  local message = cjson.decode(raw)
  local props = message['properties']
  local info = props['delivery_info'] or {}
  local tag = props['delivery_tag']
  redis.call('HSET', KEYS[2], tag,
    cjson.encode({message, info['exchange'] or '', info['routing_key'] or ''}))
  redis.call('ZADD', KEYS[3], ARGV[2], tag)
end
return popped
"""


class Channel(kombu_redis.Channel):
    """A Redis channel that delivers up to a batch of messages per round trip."""

    take_max = 0  # set from the settings by Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync_client: Any = None  # conn_or_acquire's client, of the current pool
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
            hub = getattr(self.connection, "hub", None)
            if hub is None:  # no event loop (drain_events): take now
                self._take_more()
            elif not self._take_pending:
                self._take_pending = True
                hub.call_soon(self._take_scheduled)
        return delivered

    def _take_scheduled(self) -> None:
        self._take_pending = False
        if not self.closed:
            self._take_more()

    def _take_more(self) -> None:
        """Take what the queues hold, up to prefetch and a batch, in one round trip each;
        call ``on_drained`` when a queue had less than was asked for."""
        drained = False
        for queue, callback in list(self._consumers_of.items()):
            room = self.qos.can_consume_max_estimate()
            count = min(self.take_max, room if room is not None else self.take_max)
            if count <= 0:
                return  # prefetch is full: the queue may hold more
            taken = self._take(queue, count)
            for raw in taken:
                payload = loads(raw)
                message = self.Message(payload, channel=self)
                VirtualQoS.append(self.qos, message, str(message.delivery_tag))
                callback(message)
            drained |= len(taken) < count
        if drained:
            for hook in list(self.on_drained):
                hook()

    def _take(self, queue: str, count: int) -> list[Any]:
        prefix = self.global_keyprefix or ""
        pool = self.pool
        script = self._take_script
        if script is None or script.registered_client.connection_pool is not pool:
            # A plain client (keys prefixed here, not by kombu's client), made once per pool.
            self._take_script = redis.Redis(connection_pool=pool).register_script(_TAKE)
        keys = [
            prefix + self._q_for_pri(queue, 0),  # type: ignore[attr-defined]
            prefix + self.unacked_key,
            prefix + self.unacked_index_key,
        ]
        # Whole seconds: the index stays a listpack (at most prefetch entries), where an
        # integer score is compared as it is and a float's text is parsed at every ZADD
        # for each entry (3 against 10 us per message in Redis). Restoring by visibility
        # timeout needs no finer time.
        return list(self._take_script(keys=keys, args=[count, int(time.time())]))


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
