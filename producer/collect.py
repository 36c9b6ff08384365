"""Collecting a run from Redis into the user-profile CSV and its errors CSV.

Every userid of the run lands in exactly one of the two files; a userid with neither
a prediction nor an error is "missing", and an incomplete run is refused unless a
partial file is asked for. Both files are written atomically and deterministically
(sorted, values as stored), so collecting twice gives byte-identical files.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path

import redis

from worker.files import errors_path, write_csv_atomic
from worker.keys import run_keys
from worker.labels import encode_gender_like, read_table
from worker.results import Prediction, decode_prediction, read_hash, run_userids

CSV_COLUMNS = ("userid", "gender", "p_female", "model", "scored_at")
SCAN_COUNT = 5000  # HSCAN page size: large pages, few round trips


class IncompleteRun(RuntimeError):
    """The run still has userids with neither a prediction nor an error."""

    def __init__(self, run_id: str, missing: int) -> None:
        super().__init__(
            f"run {run_id} is incomplete: {missing} userids have neither a prediction nor "
            "an error yet (wait for it, run `genderscore reconcile`, or pass --partial)"
        )
        self.missing = missing


@dataclass
class RunData:
    """Everything stored for a run."""

    run_id: str
    meta: dict[str, str]
    predictions: dict[str, Prediction]
    errors: dict[str, str]
    missing: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        """12 hex digits of the model's sha256."""
        return self.meta.get("model_sha", "")[:12]


def _hscan(client: redis.Redis, key: str) -> Iterator[tuple[str, str]]:
    yield from client.hscan_iter(key, count=SCAN_COUNT)


def load_run(client: redis.Redis, run_id: str) -> RunData:
    """Read a run's predictions, errors and missing userids."""
    keys = run_keys(run_id)
    meta = read_hash(client, keys.meta)
    if not meta:
        raise KeyError(f"no run {run_id!r} in Redis (see `genderscore status`)")
    predictions = {uid: decode_prediction(v) for uid, v in _hscan(client, keys.pred)}
    errors = {uid: reason for uid, reason in _hscan(client, keys.err) if uid not in predictions}
    expected = set(run_userids(client, run_id))
    missing = sorted(expected - predictions.keys() - errors.keys())
    return RunData(run_id, meta, predictions, errors, missing)


@functools.lru_cache(maxsize=65536)
def iso(ts: float) -> str:
    """Unix time -> ``2026-11-25T02:00:00Z`` (cached: a run has few distinct seconds)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Collected:
    """What ``collect`` wrote."""

    csv_path: Path
    errors_path: Path
    scored: int
    errors: int
    missing: int


def collect(
    client: redis.Redis,
    run_id: str,
    out: Path,
    profiles: Path | None = None,
    partial: bool = False,
) -> Collected:
    """Write ``out`` and ``<out>.errors.csv`` for ``run_id``."""
    data = load_run(client, run_id)
    if data.missing and not partial:
        raise IncompleteRun(run_id, len(data.missing))
    return write_outputs(data, out, profiles)


def write_outputs(data: RunData, out: Path, profiles: Path | None = None) -> Collected:
    """Write the user-profile CSV and its errors CSV for a run's data."""
    errors = dict(data.errors)
    for userid in data.missing:
        errors[userid] = "missing: no prediction or error yet (partial collect)"
    if profiles is None:
        model_id = data.model_id
        rows = (
            (uid, p.gender, f"{p.p_female:.6f}", p.model or model_id, iso(p.scored_at))
            for uid, p in sorted(data.predictions.items(), key=itemgetter(0))
        )
        write_csv_atomic(out, CSV_COLUMNS, rows)
    else:
        errors.update(_write_profiles(out, profiles, data))
    error_path = errors_path(out)
    write_csv_atomic(error_path, ("userid", "error"), sorted(errors.items()))
    return Collected(out, error_path, len(data.predictions), len(errors), len(data.missing))


def _write_profiles(out: Path, profiles: Path, data: RunData) -> dict[str, str]:
    """The course profile file with gender filled in; returns errors for unscored rows."""
    table = read_table(profiles)
    uid_col, gender_col = table.column("userid"), table.column("gender")
    examples = [row[gender_col] for row in table.rows[:50] if len(row) > gender_col]
    header = [*table.header, "p_female", "model"]
    rows, errors = [], {}
    for row in table.rows:
        row = row + [""] * (len(table.header) - len(row))
        userid = row[uid_col].strip()
        prediction = data.predictions.get(userid)
        if prediction is None:
            row[gender_col] = ""
            if userid not in data.errors and userid not in data.missing:
                errors[userid] = "not_in_run: no picture of this user was scored in the run"
            rows.append([*row, "", ""])
        else:
            row[gender_col] = encode_gender_like(prediction.gender, examples)
            rows.append([*row, f"{prediction.p_female:.6f}", data.model_id])
    write_csv_atomic(out, header, rows)
    return errors
