"""Run state in Redis: idempotent outcome writes, delivery accounting, run metadata.

Writes are Lua scripts, so each lands atomically: a prediction is written once
(HSETNX: a redelivered task keeps the first value) and removes any error of the same
userid; an error is written only where no prediction exists. The script that records
the last outcome of a sealed run stamps ``finished_at``. Every write renews the expiry
of the run's keys, so a run lives ``GENDERSCORE_RESULT_TTL_DAYS`` after its last
activity. Deaths of worker processes are counted per userid, against the picture being
scored alone when the process died (see ``record_deaths``), never for a requeue that
the worker chose (a Redis fault).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import redis
from redis.commands.core import Script

from worker.keys import run_keys, runs_index, scored_index
from worker.scoring import Failed, Outcome, Scored
from worker.settings import settings

# Every write to a run renews the expiry of all its keys: a run lives
# GENDERSCORE_RESULT_TTL_DAYS after its last activity, finished or not.
_TOUCH = """
local function touch(ttl)
  for k = 1, 5 do redis.call('EXPIRE', KEYS[k], ttl) end
end
"""

# KEYS: meta ids pred err tries scored ; ARGV: now ttl npred (uid val digest)* (uid reason)*
# A recorded userid's solo marker (see _START) is cleared: its attempt is over.
_RECORD = (
    _TOUCH
    + """
local meta, pred, err, tries, scored = KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now, ttl, npred = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for _ = 1, npred do
  redis.call('HSETNX', pred, ARGV[i], ARGV[i + 1])
  redis.call('HDEL', err, ARGV[i])
  redis.call('HDEL', tries, ARGV[i] .. ':solo')
  if ARGV[i + 2] ~= '' then redis.call('HSET', scored, ARGV[i], ARGV[i + 2]) end
  i = i + 3
end
while i <= #ARGV do
  if redis.call('HEXISTS', pred, ARGV[i]) == 0 then
    redis.call('HSET', err, ARGV[i], ARGV[i + 1])
  end
  redis.call('HDEL', tries, ARGV[i] .. ':solo')
  i = i + 2
end
local settled = redis.call('HLEN', pred) + redis.call('HLEN', err)
local total = tonumber(redis.call('HGET', meta, 'total') or '0')
if redis.call('EXISTS', meta) == 1 then
  touch(ttl)
  local open_run = redis.call('HEXISTS', meta, 'finished_at') == 0
  if open_run and redis.call('HGET', meta, 'sealed') == '1' then
    if settled >= total then
      redis.call('HSET', meta, 'finished_at', now)
      redis.call('PUBLISH', meta, 'finished')  -- keys.run_finished_channel: wakes --wait
    end
  end
end
return {settled, total}
"""
)

# KEYS: meta ids pred err tries ; ARGV: ttl uid*
# A batch begins: count one delivery of each userid and return, per userid, whether it
# is settled already (a redelivery after the work was done: counted as skipped) and how
# many deaths of a worker process it is suspected of, after the run's source spec.
# -1: the run is unknown (deleted, expired, or lost by Redis); -2: the run is cancelled.
_START = (
    _TOUCH
    + """
local meta, pred, err, tries = KEYS[1], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', meta) == 0 then return {-1} end
if redis.call('HGET', meta, 'cancelled') then return {-2} end
local out = {redis.call('HGET', meta, 'source') or ''}
for i = 2, #ARGV do
  local uid = ARGV[i]
  redis.call('HINCRBY', tries, uid, 1)
  local settled = redis.call('HEXISTS', pred, uid) + redis.call('HEXISTS', err, uid)
  if settled > 0 then redis.call('HINCRBY', tries, uid .. ':skipped', 1) end
  out[#out + 1] = settled
  out[#out + 1] = tonumber(redis.call('HGET', tries, uid .. ':deaths') or '0')
end
touch(tonumber(ARGV[1]))
return out
"""
)

# KEYS: pred err tries ; ARGV: pid uid*
# A worker process died (or raised) with these userids in hand. If one was being scored
# alone by that process (its solo marker holds the pid), it alone is blamed; otherwise
# every unsettled userid of the batch is suspected once, and is scored alone next time.
_DEATHS = """
local pred, err, tries, pid = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local blamed = {}
for i = 2, #ARGV do
  local uid = ARGV[i]
  if pid ~= '' and redis.call('HGET', tries, uid .. ':solo') == pid then
    blamed[#blamed + 1] = uid
  end
end
if #blamed == 0 then
  for i = 2, #ARGV do
    local uid = ARGV[i]
    if redis.call('HEXISTS', pred, uid) + redis.call('HEXISTS', err, uid) == 0 then
      blamed[#blamed + 1] = uid
    end
  end
end
for _, uid in ipairs(blamed) do
  redis.call('HINCRBY', tries, uid .. ':deaths', 1)
  redis.call('HDEL', tries, uid .. ':solo')
end
return #blamed
"""

# KEYS: meta runs ; ARGV: run now ttl nfields (field value)* ; other KEYS: the run's keys
# Create a run, or reopen it to extend it: a run has one model and one source, so a
# different model_sha or source is refused (returns the field and the run's value).
_CREATE = """
local meta, runs = KEYS[1], KEYS[2]
local run, now, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local fields = {}
for i = 0, n - 1 do fields[ARGV[5 + 2 * i]] = ARGV[6 + 2 * i] end
local created = redis.call('EXISTS', meta) == 0
if not created then
  if redis.call('HGET', meta, 'cancelled') then return {-1, 'cancelled', '1'} end
  for _, name in ipairs({'model_sha', 'source'}) do
    local current = redis.call('HGET', meta, name)
    if current and fields[name] and current ~= fields[name] then
      return {-1, name, current}
    end
  end
end
redis.call('HSETNX', meta, 'started_at', now)
for name, value in pairs(fields) do redis.call('HSET', meta, name, value) end
redis.call('HDEL', meta, 'sealed', 'finished_at')
redis.call('ZADD', runs, 'NX', now, run)
for k = 3, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
if created then return {1} end
return {0}
"""


def read_hash(client: redis.Redis, key: str) -> dict[str, str]:
    """HGETALL of a client made by ``connect`` (it decodes to str)."""
    return cast(dict[str, str], client.hgetall(key))


class RedisUnavailable(RuntimeError):
    """No Redis answers at the configured URL; the message says what to do."""


# ``password=`` (any case) among a URL's query arguments, as redis-py and kombu read it.
_QUERY_PASSWORD = re.compile(r"(?i)(^|[&;])(password=)[^&;]*")


def redact(url: str) -> str:
    """A broker or Redis URL with every password in it masked as ``***``.

    Covers what redis-py accepts (``redis://[user]:pw@host``, ``rediss://``,
    ``unix://[user:pw@]/path``, ``?password=pw`` on any of them) and kombu's lists of
    URLs separated by ``;``. A URL that cannot be parsed is masked whole.
    """
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"
    masked = url
    if password is not None and "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
        masked = masked.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    head, mark, query = masked.partition("?")
    return head + mark + _QUERY_PASSWORD.sub(r"\1\2***", query)


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
    model: str = ""  # the model's id, where it differs from the run's (nightly late results)


def encode_prediction(outcome: Scored, now: float) -> str:
    """``p_female|f-or-m|unix time``: compact, about 20 bytes."""
    return f"{outcome.p_female:.6f}|{outcome.gender[0]}|{int(now)}"


def decode_prediction(value: str) -> Prediction:
    """Inverse of ``encode_prediction``."""
    p, g, ts = value.split("|")
    return Prediction(float(p), _GENDERS[g], float(ts))


_GENDERS = {"f": "female", "m": "male"}


_SCRIPTS: dict[str, Script] = {}


def _run_script(client: redis.Redis, text: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """Run a Lua script by its sha1 (EVALSHA; loaded on first use), not by its text."""
    script = _SCRIPTS.get(text)
    if script is None:
        script = _SCRIPTS.setdefault(text, client.register_script(text))
    return script(keys=list(keys), args=list(args), client=client)


def _ttl() -> int:
    return settings.result_ttl_days * 86400


def _script_keys(run_id: str, model_sha: str) -> list[str]:
    keys = run_keys(run_id)
    return [*keys.all(), scored_index(model_sha)]


def record_outcomes(
    client: redis.Redis, run_id: str, model_sha: str, outcomes: Sequence[Outcome]
) -> tuple[int, int]:
    """Write a batch's outcomes atomically; return the run's settled and total userids."""
    now = time.time()
    scored = [o for o in outcomes if isinstance(o, Scored)]
    failed = [o for o in outcomes if isinstance(o, Failed)]
    args: list[Any] = [f"{now:.3f}", _ttl(), len(scored)]
    for s in scored:
        args += [s.userid, encode_prediction(s, now), s.digest]
    for f in failed:
        args += [f.userid, f.reason[:500]]
    settled, total = _run_script(client, _RECORD, _script_keys(run_id, model_sha), args)
    return int(settled), int(total)


def seal_run(client: redis.Redis, run_id: str, total: int) -> None:
    """Mark a run fully enqueued with ``total`` userids; stamps it finished if it already is."""
    keys = run_keys(run_id)
    client.hset(keys.meta, mapping={"total": total, "sealed": 1})
    _run_script(client, _RECORD, _script_keys(run_id, "-"), [f"{time.time():.3f}", _ttl(), 0])


class UnknownRun(LookupError):
    """Redis holds no such run (never created, deleted, expired, or lost)."""


class CancelledRun(RuntimeError):
    """The run was cancelled: its messages are dropped."""


@dataclass(frozen=True)
class Delivery:
    """Where one userid of a starting batch stands."""

    settled: bool  # it has a prediction or an error already (a redelivery)
    deaths: int  # worker-process deaths it is suspected of


@dataclass(frozen=True)
class BatchStart:
    """A starting batch of one run: the run's source spec and each userid's delivery."""

    source: str
    deliveries: dict[str, Delivery]


def start_batch(client: redis.Redis, run_id: str, userids: Sequence[str]) -> BatchStart:
    """Count one more delivery of each userid; return where each stands.

    Raises UnknownRun or CancelledRun: such a run's messages are dropped.
    """
    keys = run_keys(run_id)
    reply = _run_script(client, _START, keys.all(), [_ttl(), *userids])
    if isinstance(reply[0], int) and reply[0] == -1:
        raise UnknownRun(run_id)
    if isinstance(reply[0], int) and reply[0] == -2:
        raise CancelledRun(run_id)
    deliveries = {
        userid: Delivery(bool(int(reply[1 + 2 * n])), int(reply[2 + 2 * n]))
        for n, userid in enumerate(userids)
    }
    return BatchStart(str(reply[0]), deliveries)


def count_unavailable(client: redis.Redis, run_id: str, userids: Sequence[str]) -> list[int]:
    """Count one more time each userid's picture was unavailable; return the counts."""
    pipe = client.pipeline(transaction=False)
    for userid in userids:
        pipe.hincrby(run_keys(run_id).tries, f"{userid}:unavailable", 1)
    return [int(count) for count in pipe.execute()]


def mark_solo(client: redis.Redis, run_id: str, userid: str) -> None:
    """``userid`` is about to be scored alone by this process (see ``record_deaths``)."""
    client.hset(run_keys(run_id).tries, f"{userid}:solo", str(os.getpid()))


def record_deaths(client: redis.Redis, run_id: str, userids: Sequence[str], pid: int | None) -> int:
    """A worker process ``pid`` died holding ``userids``: count it against the culprits.

    The userid it was scoring alone is the culprit; when it was scoring a whole batch,
    every unsettled userid is suspected once (and scored alone on its next delivery).
    Returns how many userids were blamed.
    """
    keys = run_keys(run_id)
    keys_used = [keys.pred, keys.err, keys.tries]
    return int(_run_script(client, _DEATHS, keys_used, [str(pid or ""), *userids]))


class RunConflict(ValueError):
    """A run cannot be extended with another model or source; the message says which."""


def create_run(client: redis.Redis, run_id: str, fields: dict[str, Any]) -> bool:
    """Create a run's metadata, or reopen the run to extend it; True when it is new.

    Raises RunConflict when the run exists with another model (``model_sha``) or source,
    or was cancelled.
    """
    keys = run_keys(run_id)
    pairs = [
        str(item) for name, value in fields.items() if value is not None for item in (name, value)
    ]
    reply = _run_script(
        client,
        _CREATE,
        [keys.meta, runs_index(), *keys.all()],
        [run_id, f"{time.time():.3f}", _ttl(), len(pairs) // 2, *pairs],
    )
    if int(reply[0]) == -1:
        name, current = str(reply[1]), str(reply[2])
        if name == "cancelled":
            raise RunConflict(f"run {run_id} was cancelled: start a new run")
        raise RunConflict(
            f"run {run_id} was started with {name} {current}, not {fields.get(name)}: a run "
            "has one model and one source; start a new run (another --run-id)"
        )
    return int(reply[0]) == 1


def run_userids(client: redis.Redis, run_id: str) -> dict[str, str]:
    """userid -> picture reference, for every userid enqueued in the run."""
    return dict(client.hscan_iter(run_keys(run_id).ids, count=5000))


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
    pipe.hlen(keys.ids)
    meta, done, errors, enqueued = pipe.execute()
    total = int(meta.get("total", enqueued) or 0)
    return RunCounts(run_id, total, int(done), int(errors), int(enqueued), meta)
