"""End to end: pictures -> `genderscore score --wait` -> real worker -> CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from producer.cli import main
from tests.helpers import make_pictures, write_profiles


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("pictures")
    labels = make_pictures(folder, 300, size=(80, 60))
    (folder / "notes.txt").write_text("not a picture")
    (folder / "bad name!.jpg").write_bytes(b"x")
    return folder, labels


def test_score_wait_matches_model_and_local(
    pictures: tuple[Path, dict[str, str]],
    tiny_model: Path,
    score_worker: Path,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    folder, labels = pictures
    runner = CliRunner()
    out = tmp_path / "scored.csv"
    result = runner.invoke(
        main, ["score", str(folder), "--wait", "--out", str(out), "--timeout", "180"]
    )
    assert result.exit_code == 0, result.output
    assert "notes.txt" in result.output and "bad name!.jpg" in result.output
    rows = read_csv(out)
    assert [r["userid"] for r in rows] == sorted(labels)
    assert set(rows[0]) == {"userid", "gender", "p_female", "model", "scored_at"}

    # The model's own output on the same preprocessed arrays.
    from worker.model import load_bundle
    from worker.preprocess import preprocess

    bundle = load_bundle(tiny_model)
    arrays = np.stack(
        [preprocess((folder / f"{r['userid']}.jpg").read_bytes(), bundle.size_wh) for r in rows]
    )
    expected = np.asarray(bundle.model.predict_on_batch(arrays)).reshape(-1)
    got = np.array([float(r["p_female"]) for r in rows])
    assert np.allclose(got, expected, atol=1e-5)
    assert {r["model"] for r in rows} == {bundle.model_id}
    assert all(r["gender"] == ("female" if float(r["p_female"]) >= 0.5 else "male") for r in rows)

    local = tmp_path / "local.csv"
    result = runner.invoke(main, ["score", str(folder), "--local", "--out", str(local)])
    assert result.exit_code == 0, result.output
    local_rows = read_csv(local)
    assert [r["userid"] for r in local_rows] == [r["userid"] for r in rows]
    assert np.allclose([float(r["p_female"]) for r in local_rows], got, atol=1e-5)
    assert [r["gender"] for r in local_rows] == [r["gender"] for r in rows]


def test_collect_profiles_keeps_the_course_file_and_fills_gender(
    tmp_path: Path, score_worker: Path, redis_client: redis.Redis
) -> None:
    folder = tmp_path / "pictures"
    labels = make_pictures(folder, 20)
    profile = tmp_path / "profile.csv"
    write_profiles(profile, {**labels, "ffffffffffffffffffffffffffffffff": "male"})
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "score",
            str(folder),
            "--run-id",
            "profiles-run",
            "--wait",
            "--out",
            str(tmp_path / "plain.csv"),
            "--timeout",
            "120",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "filled.csv"
    result = runner.invoke(
        main, ["collect", "profiles-run", "--out", str(out), "--profiles", str(profile)]
    )
    assert result.exit_code == 0, result.output
    source = profile.read_text().splitlines()
    filled = out.read_text().splitlines()
    assert filled[0] == source[0] + ",p_female,model"
    assert len(filled) == len(source)
    plain = {r["userid"]: r for r in read_csv(tmp_path / "plain.csv")}
    for src, row in zip(source[1:], filled[1:], strict=True):
        src_cells, cells = src.split(","), row.split(",")
        assert cells[:3] == src_cells[:3] and cells[4:9] == src_cells[4:9]  # untouched columns
        uid = cells[1]
        if uid in plain:
            assert cells[3] == ("1.0" if plain[uid]["gender"] == "female" else "0.0")
            assert cells[9] == plain[uid]["p_female"] and cells[10] == plain[uid]["model"]
        else:
            assert cells[3] == "" and cells[9:] == ["", ""]
    errors = read_csv(tmp_path / "filled.errors.csv")
    assert [e["userid"] for e in errors] == ["ffffffffffffffffffffffffffffffff"]
    assert errors[0]["error"].startswith("not_in_run:")
