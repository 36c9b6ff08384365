"""Collecting a run from Redis into the user-profile CSV and its errors CSV.

Every userid of the run lands in exactly one of the two files; a userid with neither
a prediction nor an error is "missing", and an incomplete run is refused unless a
partial file is asked for. Only the run's own userids (its id set) are written: a
prediction or error stored under any other id (a malformed or foreign message) is
left out and counted in the log. Both files are written atomically and
deterministically (sorted, values as stored), so collecting twice gives
byte-identical files; cells that a spreadsheet would run as a formula are
neutralised (``worker.files``).

A million predictions take a few seconds: the run's three keys are read in parallel
(HSCAN/SSCAN pages on their own connections), stored values are parsed by pandas'
CSV reader, and the frame is sorted and written by pandas (``bench/micro.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pandas as pd
import redis

from worker.files import errors_path, write_frame_atomic
from worker.keys import run_keys
from worker.labels import LabelsError, encode_gender_like
from worker.results import Prediction, read_hash

log = logging.getLogger(__name__)

CSV_COLUMNS = ("userid", "gender", "p_female", "model", "scored_at")
ERROR_COLUMNS = ("userid", "error")
SCAN_COUNT = 5000  # HSCAN page size: large pages, few round trips
_GENDERS = {"f": "female", "m": "male"}


class IncompleteRun(RuntimeError):
    """The run still has userids with neither a prediction nor an error."""

    def __init__(self, run_id: str, missing: int) -> None:
        super().__init__(
            f"run {run_id} is incomplete: {missing} userids have neither a prediction nor "
            "an error yet (wait for it, run `genderscore reconcile`, or pass --partial)"
        )
        self.missing = missing


class LostIds(RuntimeError):
    """Redis holds outcomes of the run but not its id set (it lost data)."""


class PredictionFrame(MutableMapping[str, Prediction]):
    """A run's predictions as a frame sorted by userid, readable as a mapping.

    Columns: ``userid``, ``gender`` (female/male), ``p_female`` (the stored text, six
    decimals), ``scored_at`` (unix seconds) and, where a prediction comes from another
    run (a nightly run's late results), ``model`` (its model id; "" for the run's own).
    The mapping view (for the report, the XML files and the nightly merge) is built on
    first use; once changed through it, the mapping is what counts.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.edited = False

    @functools.cached_property
    def _by_userid(self) -> dict[str, Prediction]:
        f = self.frame
        models = f["model"] if "model" in f else [""] * len(f)
        columns = (f["userid"], f["p_female"], f["gender"], f["scored_at"], models)
        return {
            uid: Prediction(float(p), g, float(ts), str(model))
            for uid, p, g, ts, model in zip(*columns, strict=True)
        }

    def __getitem__(self, userid: str) -> Prediction:
        return self._by_userid[userid]

    def __setitem__(self, userid: str, prediction: Prediction) -> None:
        self._by_userid[userid] = prediction
        self.edited = True

    def __delitem__(self, userid: str) -> None:
        del self._by_userid[userid]
        self.edited = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_userid) if self.edited else iter(self.frame["userid"])

    def __len__(self) -> int:
        return len(self._by_userid) if self.edited else len(self.frame)


def prediction_frame(predictions: Mapping[str, Prediction]) -> pd.DataFrame:
    """The frame of ``predictions`` (PredictionFrame's own, or built and sorted)."""
    if isinstance(predictions, PredictionFrame) and not predictions.edited:
        return predictions.frame
    items = sorted(predictions.items())
    return pd.DataFrame(
        {
            "userid": pd.array([u for u, _ in items], dtype="str"),
            "gender": pd.array([p.gender for _, p in items], dtype="str"),
            "p_female": pd.array([f"{p.p_female:.6f}" for _, p in items], dtype="str"),
            "scored_at": pd.array([int(p.scored_at) for _, p in items], dtype="int64"),
            "model": pd.array([p.model for _, p in items], dtype="str"),
        }
    )


@dataclass
class RunData:
    """Everything stored for a run (only its own userids)."""

    run_id: str
    meta: dict[str, str]
    predictions: MutableMapping[str, Prediction]
    errors: dict[str, str]
    missing: list[str] = field(default_factory=list)
    foreign: int = 0  # outcomes stored under userids that are not the run's, left out

    @property
    def model_id(self) -> str:
        """12 hex digits of the model's sha256."""
        return self.meta.get("model_sha", "")[:12]


def _scan_hash(client: redis.Redis, key: str) -> tuple[list[str], list[str]]:
    """Every field and value of a hash, by HSCAN pages."""
    fields: list[str] = []
    values: list[str] = []
    cursor = 0
    while True:
        cursor, page = client.hscan(key, cursor, count=SCAN_COUNT)
        found = cast(dict[str, str], page)  # the client decodes responses
        fields += found.keys()
        values += found.values()
        if not cursor:
            return fields, values


def _with_prediction(client: redis.Redis, pred_key: str, userids: list[str]) -> set[str]:
    """Which of ``userids`` have a prediction (an error beside one is not an error)."""
    found: set[str] = set()
    for start in range(0, len(userids), SCAN_COUNT):
        chunk = userids[start : start + SCAN_COUNT]
        found.update(u for u, v in zip(chunk, client.hmget(pred_key, chunk), strict=True) if v)
    return found


def _strings(values: list[str]) -> pd.Series:
    """A column of strings (built by Arrow: five times faster than from the list)."""
    import pyarrow as pa

    return pd.Series(pd.array(pa.array(values, type=pa.string()), dtype="str"))


# The stored value, ``encode_prediction``'s ``0.123456|f|1764000000``.
_STORED = r"[01]\.\d{6}\|[fm]\|\d{1,12}"


def prediction_rows(userids: list[str], values: list[str]) -> pd.DataFrame:
    """Stored predictions -> a frame sorted by userid (see PredictionFrame).

    Values are checked against the stored format in one pass, then cut at their
    fixed offsets (``p_female`` has six decimals in [0, 1]).
    """
    raw = pd.DataFrame({"userid": _strings(userids), "value": _strings(values)})
    bad = ~raw["value"].str.fullmatch(_STORED).fillna(False).astype(bool)
    if bad.any():
        where = int(bad.to_numpy().argmax())
        raise ValueError(f"unreadable prediction of {userids[where]!r} in Redis: {values[where]!r}")
    raw = raw.sort_values("userid", ignore_index=True)
    value = raw["value"]
    return pd.DataFrame(
        {
            "userid": raw["userid"],
            "gender": pd.Categorical.from_codes(
                (value.str.slice(9, 10) == "m").to_numpy().astype("int8"),
                pd.Index(["female", "male"]),
            ),
            "p_female": value.str.slice(0, 8),
            "scored_at": value.str.slice(11).astype("int64"),
        }
    )


def load_run(client: redis.Redis, run_id: str) -> RunData:
    """Read a run's predictions, errors and missing userids (its own userids only)."""
    keys = run_keys(run_id)
    meta = read_hash(client, keys.meta)
    if not meta:
        from producer.runs import NoSuchRun

        raise NoSuchRun(run_id)
    with ThreadPoolExecutor(max_workers=3) as pool:  # one connection each, from the pool
        pred_job = pool.submit(_scan_hash, client, keys.pred)
        err_job = pool.submit(_scan_hash, client, keys.err)
        ids_job = pool.submit(_scan_hash, client, keys.ids)  # userid -> picture
        pred_ids, pred_values = pred_job.result()
        err_ids, err_reasons = err_job.result()
        ids = set(ids_job.result()[0])
    if not ids and (pred_ids or err_ids):
        raise LostIds(
            f"run {run_id} has outcomes but Redis lost its id set: run "
            f"`genderscore reconcile {run_id} --images DIR` to restore it from the folder"
        )
    # Set arithmetic only where needed: a whole run's userids in a Python set cost more
    # than the rest of the collection (the usual run has no strangers and no gaps).
    strangers = set() if ids.issuperset(pred_ids) else set(pred_ids) - ids
    if strangers:
        kept = [(u, v) for u, v in zip(pred_ids, pred_values, strict=True) if u in ids]
        pred_ids, pred_values = [u for u, _ in kept], [v for _, v in kept]
    frame = prediction_rows(pred_ids, pred_values)
    own_errors = [(u, r) for u, r in zip(err_ids, err_reasons, strict=True) if u in ids]
    foreign = len(strangers) + len(err_ids) - len(own_errors)
    predicted = _with_prediction(client, keys.pred, [u for u, _ in own_errors])
    errors = {u: r for u, r in own_errors if u not in predicted}
    if foreign:
        log.warning(
            "run %s: %d predictions or errors stored under userids that are not the run's "
            "were left out",
            run_id,
            foreign,
        )
    missing: list[str] = []
    if len(ids) > len(pred_ids) + len(errors):  # the three sets are disjoint
        missing = sorted(ids.difference(pred_ids, errors))
    return RunData(run_id, meta, PredictionFrame(frame), errors, missing, foreign)


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
    foreign: int = 0


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


def _models(frame: pd.DataFrame, run_model: str) -> pd.Series | str:
    """Each prediction's model id: its own where it has one, else the run's."""
    if "model" not in frame or not frame["model"].astype(bool).any():
        return run_model
    return frame["model"].where(frame["model"] != "", run_model)


def _profile_rows(data: RunData) -> pd.DataFrame:
    """The user-profile CSV's rows, sorted by userid."""
    frame = prediction_frame(data.predictions)
    times = frame["scored_at"]
    stamps = {int(t): iso(float(t)) for t in pd.unique(times)}
    return pd.DataFrame(
        {
            "userid": frame["userid"],
            "gender": frame["gender"],
            "p_female": frame["p_female"],
            "model": _models(frame, data.model_id),
            "scored_at": times.map(stamps).astype("str"),
        },
        columns=list(CSV_COLUMNS),
    )


def write_outputs(data: RunData, out: Path, profiles: Path | None = None) -> Collected:
    """Write the user-profile CSV and its errors CSV for a run's data."""
    errors = dict(data.errors)
    for userid in data.missing:
        errors[userid] = "missing: no prediction or error yet (partial collect)"
    if profiles is None:
        write_frame_atomic(out, _profile_rows(data))
    else:
        errors.update(_write_profiles(out, profiles, data))
    error_path = errors_path(out)
    items = sorted(errors.items())
    write_frame_atomic(
        error_path,
        pd.DataFrame(
            {
                "userid": pd.array([u for u, _ in items], dtype="str"),
                "error": pd.array([r for _, r in items], dtype="str"),
            }
        ),
    )
    return Collected(
        out, error_path, len(data.predictions), len(errors), len(data.missing), data.foreign
    )


def read_profiles(path: Path) -> pd.DataFrame:
    """A course profile.csv as strings, every row and column as in the file.

    The first row is the header (whitespace around names stripped, an unnamed index
    column kept as ""); short rows are padded with empty cells.
    """
    try:
        raw = pd.read_csv(
            path,
            header=None,
            dtype="str",
            keep_default_na=False,
            encoding="utf-8-sig",
            skip_blank_lines=True,
        )
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise LabelsError(f"cannot read {path}: {exc}") from None
    if raw.empty:
        raise LabelsError(f"{path} is empty")
    raw = raw.fillna("")
    header = [str(name).strip() for name in raw.iloc[0]]
    table = raw.iloc[1:].reset_index(drop=True)
    table.columns = pd.Index(header)
    return table


def _column(table: pd.DataFrame, name: str) -> int:
    names = list(table.columns)
    if name not in names:
        raise LabelsError(f"no '{name}' column (columns: {', '.join(names)})")
    return names.index(name)


def _write_profiles(out: Path, profiles: Path, data: RunData) -> dict[str, str]:
    """The course profile file with gender filled in; returns errors for unscored rows."""
    table = read_profiles(profiles)
    uid_col, gender_col = _column(table, "userid"), _column(table, "gender")
    examples = list(table.iloc[:50, gender_col])
    coding = {g: encode_gender_like(g, examples) for g in ("female", "male")}
    userids = table.iloc[:, uid_col].str.strip()
    found = pd.DataFrame({"userid": userids}).merge(
        prediction_frame(data.predictions), on="userid", how="left", validate="many_to_one"
    )
    scored = found["gender"].notna().to_numpy()
    width = table.shape[1]
    cells: dict[int, Any] = {i: table.iloc[:, i].to_numpy() for i in range(width)}
    gender = found["gender"].astype(object)  # categorical in the frame: plain values here
    cells[gender_col] = gender.map(coding).fillna("").astype("str").to_numpy()
    cells[width] = found["p_female"].fillna("").astype("str").to_numpy()
    cells[width + 1] = [data.model_id if hit else "" for hit in scored]
    filled = pd.DataFrame(cells)
    filled.columns = pd.Index([*table.columns, "p_female", "model"])  # names may repeat
    write_frame_atomic(out, filled)
    known = set(data.errors) | set(data.missing)
    return {
        uid: "not_in_run: no picture of this user was scored in the run"
        for uid, hit in zip(userids, scored, strict=True)
        if not hit and uid not in known
    }
