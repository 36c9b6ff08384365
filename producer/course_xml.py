"""The course's output format: one ``<userid>.xml`` per scored user.

Each file is a single element, attributes in the course's order::

    <user id="..." age_group="xx-24" gender="female" extrovert="3.49" neurotic="2.73"
          agreeable="3.58" conscientious="3.45" open="3.91" />

``gender`` is our prediction. The attributes we do not predict come from the course's
baseline: the majority age group and the mean of each trait over a training
profile.csv (``read_baseline``), or, without one, the course's own values
(``DEFAULT_BASELINE``). Elements are built with ElementTree (which escapes) and every
file is written atomically.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from producer.collect import RunData
from worker.files import write_atomic
from worker.ids import check_userid
from worker.labels import LabelsError, read_table

log = logging.getLogger(__name__)

AGE_GROUPS = ("xx-24", "25-34", "35-49", "50-xx")
# profile.csv column -> XML attribute, in the order the attributes are written.
TRAIT_COLUMNS = {
    "ext": "extrovert",
    "neu": "neurotic",
    "agr": "agreeable",
    "con": "conscientious",
    "ope": "open",
}


@dataclass(frozen=True)
class Baseline:
    """Values for the attributes we do not predict."""

    age_group: str
    traits: dict[str, float] = field(default_factory=dict)  # XML attribute -> value
    source: str = "course defaults"


# The course's example values (ORIGIN.md), used when no training profile is given.
DEFAULT_BASELINE = Baseline(
    age_group="xx-24",
    traits={
        "extrovert": 3.49,
        "neurotic": 2.73,
        "agreeable": 3.58,
        "conscientious": 3.45,
        "open": 3.91,
    },
)


def age_group(age: float) -> str:
    """The course's age group of an age in years: xx-24, 25-34, 35-49 or 50-xx."""
    if age < 25:
        return "xx-24"
    if age < 35:
        return "25-34"
    if age < 50:
        return "35-49"
    return "50-xx"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_baseline(profile_csv: Path) -> Baseline:
    """The course baseline of a training profile.csv: majority age group, trait means.

    Blank or non-numeric cells are left out of their column; a column with no usable
    value is a LabelsError. Ties between age groups go to the younger group.
    """
    table = read_table(profile_csv)
    try:
        age_col = table.column("age")
        columns = {attr: table.column(col) for col, attr in TRAIT_COLUMNS.items()}
    except LabelsError as exc:
        raise LabelsError(f"{profile_csv} is not a course profile.csv: {exc}") from None
    groups: Counter[str] = Counter()
    sums = dict.fromkeys(columns, 0.0)
    counts = dict.fromkeys(columns, 0)
    for row in table.rows:
        age = _number(row[age_col]) if len(row) > age_col else None
        if age is not None:
            groups[age_group(age)] += 1
        for attr, col in columns.items():
            value = _number(row[col]) if len(row) > col else None
            if value is not None:
                sums[attr] += value
                counts[attr] += 1
    if not groups:
        raise LabelsError(f"{profile_csv} has no numeric 'age' value: cannot pick an age group")
    empty = [attr for attr, n in counts.items() if n == 0]
    if empty:
        raise LabelsError(f"{profile_csv} has no numeric value for: {', '.join(empty)}")
    majority = max(AGE_GROUPS, key=lambda g: (groups[g], -AGE_GROUPS.index(g)))
    traits = {attr: sums[attr] / counts[attr] for attr in columns}
    log.info(
        "baseline from %s: age_group %s (%d of %d rows), traits %s",
        profile_csv,
        majority,
        groups[majority],
        sum(groups.values()),
        {k: round(v, 3) for k, v in traits.items()},
    )
    return Baseline(majority, traits, source=str(profile_csv))


def user_xml(userid: str, gender: str, baseline: Baseline = DEFAULT_BASELINE) -> bytes:
    """One user's XML document (UTF-8, a single ``<user ... />`` element, newline-ended)."""
    element = ET.Element("user")
    element.set("id", userid)
    element.set("age_group", baseline.age_group)
    element.set("gender", gender)
    for attr in TRAIT_COLUMNS.values():
        element.set(attr, f"{baseline.traits[attr]:.2f}")
    return ET.tostring(element, encoding="unicode").encode("utf-8") + b"\n"


def write_course_xml(data: RunData, out_dir: Path, baseline: Baseline | None = None) -> int:
    """Write ``<out_dir>/<userid>.xml`` for every scored user of a run; return how many.

    Users with an error (or missing) get no file: the errors CSV lists them.
    """
    chosen = baseline or DEFAULT_BASELINE
    out_dir.mkdir(parents=True, exist_ok=True)
    for userid, prediction in sorted(data.predictions.items()):
        check_userid(userid)  # the name becomes a file name: never let it leave out_dir
        write_atomic(out_dir / f"{userid}.xml", user_xml(userid, prediction.gender, chosen))
    log.info(
        "run %s: %d XML files in %s (baseline: %s)",
        data.run_id,
        len(data.predictions),
        out_dir,
        chosen.source,
    )
    return len(data.predictions)
