"""Run state in Redis: idempotent outcome writes, delivery counts, run metadata.

Writes are Lua scripts, so each batch lands atomically: a prediction is written once
(HSETNX: a redelivered task keeps the first value) and removes any error of the same
userid; an error is written only where no prediction exists. The script that records
the last outcome of a sealed run stamps ``finished_at`` and sets the run's expiry.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit, urlunsplit

import redis

from worker.keys import RunKeys, run_keys, runs_index, scored_index
from worker.scoring import Failed, Outcome, Scored
from worker.settings import settings

# KEYS: meta ids pred err tries scored ; ARGV: now ttl npred (uid val digest)* (uid reason)*
_RECORD = """
local meta, pred, err, scored = KEYS[1], KEYS[3], KEYS[4], KEYS[6]
local now, ttl, npred = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for _ = 1, npred do
  redis.call('HSETNX', pred, ARGV[i], ARGV[i + 1])
  redis.call('HDEL', err, ARGV[i])
  if ARGV[i + 2] ~= '' then redis.call('HSET', scored, ARGV[i], ARGV[i + 2]) end
  i = i + 3
end
while i <= #ARGV do
  if redis.call('HEXISTS', pred, ARGV[i]) == 0 then
    redis.call('HSET', err, ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
local settled = redis.call('HLEN', pred) + redis.call('HLEN', err)
local open_run = redis.call('HEXISTS', meta, 'finished_at') == 0
if redis.call('HGET', meta, 'sealed') == '1' and open_run then
  local total = tonumber(redis.call('HGET', meta, 'total') or '0')
  if settled >= total then
    redis.call('HSET', meta, 'finished_at', now)
    for k = 1, 5 do redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return settled
"""


def read_hash(client: redis.Redis, key: str) -> dict[str, str]:
    """HGETALL of a client made by ``connect`` (it decodes to str)."""
    return cast(dict[str, str], client.hgetall(key))


class RedisUnavailable(RuntimeError):
    """No Redis answers at the configured URL; the message says what to do."""


def redact(url: str) -> str:
    """A Redis URL with its password hidden."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def connect_checked(url: str | None = None) -> redis.Redis:
    """``connect``, then a PING: RedisUnavailable with a readable message if it fails."""
    client = connect(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {redact(url or settings.redis_url)} ({exc}); start "
            "redis-server or set GENDERSCORE_REDIS_URL"
        ) from None
    return client


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client for ``url`` (default: GENDERSCORE_REDIS_URL), returning str."""
    return redis.Redis.from_url(
        url or settings.redis_url, decode_responses=True, health_check_interval=30
    )


class Prediction(NamedTuple):
    """A stored prediction, as read back by the collector (a tuple: a million are cheap)."""

    p_female: float
    gender: str
    scored_at: float


def encode_prediction(outcome: Scored, now: float) -> str:
    """``p_female|f-or-m|unix time``: compact, about 20 bytes."""
    return f"{outcome.p_female:.6f}|{outcome.gender[0]}|{int(now)}"


def decode_prediction(value: str) -> Prediction:
    """Inverse of ``encode_prediction``."""
    p, g, ts = value.split("|")
    return Prediction(float(p), _GENDERS[g], float(ts))


_GENDERS = {"f": "female", "m": "male"}


def _script_keys(run_id: str, model_sha: str) -> list[str]:
    keys = run_keys(run_id)
    return [*keys.all(), scored_index(model_sha)]


def record_outcomes(
    client: redis.Redis, run_id: str, model_sha: str, outcomes: Sequence[Outcome]
) -> int:
    """Write a batch's outcomes atomically; return how many userids the run has settled."""
    now = time.time()
    scored = [o for o in outcomes if isinstance(o, Scored)]
    failed = [o for o in outcomes if isinstance(o, Failed)]
    args: list[Any] = [f"{now:.3f}", settings.result_ttl_days * 86400, len(scored)]
    for s in scored:
        args += [s.userid, encode_prediction(s, now), s.digest]
    for f in failed:
        args += [f.userid, f.reason[:500]]
    result = client.eval(_RECORD, 6, *_script_keys(run_id, model_sha), *args)
    return int(result)


def seal_run(client: redis.Redis, run_id: str, total: int) -> None:
    """Mark a run fully enqueued with ``total`` userids; stamps it finished if it already is."""
    keys = run_keys(run_id)
    client.hset(keys.meta, mapping={"total": total, "sealed": 1})
    client.eval(
        _RECORD,
        6,
        *_script_keys(run_id, "-"),
        f"{time.time():.3f}",
        settings.result_ttl_days * 86400,
        0,
    )


def start_batch(
    client: redis.Redis, run_id: str, userids: Iterable[str]
) -> dict[str, tuple[int, bool]]:
    """Count one more delivery of each userid; return ``{userid: (deliveries, settled)}``.

    ``settled`` is true when the userid already has a prediction or an error (a
    redelivered message whose work was done).
    """
    keys: RunKeys = run_keys(run_id)
    ids = list(userids)
    pipe = client.pipeline(transaction=False)
    for userid in ids:
        pipe.hincrby(keys.tries, userid, 1)
        pipe.hexists(keys.pred, userid)
        pipe.hexists(keys.err, userid)
    replies = pipe.execute()
    return {
        userid: (int(replies[3 * n]), bool(replies[3 * n + 1] or replies[3 * n + 2]))
        for n, userid in enumerate(ids)
    }


def create_run(client: redis.Redis, run_id: str, fields: dict[str, Any]) -> bool:
    """Create a run's metadata; False when the run exists already (fields are kept)."""
    keys = run_keys(run_id)
    created = bool(client.hsetnx(keys.meta, "started_at", f"{time.time():.3f}"))
    client.hset(keys.meta, mapping={k: v for k, v in fields.items() if v is not None})
    client.hdel(keys.meta, "sealed", "finished_at")
    client.zadd(runs_index(), {run_id: time.time()}, nx=True)
    return created


@dataclass(frozen=True)
class RunCounts:
    """Where a run stands."""

    run_id: str
    total: int
    done: int
    errors: int
    enqueued: int
    meta: dict[str, str]

    @property
    def pending(self) -> int:
        """Userids with neither a prediction nor an error yet."""
        return max(0, max(self.total, self.enqueued) - self.done - self.errors)

    @property
    def finished(self) -> bool:
        """Every userid of a sealed run is settled."""
        return "finished_at" in self.meta


def run_counts(client: redis.Redis, run_id: str) -> RunCounts:
    """Counts and metadata of a run, in one round trip."""
    keys = run_keys(run_id)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.meta)
    pipe.hlen(keys.pred)
    pipe.hlen(keys.err)
    pipe.scard(keys.ids)
    meta, done, errors, enqueued = pipe.execute()
    total = int(meta.get("total", enqueued) or 0)
    return RunCounts(run_id, total, int(done), int(errors), int(enqueued), meta)


def count_solo_attempt(client: redis.Redis, run_id: str, userid: str) -> int:
    """Count one attempt at scoring ``userid`` alone; return how many there were."""
    return int(client.hincrby(run_keys(run_id).tries, f"{userid}:solo", 1))


def count_skips(client: redis.Redis, run_id: str, userids: Sequence[str]) -> None:
    """Count redeliveries of settled userids (``<userid>:skipped``): delivered, not redone."""
    pipe = client.pipeline(transaction=False)
    for userid in userids:
        pipe.hincrby(run_keys(run_id).tries, f"{userid}:skipped", 1)
    pipe.execute()
