"""Reading the course's label and profile CSVs (and plain ``userid,gender`` files).

The course format is ``profile/profile.csv``: an unnamed index column, then
``userid,age,gender,ope,con,ext,agr,neu``, gender ``0.0`` = male, ``1.0`` = female.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from worker.ids import is_valid_userid

log = logging.getLogger(__name__)

# The course's coding: 0 = male, 1 = female.
COURSE_CODES = {"male": 0, "female": 1}
GENDER_WORDS = {
    "0": "male",
    "1": "female",
    "male": "male",
    "female": "female",
    "m": "male",
    "f": "female",
}


class LabelsError(ValueError):
    """A label or profile file that cannot be used; the message says why."""


def parse_gender(value: str) -> str | None:
    """``0``/``1`` (also ``0.0``/``1.0``) or ``male``/``female`` -> word; None if not one."""
    text = value.strip().lower()
    try:
        number = float(text)
    except ValueError:
        return GENDER_WORDS.get(text)
    if number in (0.0, 1.0):
        return "male" if number == 0.0 else "female"
    return None


@dataclass
class Table:
    """A CSV read whole: header and rows (the first column may be the unnamed index)."""

    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> int:
        """Index of column ``name`` or a LabelsError naming the columns there are."""
        try:
            return self.header.index(name)
        except ValueError:
            raise LabelsError(f"no '{name}' column (columns: {', '.join(self.header)})") from None


def read_table(path: Path) -> Table:
    """Read a CSV file (UTF-8, BOM tolerated)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise LabelsError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    return Table(header, rows[1:])


@dataclass
class Labels:
    """userid -> "male"/"female", with the rows skipped and why."""

    genders: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def read_labels(path: Path) -> Labels:
    """Labels from ``userid,gender`` or the course's profile.csv; bad rows are skipped."""
    table = read_table(path)
    uid_col, gender_col = table.column("userid"), table.column("gender")
    labels = Labels()
    for line, row in enumerate(table.rows, start=2):
        if len(row) <= max(uid_col, gender_col):
            labels.skipped.append((line, "missing columns"))
            continue
        userid, gender = row[uid_col].strip(), parse_gender(row[gender_col])
        if not is_valid_userid(userid):
            labels.skipped.append((line, f"invalid userid {userid!r}"))
        elif gender is None:
            labels.skipped.append((line, f"gender {row[gender_col]!r} is not 0/1/male/female"))
        elif userid in labels.genders:
            if labels.genders[userid] != gender:
                labels.skipped.append((line, f"{userid} has conflicting labels: both dropped"))
                labels.genders[userid] = ""
            else:
                labels.skipped.append((line, f"duplicate of {userid}"))
        else:
            labels.genders[userid] = gender
    conflicts = [u for u, g in labels.genders.items() if not g]
    for userid in conflicts:
        del labels.genders[userid]
    if not labels.genders:
        raise LabelsError(
            f"{path} has no usable row (need columns userid and gender, gender 0/1 or "
            f"male/female); {len(labels.skipped)} rows skipped"
        )
    return labels


def encode_gender_like(gender: str, examples: list[str]) -> str:
    """``gender`` written in the coding a column already uses (``1.0``, ``1`` or words)."""
    for value in examples:
        text = value.strip().lower()
        if text in ("male", "female"):
            return gender
        if text in ("m", "f"):
            return gender[0]
        if "." in text and parse_gender(text):
            return f"{COURSE_CODES[gender]:.1f}"
        if parse_gender(text):
            return str(COURSE_CODES[gender])
    return f"{COURSE_CODES[gender]:.1f}"  # the course's own coding
