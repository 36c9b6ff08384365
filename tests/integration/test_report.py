"""A small real run -> `genderscore report` and `collect --xml`, checked against the CSV."""

from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from producer.cli import main
from producer.collect import load_run
from producer.report import build_report, errors_html, evaluate_run
from tests.helpers import make_pictures, userid, write_profiles
from worker.evaluation import band_index
from worker.results import Prediction

BAD = {
    userid(900): b"",
    userid(901): b"",
    userid(902): b"not a jpeg at all",
    userid(903): b"GIF89a broken",
    userid(904): b"\x00" * 10,
}

VOID = {"img", "meta", "br", "hr", "link"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class Page(HTMLParser):
    """The report read back: cells of each ``data-key`` element, images, error rows."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.error_rows: list[list[str]] = []
        self._keys: list[str | None] = []
        self._in_errors = False
        self._row: list[str] | None = None
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img":
            self.images.append(found.get("src") or "")
        if tag in VOID:
            return
        self._keys.append(found.get("data-key"))
        key = next((k for k in reversed(self._keys) if k), None)
        if tag == "td":
            self._in_cell = True
            if key:
                self.cells.setdefault(key, []).append("")
            if self._row is not None:
                self._row.append("")
        elif tag == "tr" and self._in_errors:
            self._row = []
        elif tag == "h2":
            self._in_errors = False

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        self._keys.pop()
        if tag == "td":
            self._in_cell = False
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.error_rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if data == "Errors":
            self._in_errors = True
        if not self._in_cell:
            return
        key = next((k for k in reversed(self._keys) if k), None)
        if key:
            self.cells[key][-1] += data
        if self._row is not None:
            self._row[-1] += data


def parse_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def fact(page: Page, key: str) -> str:
    """The value cell of a ``data-key`` row (its last cell)."""
    return page.cells[key][-1].strip()


@pytest.fixture(scope="module")
def scored_run(
    tmp_path_factory: pytest.TempPathFactory, score_worker: Path
) -> tuple[str, Path, dict[str, str], Path]:
    """A real run of 160 pictures (5 of them broken), collected to CSV."""
    base = tmp_path_factory.mktemp("report-run")
    folder = base / "pictures"
    labels = make_pictures(folder, 155, size=(48, 48))
    for uid, content in BAD.items():
        (folder / f"{uid}.jpg").write_bytes(content)
        labels[uid] = "male"
    labels_csv = base / "profile.csv"
    write_profiles(labels_csv, labels)
    out = base / "scored.csv"
    result = CliRunner().invoke(
        main, ["score", str(folder), "--wait", "--out", str(out), "--timeout", "180"]
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1], out, labels, labels_csv


def test_report_numbers_match_the_csv(
    scored_run: tuple[str, Path, dict[str, str], Path], tiny_model: Path, tmp_path: Path
) -> None:
    run_id, csv_path, labels, labels_csv = scored_run
    rows = read_csv(csv_path)
    errors = read_csv(csv_path.with_name("scored.errors.csv"))
    assert len(rows) == 155 and {e["userid"] for e in errors} == set(BAD)

    result = CliRunner().invoke(
        main, ["report", run_id, "--labels", str(labels_csv), "--out", str(tmp_path / "report")]
    )
    assert result.exit_code == 0, result.output
    index = Path(result.stdout.strip())
    assert index == tmp_path / "report" / "index.html"
    text = index.read_text()
    page = parse_page(index)

    # Self-contained: every picture is embedded, nothing is fetched.
    assert len(page.images) == 4 and all(
        s.startswith("data:image/png;base64,") for s in page.images
    )
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    assert "http://" not in text and "https://" not in text

    assert fact(page, "scored") == str(len(rows))
    assert fact(page, "errors") == str(len(errors))
    assert fact(page, "total") == str(len(rows) + len(errors))
    model_sha = fact(page, "model_sha")
    assert {r["model"] for r in rows} == {model_sha[:12]} and len(model_sha) == 64
    assert fact(page, "val_accuracy") == "unknown"  # the test model has no training history
    started, finished = fact(page, "started"), fact(page, "finished")
    assert started[:19] <= min(r["scored_at"] for r in rows)[:19]
    assert finished[:19] >= max(r["scored_at"] for r in rows)[:19]
    wall = float(fact(page, "wall_time").removesuffix(" s"))
    rate = float(fact(page, "images_per_s"))
    # The page rounds the wall time to 0.1 s: a warm worker's run can take under a second.
    assert len(rows) / (wall + 0.05) - 0.1 <= rate <= len(rows) / max(wall - 0.05, 0.01) + 0.1

    # Errors: every one listed, and counted by type.
    assert sorted(page.error_rows) == sorted([e["userid"], e["error"]] for e in errors)
    kinds = Counter(e["error"].split(":")[0] for e in errors)
    assert {k: int(fact(page, f"kind_{k}")) for k in kinds} == dict(kinds)

    # Against labels, recomputed from the CSV.
    scored = {r["userid"]: r for r in rows}
    truth = {u: labels[u] for u in scored}
    correct = sum(scored[u]["gender"] == g for u, g in truth.items())
    assert fact(page, "labelled_users") == str(len(rows))
    assert fact(page, "accuracy") == f"{correct / len(rows):.4f}"
    majority = Counter(truth.values()).most_common(1)[0][1]
    assert fact(page, "majority_baseline") == f"{majority / len(rows):.4f}"
    assert fact(page, "labelled_errors") == str(len(BAD))
    for t in ("female", "male"):
        for g in ("female", "male"):
            cell = sum(truth[u] == t and scored[u]["gender"] == g for u in scored)
            assert fact(page, f"confusion_{t}_{g}") == str(cell)
    for band in range(5):
        members = [u for u, r in scored.items() if band_index(float(r["p_female"])) == band]
        right = sum(scored[u]["gender"] == truth[u] for u in members)
        _, users, accuracy = page.cells[f"band_{band}"]
        assert users == str(len(members))
        assert accuracy == (f"{100 * right / len(members):.1f}%" if members else "-")


def test_report_model_facts_from_metadata(
    scored_run: tuple[str, Path, dict[str, str], Path], redis_client: redis.Redis, tmp_path: Path
) -> None:
    data = load_run(redis_client, scored_run[0])
    meta = {
        "sha256": data.meta["model_sha"],
        "created_at": "2026-05-01T10:00:00+00:00",
        "val_accuracy": 0.7123,
    }
    page = parse_page(build_report(data, tmp_path, model_meta=meta))
    assert fact(page, "val_accuracy") == "0.7123"
    assert fact(page, "model_created_at") == "2026-05-01T10:00:00+00:00"
    # Metadata of another model (the file was replaced since the run) is not shown.
    page = parse_page(build_report(data, tmp_path, model_meta={**meta, "sha256": "0" * 64}))
    assert fact(page, "val_accuracy") == "unknown"
    assert "accuracy" not in page.cells  # no labels, no accuracy section


def test_collect_xml_matches_the_csv(
    scored_run: tuple[str, Path, dict[str, str], Path], tmp_path: Path
) -> None:
    run_id, csv_path, _, labels_csv = scored_run
    rows = {r["userid"]: r for r in read_csv(csv_path)}
    xml_dir = tmp_path / "xml"
    result = CliRunner().invoke(
        main, ["collect", run_id, "--xml", str(xml_dir), "--baseline", str(labels_csv)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(xml_dir)
    assert not list(tmp_path.glob("*.csv"))  # --xml without --out writes no CSV
    files = sorted(xml_dir.iterdir())
    assert [f.name for f in files] == [f"{u}.xml" for u in sorted(rows)]
    for path in files:
        user = ET.parse(path).getroot()
        assert user.tag == "user"
        assert user.attrib == {
            "id": path.stem,
            "age_group": "xx-24",
            "gender": rows[path.stem]["gender"],
            "extrovert": "3.50",
            "neurotic": "2.70",
            "agreeable": "3.60",
            "conscientious": "3.40",
            "open": "3.90",
        }

    # With --out as well: the same CSV as `score --wait` wrote, and the same XML files.
    both = tmp_path / "both"
    result = CliRunner().invoke(
        main, ["collect", run_id, "--out", str(both / "run.csv"), "--xml", str(both / "xml")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(both / "run.csv"), str(both / "xml")]
    assert (both / "run.csv").read_bytes() == csv_path.read_bytes()
    assert len(list((both / "xml").iterdir())) == len(rows)


def test_error_table_shows_the_first_100() -> None:
    errors = {userid(n): f"corrupt: <bad {n}>" for n in range(130)}
    html = errors_html(errors)
    assert html.count("<tr>") == 101  # header + 100 rows
    assert "&lt;bad 0&gt;" in html and userid(99) in html and userid(100) not in html
    assert "and 30 more" in html


def test_evaluate_bands_and_majority() -> None:
    from producer.collect import RunData

    ps = [0.0, 0.45, 0.55, 0.6, 0.62, 0.95, 1.0]  # bands 4, 0, 0, 1, 1, 4, 4
    predictions = {
        userid(n): Prediction(p, "female" if p >= 0.5 else "male", 1e9) for n, p in enumerate(ps)
    }
    truth = ["male", "female", "female", "male", "female", "female", "male"]
    labels = {userid(n): g for n, g in enumerate(truth)} | {userid(50): "male"}
    data = RunData("r", {}, predictions, {userid(50): "corrupt: x"})
    result = evaluate_run(data, labels)
    assert [band_index(p) for p in ps] == [4, 0, 0, 1, 1, 4, 4]
    assert (result.users, result.correct) == (7, 4)
    assert (result.majority_class, result.majority_users) == ("female", 4)
    assert [(b.users, b.correct) for b in result.bands] == [(2, 1), (2, 1), (0, 0), (0, 0), (3, 2)]
    assert result.confusion == {
        ("female", "female"): 3,
        ("female", "male"): 1,
        ("male", "female"): 2,
        ("male", "male"): 1,
    }
    assert (result.labelled_errors, result.unlabelled) == (1, 0)


def test_error_kinds_are_drawn_as_plain_text() -> None:
    # Kinds come from the data; with mathtext on, these raise ValueError (bad TeX).
    from producer.report import plot_errors

    png = plot_errors({"$\\frac{1}{$": 2, "$x^$": 1, "missing": 3, "k" * 500: 1})
    assert png.startswith(b"\x89PNG")
