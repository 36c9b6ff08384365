"""The one place that knows which broker carries the scoring messages.

Publishing a run, reading queue depths, finding a run's messages in flight and dropping
a cancelled run's queued messages differ by broker; everything else (producer,
reconcile, the repair, status, metrics, runs) calls these functions. With Redis as
broker (``redis://``, ``rediss://``), messages are prebuilt Celery protocol-2
envelopes pushed a thousand per ``LPUSH``; queues and kombu's unacknowledged index
live under the key prefix on the broker's Redis. With RabbitMQ (``amqp://``), the same
messages go to durable quorum queues with publisher confirms; RabbitMQ returns a
consumer's unacknowledged messages when its connection closes, so none is lost in
transit and no repair is needed.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import redis
from celery import Celery

from worker.celery import SCORE_QUEUE, TRAINING_QUEUE, app, is_redis_url
from worker.keys import prefix
from worker.results import connect
from worker.settings import settings

SCORE_TASK = "genderscore.score"
CHUNK = 1000
CONFIRM_TIMEOUT = 30.0  # seconds to wait for the broker's confirms of a chunk


# Drops the messages of one run from a kombu Redis queue (a list), in one atomic step.
# A message is the run's when it is a score task whose JSON body, [[run_id, ...], ...],
# starts with the bytes ARGV[2]: only the first few base64 characters are decoded.
# KEYS: queue ; ARGV: task name, body prefix, base64 characters to decode
_DROP_QUEUED = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local value = {}
for i = 1, 64 do value[string.byte(alphabet, i)] = i - 1 end
local function head(text, chars)
  local out = {}
  for i = 1, math.min(chars, #text) - 3, 4 do
    local a, b = value[text:byte(i)], value[text:byte(i + 1)]
    local c, d = value[text:byte(i + 2)], value[text:byte(i + 3)]
    if a == nil or b == nil then break end
    local n = a * 262144 + b * 4096 + (c or 0) * 64 + (d or 0)
    out[#out + 1] = string.char(math.floor(n / 65536) % 256)
    if c ~= nil then out[#out + 1] = string.char(math.floor(n / 256) % 256) end
    if d ~= nil then out[#out + 1] = string.char(n % 256) end
  end
  return table.concat(out)
end
local kept, dropped = {}, 0
for _, item in ipairs(items) do
  local ok, message = pcall(cjson.decode, item)
  local ours = false
  if ok and type(message) == 'table' and type(message.headers) == 'table'
      and message.headers.task == ARGV[1] and type(message.body) == 'string'
      and type(message.properties) == 'table'
      and message.properties.body_encoding == 'base64' then
    ours = string.sub(head(message.body, tonumber(ARGV[3])), 1, #ARGV[2]) == ARGV[2]
  end
  if ours then dropped = dropped + 1 else kept[#kept + 1] = item end
end
if dropped > 0 then
  redis.call('DEL', KEYS[1])
  for i = 1, #kept, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(kept, i, math.min(i + 999, #kept)))
  end
end
return dropped
"""


def broker_is_redis() -> bool:
    """Whether the scoring messages travel through Redis (else through AMQP)."""
    return is_redis_url(settings.effective_broker_url)


def broker_client() -> redis.Redis:
    """A client of the broker's Redis (the queues), which may not be the results' Redis."""
    return connect(settings.effective_broker_url)


@dataclass(frozen=True)
class ScoreTask:
    """The arguments of one ``genderscore.score`` message."""

    run_id: str
    userid: str
    picture: str
    model_path: str
    model_sha: str
    version: str = ""  # the store's version token of the picture, from the listing

    def args(self) -> list[str]:
        """The task's positional arguments, in ``worker.batching.ARG_NAMES`` order."""
        args = [self.run_id, self.userid, self.picture, self.model_path, self.model_sha]
        return [*args, self.version] if self.version else args


class TaskMessages:
    """Celery protocol-2 messages of the score task, built from one template.

    ``send_task`` costs ~1 ms per task (message building, a binding lookup and a sent
    event per call); this builds each message from one template that Celery itself made,
    changing only the ids and arguments, so a run is published at pipeline speed. A Redis
    queue entry is the template's JSON text with the four changing values put in its
    slots: 19 against 12 us per message, where encoding the whole envelope each time
    was the producer's largest cost per picture (docs/performance.md).
    """

    def __init__(self, app: Celery) -> None:
        template = app.amqp.as_task_v2("x", SCORE_TASK, args=(), kwargs={})
        self.headers: dict[str, Any] = dict(template.headers)
        self.headers["ignore_result"] = True
        self.embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        self._entry = self._entry_template()

    def _headers(self, task_id: str, argsrepr: str) -> dict[str, Any]:
        return dict(self.headers, id=task_id, root_id=task_id, argsrepr=argsrepr, kwargsrepr="{}")

    def _body(self, task: ScoreTask) -> bytes:
        return json.dumps([task.args(), {}, self.embed]).encode()

    def parts(self, task: ScoreTask) -> tuple[str, dict[str, Any], bytes]:
        """The task id, headers and JSON body of one task's message."""
        task_id = str(uuid4())
        return task_id, self._headers(task_id, _argsrepr(task)), self._body(task)

    def _entry_template(self) -> list[str]:
        """The Redis entry's JSON text split at its slots: text, slot name, text, ..."""
        slot = {name: f"\0{name}\0" for name in ("body", "id", "argsrepr", "tag")}
        entry = {
            "body": slot["body"],
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": self._headers(slot["id"], slot["argsrepr"]),
            "properties": {
                "correlation_id": slot["id"],
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": SCORE_QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": slot["tag"],
            },
        }
        # json.dumps writes each slot as "\u0000name\u0000", which no other text holds.
        return re.split(r'"\\u0000(\w+)\\u0000"', json.dumps(entry))

    def redis_entry(self, task: ScoreTask) -> str:
        """The queue entry of one task as kombu's Redis transport stores it: JSON, body in
        base64, anonymous exchange with the queue name as routing key (what a consumer's
        requeue uses)."""
        return self.redis_entries([task])[0]

    def redis_entries(self, tasks: Sequence[ScoreTask]) -> list[str]:
        """``redis_entry`` of each task (their task ids and delivery tags drawn at once)."""
        ids = uuid4_texts(2 * len(tasks))
        text = self._entry
        entries = []
        for n, task in enumerate(tasks):
            values = {  # base64 and UUIDs need no escaping in JSON
                "body": f'"{base64.b64encode(self._body(task)).decode()}"',
                "id": f'"{ids[2 * n]}"',
                "argsrepr": json.dumps(_argsrepr(task)),
                "tag": f'"{ids[2 * n + 1]}"',
            }
            entries.append("".join(values[p] if i % 2 else p for i, p in enumerate(text)))
        return entries


def uuid4_texts(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as ``str(uuid4())`` writes them, from one read
    of the OS's random source: under 1 us each, against 4 us for ``str(uuid4())``, which
    was a third of the producer's CPU per enqueued picture (two per message)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # the RFC 4122 variant
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
        + h[i + 20 : i + 32]
        for i in range(0, 32 * count, 32)
    ]


def _argsrepr(task: ScoreTask) -> str:
    """What Flower and the logs show of a message's arguments."""
    return f"run={task.run_id} userid={task.userid}"


class BrokerRefused(RuntimeError):
    """The broker did not confirm messages it was given (a nack, or no answer)."""


class ScorePublisher:
    """Publishes score messages, from one message template and (Redis) one broker client
    for all the calls to :meth:`publish`."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.messages = TaskMessages(app)
        self.client = broker_client() if broker_is_redis() else None

    def publish(
        self, tasks: Sequence[ScoreTask], progress: Callable[[int], None] | None = None
    ) -> None:
        """Publish one score message per task; returns once the broker holds them all.

        Redis: a thousand prebuilt entries per LPUSH. AMQP (RabbitMQ): persistent
        messages on the durable quorum queue, with publisher confirms, a thousand in
        flight at a time.
        """
        if self.client is None:
            _publish_amqp(self.app, self.messages, tasks, progress)
            return
        queue = prefix() + SCORE_QUEUE
        for chunk in _chunks(tasks):
            self.client.lpush(queue, *self.messages.redis_entries(chunk))
            if progress:
                progress(len(chunk))


def publish_scores(
    app: Celery, tasks: Sequence[ScoreTask], progress: Callable[[int], None] | None = None
) -> None:
    """Publish one score message per task (``ScorePublisher.publish``)."""
    ScorePublisher(app).publish(tasks, progress)


def _chunks(tasks: Sequence[ScoreTask]) -> Iterable[Sequence[ScoreTask]]:
    for start in range(0, len(tasks), CHUNK):
        yield tasks[start : start + CHUNK]


def _publish_amqp(
    app: Celery,
    messages: TaskMessages,
    tasks: Sequence[ScoreTask],
    progress: Callable[[int], None] | None,
) -> None:
    """Publish with confirms pipelined: a chunk is sent, then its acks are awaited.

    (kombu's ``confirm_publish`` waits for each message's ack in turn: about twenty
    times slower.)
    """
    queue = app.amqp.queues[SCORE_QUEUE]
    with app.connection_for_write(transport_options={"confirm_publish": False}) as conn:
        channel: Any = conn.channel()  # py-amqp's channel: confirms and raw publishing
        queue(channel).declare()
        acked, nacked = [0], []
        channel.events["basic_ack"].add(lambda tag, multiple: acked.__setitem__(0, tag))
        channel.events["basic_nack"].add(lambda tag, multiple: nacked.append(tag))
        channel.confirm_select()
        sent = 0
        for chunk in _chunks(tasks):
            for task in chunk:
                task_id, headers, body = messages.parts(task)
                message = channel.prepare_message(
                    body,
                    priority=0,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=headers,
                    properties={"correlation_id": task_id, "reply_to": "", "delivery_mode": 2},
                )
                channel.basic_publish(
                    message, exchange=queue.exchange.name, routing_key=queue.routing_key
                )
            sent += len(chunk)
            while acked[0] < sent and not nacked:
                conn.drain_events(timeout=CONFIRM_TIMEOUT)
            if nacked:
                raise BrokerRefused(f"the broker refused {len(nacked)} messages (nack)")
            if progress:
                progress(len(chunk))


def queue_lengths() -> dict[str, int]:
    """Messages waiting in each queue, and (Redis) delivered but not yet acknowledged
    or (AMQP) the queue's consumers."""
    if broker_is_redis():
        client, p = broker_client(), prefix()
        return {
            SCORE_QUEUE: int(client.llen(p + SCORE_QUEUE)),
            TRAINING_QUEUE: int(client.llen(p + TRAINING_QUEUE)),
            "unacked (score)": int(client.hlen(p + "unacked")),
            "unacked (training)": int(client.hlen(p + "unacked_training")),
        }
    lengths: dict[str, int] = {}
    with app.connection_for_read() as conn:
        for name in (SCORE_QUEUE, TRAINING_QUEUE):
            channel: Any = conn.channel()
            try:
                _, ready, consumers = channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors:  # not declared yet: nothing was ever sent
                ready, consumers = 0, 0
            lengths[name] = int(ready)
            lengths[f"consumers ({name})"] = int(consumers)
    return lengths


def _task_run(raw: str | bytes) -> str | None:
    """The run id of a queued or unacknowledged score message; "?" when unreadable."""
    try:
        entry = json.loads(raw)
        envelope = entry[0] if isinstance(entry, list) else entry  # unacked: [msg, exch, key]
        if envelope["headers"].get("task") != SCORE_TASK:
            return None
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return "?"  # cannot tell: assume it may be anyone's


def _scan_list(client: redis.Redis, key: str, page: int = 5000) -> Iterable[str]:
    start = 0
    while True:
        entries = client.lrange(key, start, start + page - 1)
        yield from (str(entry) for entry in entries)
        if len(entries) < page:
            return
        start += page


def run_in_flight(run_id: str) -> bool:
    """Whether a message of ``run_id`` is queued or delivered and not yet acknowledged."""
    client, p = broker_client(), prefix()
    for raw in client.hvals(p + "unacked"):
        if _task_run(raw) in (run_id, "?"):
            return True
    return any(_task_run(raw) in (run_id, "?") for raw in _scan_list(client, p + SCORE_QUEUE))


def drop_queued(run_id: str) -> int | None:
    """Remove the run's messages waiting in the score queue; how many, or None where the
    broker cannot (AMQP: a queue gives no way to remove chosen messages, so they stay
    and the workers drop them as they come, the run being cancelled).

    Redis: one Lua script filters the queue's list atomically (a worker's BRPOP waits
    for it), keeping every other message in its order.
    """
    if not broker_is_redis():
        return None
    needle = b'[["' + run_id.encode() + b'"'  # run ids need no JSON escaping
    chars = -(-len(needle) // 3) * 4  # base64 characters that cover the needle
    queue = prefix() + SCORE_QUEUE
    return int(broker_client().eval(_DROP_QUEUED, 1, queue, SCORE_TASK, needle, chars))
