"""The course's per-user XML: age groups, baseline, escaping, files parsed back."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.cli import main
from producer.collect import RunData
from producer.course_xml import (
    DEFAULT_BASELINE,
    Baseline,
    age_group,
    read_baseline,
    user_xml,
    write_course_xml,
)
from tests.helpers import userid
from worker.ids import InvalidUserid
from worker.labels import LabelsError
from worker.results import Prediction

ATTRIBUTES = [
    "id",
    "age_group",
    "gender",
    "extrovert",
    "neurotic",
    "agreeable",
    "conscientious",
    "open",
]


@pytest.mark.parametrize(
    ("age", "group"),
    [
        (0.0, "xx-24"),
        (24.99, "xx-24"),
        (25.0, "25-34"),
        (34.9, "25-34"),
        (35.0, "35-49"),
        (49.99, "35-49"),
        (50.0, "50-xx"),
        (87.0, "50-xx"),
    ],
)
def test_age_groups(age: float, group: str) -> None:
    assert age_group(age) == group


def test_default_baseline_is_the_course_example() -> None:
    uid = "ab" * 16
    assert (
        user_xml(uid, "female")
        == (
            f'<user id="{uid}" age_group="xx-24" gender="female" extrovert="3.49" '
            'neurotic="2.73" agreeable="3.58" conscientious="3.45" open="3.91" />\n'
        ).encode()
    )


def write_profile(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([",userid,age,gender,ope,con,ext,agr,neu", *rows]) + "\n")
    return path


def test_baseline_from_profile(tmp_path: Path) -> None:
    profile = write_profile(
        tmp_path / "profile.csv",
        [
            f"0,{userid(0)},22.0,1.0,4.0,3.0,2.0,1.0,5.0",
            f"1,{userid(1)},30.0,0.0,3.0,4.0,3.0,2.0,4.0",
            f"2,{userid(2)},31.0,1.0,,5.0,4.0,3.0,3.0",  # blank 'ope' is left out of its mean
            f"3,{userid(3)},55.0,1.0,2.0,3.0,5.0,4.0,nan",
        ],
    )
    baseline = read_baseline(profile)
    assert baseline.age_group == "25-34"
    assert baseline.traits == pytest.approx(
        {
            "open": 3.0,
            "conscientious": 3.75,
            "extrovert": 3.5,
            "agreeable": 2.5,
            "neurotic": 4.0,
        }
    )
    assert baseline.source == str(profile)


def test_baseline_tie_goes_to_the_younger_group(tmp_path: Path) -> None:
    profile = write_profile(
        tmp_path / "profile.csv",
        [
            f"0,{userid(0)},40.0,1.0,4,3,2,1,5",
            f"1,{userid(1)},20.0,0.0,3,4,3,2,4",
        ],
    )
    assert read_baseline(profile).age_group == "xx-24"


def test_baseline_errors_name_the_problem(tmp_path: Path) -> None:
    no_trait = tmp_path / "a.csv"
    no_trait.write_text(f"userid,age,gender\n{userid(0)},20,1\n")
    with pytest.raises(LabelsError, match="not a course profile.csv: no 'ext' column"):
        read_baseline(no_trait)
    blank = write_profile(tmp_path / "b.csv", [f"0,{userid(0)},30,1,,3,3,3,3"])
    with pytest.raises(LabelsError, match="open"):
        read_baseline(blank)


def test_user_xml_escapes_attribute_values() -> None:
    tricky = Baseline(age_group="<\"&'>", traits=dict(DEFAULT_BASELINE.traits))
    text = user_xml('a"b<c>&d', "male", tricky)
    element = ET.fromstring(text)
    assert element.get("id") == 'a"b<c>&d'
    assert element.get("age_group") == "<\"&'>"


def run_data() -> RunData:
    predictions = {
        userid(n): Prediction(0.1 + 0.2 * n, "female" if n >= 2 else "male", 1e9) for n in range(4)
    }
    errors = {userid(9): "corrupt: truncated", userid(8): "missing: no picture file"}
    return RunData("r1", {"model_sha": "f" * 64}, predictions, errors, [userid(7)])


def test_one_parsable_file_per_scored_user(tmp_path: Path) -> None:
    data = run_data()
    baseline = Baseline(
        "35-49",
        {
            "extrovert": 1.0,
            "neurotic": 2.0,
            "agreeable": 3.0,
            "conscientious": 4.0,
            "open": 3.14159,
        },
        "test",
    )
    out = tmp_path / "xml"
    assert write_course_xml(data, out, baseline) == 4
    assert sorted(p.name for p in out.iterdir()) == [f"{u}.xml" for u in sorted(data.predictions)]
    for uid, prediction in data.predictions.items():
        path = out / f"{uid}.xml"
        root = ET.parse(path).getroot()
        assert root.tag == "user" and len(root) == 0
        assert list(root.attrib) == ATTRIBUTES
        assert root.attrib == {
            "id": uid,
            "age_group": "35-49",
            "gender": prediction.gender,
            "extrovert": "1.00",
            "neurotic": "2.00",
            "agreeable": "3.00",
            "conscientious": "4.00",
            "open": "3.14",
        }
    # Writing again replaces the files in place: same bytes, no temp files left.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_course_xml(data, out, baseline)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_default_baseline_without_profile(tmp_path: Path) -> None:
    write_course_xml(run_data(), tmp_path)
    root = ET.parse(tmp_path / f"{userid(3)}.xml").getroot()
    assert root.get("gender") == "female"
    assert root.get("age_group") == "xx-24" and root.get("open") == "3.91"


def test_unsafe_userid_is_refused(tmp_path: Path) -> None:
    data = RunData("r1", {}, {"../evil": Prediction(0.9, "female", 1e9)}, {})
    with pytest.raises(InvalidUserid):
        write_course_xml(data, tmp_path / "xml")
    assert not (tmp_path / "evil.xml").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --out CSV, --xml DIR, or both"),
        (["--xml", "x", "--profiles", "{profile}"], "--profiles fills in the CSV"),
        (["--out", "x.csv", "--baseline", "{profile}"], "--baseline is for the XML files"),
    ],
)
def test_collect_option_errors(tmp_path: Path, args: list[str], message: str) -> None:
    profile = write_profile(tmp_path / "profile.csv", [f"0,{userid(0)},22,1,4,3,2,1,5"])
    args = [a.replace("{profile}", str(profile)) for a in args]
    result = CliRunner().invoke(main, ["collect", "some-run", *args])
    assert result.exit_code == 2
    assert message in result.output
