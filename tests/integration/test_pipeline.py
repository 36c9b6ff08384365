"""End to end: pictures -> `genderscore score --wait` -> real worker -> CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from producer.cli import main
from tests.helpers import make_pictures


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
