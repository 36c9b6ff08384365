"""The benchmark, at smoke size, so that it cannot rot: it runs and reports every figure.

No timing is asserted (the figures of a tiny run on a shared machine mean nothing);
only that ``python -m bench.run --quick`` completes on the test Redis, prints its table,
writes its JSON with every figure, and leaves no key behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def bench_env() -> dict[str, str]:
    """The test session's environment; the benchmark picks its own prefix and model."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GENDERSCORE_KEY_PREFIX", "GENDERSCORE_MODEL")
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=bench_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc


def only_json(folder: Path) -> dict[str, Any]:
    files = list(folder.glob("*.json"))
    assert len(files) == 1, files
    result: dict[str, Any] = json.loads(files[0].read_text())
    return result


def assert_no_keys(client: redis.Redis, prefix: str) -> None:
    assert prefix.startswith("gsbench-")
    assert list(client.scan_iter(match=f"{prefix}:*", count=1000)) == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pictures and model, made by the first test and reused by the second."""
    return tmp_path_factory.mktemp("bench-work")


def test_quick_benchmark_reports_every_figure(
    redis_client: redis.Redis, workdir: Path, tmp_path: Path
) -> None:
    results_dir = tmp_path / "results"
    proc = run_module(
        "bench.run", "--quick", "--results-dir", str(results_dir), "--workdir", str(workdir)
    )
    result = only_json(results_dir)

    for measure in ("local_keras", "local", "pipeline", "local_after", "naive"):
        assert result[measure]["images_per_s"] > 0, measure
        assert result[measure]["rows"] == result[measure]["pictures"], measure
        assert result[measure]["error_rows"] == 0, measure
    assert result["local"]["cold_seconds"] >= result["local"]["seconds"] > 0
    # Keras and the default runtime side by side: the smoke model's twin serves (f32).
    assert result["local_keras"]["served_by"] == "keras f32"
    assert result["local"]["served_by"].startswith("openvino ")
    assert result["agreement"]["pictures"] == result["local"]["pictures"]
    assert result["agreement"]["label_agreement"] >= 0.995
    assert result["agreement"]["median_abs_dp"] <= 1e-3
    assert result["cold"]["seconds"] > 0 and result["cold_keras"]["seconds"] > 0
    assert result["cold"]["served_by"].startswith("openvino ")
    assert result["ratios"]["twin_over_keras"] > 0
    assert result["pipeline"]["warmup"]["seconds"] > 0
    assert result["ratios"]["b_over_c"] > 0
    # (b) over the (a) runs before and after it.
    around = (result["local"]["images_per_s"] + result["local_after"]["images_per_s"]) / 2
    assert result["ratios"]["b_over_a"] == round(result["pipeline"]["images_per_s"] / around, 3)
    assert [run["pictures"] for run in result["scaling"]] == result["plan"]["sizes"]
    for run in result["scaling"]:
        rss = run["worker_peak_rss_mb"]
        assert len(rss) == run["worker_processes"] + 1 and all(v > 0 for v in rss.values())
        # One model load per process that scored, and no process loaded it twice.
        assert set(run["model_loads_by_process"].values()) == {1}
        assert 1 <= run["model_loads"] <= run["worker_processes"]
    assert result["naive"]["model_loads"] == result["naive"]["worker_processes"]
    assert result["enqueue"]["queued"] == result["enqueue"]["userids"] == 2000
    assert result["enqueue"]["per_second"] > 0
    collected = result["collect"]
    assert collected["predictions"] == 20_000 and collected["seconds"] > 0
    assert collected["info_bytes_per_prediction"] > 0 and collected["key_bytes_per_prediction"] > 0
    # CPU per picture by component, read from /proc, for (a), (b), (c) and (d).
    for measure in ("pipeline", "naive", "s3"):
        cpu = result[measure]["cpu"]
        assert set(cpu["ms_per_picture"]) == {
            "worker_main",
            "pool_processes",
            "redis_server",
            "producer",
        }, measure
        assert cpu["ms_per_picture"]["pool_processes"] > 0, measure
        assert cpu["ms_per_picture"]["worker_main"] > 0, measure
        assert 0 <= cpu["idle_share"] <= 1, measure
    assert result["pipeline"]["cpu"]["ms_per_picture"]["producer"] > 0
    assert result["local"]["cpu_ms_per_picture"] > 0 and 0 <= result["local"]["idle_share"] <= 1
    assert result["s3"]["rows"] == result["s3"]["pictures"] and result["s3"]["delay_ms"] == 20
    assert result["ratios"]["d_over_b"] > 0
    assert {t["name"].split(" ")[0] for t in result["targets"]} >= {
        "(b)/(a),",
        "(d)/(b):",
        "(b)/(c)",
        "worker",
        "model",
        "enqueue",
        "collect",
        "Redis",
    }
    assert all(isinstance(t["met"], bool) for t in result["targets"])

    for line in (
        "(a) score --local, keras",
        "(a) score --local, default",
        "cold start (worker command -> first batch recorded)",
        "(a) default runtime / keras",
        "(b) score -> workers -> collect",
        "(c) naive",
        "(b) at N",
        "(b)/(a)",
        "(b)/(c)",
        "worker peak RSS",
        "model loads",
        "enqueue 2,000 userids",
        "collect 20,000 predictions",
        "Redis bytes",
        "(d) (b) from S3",
        "CPU ms per picture",
        "(b) worker main process, CPU ms per picture",
        "(b) machine idle share",
    ):
        assert line in proc.stdout, line
    assert_no_keys(redis_client, result["settings"]["key_prefix"])


def test_quick_tuning_runs(redis_client: redis.Redis, workdir: Path, tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    proc = run_module(
        "bench.tune",
        "--quick",
        "--n",
        "60",
        "--configs",
        "default",
        "--batches",
        "16",
        "--tf-threads",
        "1",
        "--collect",
        "5000",
        "--results-dir",
        str(results_dir),
        "--workdir",
        str(workdir),
    )
    result = only_json(results_dir)
    assert [row["name"] for row in result["configs"]] == ["default"]
    assert result["configs"][0]["images_per_s"] > 0
    assert result["inference"] and all(row["ms_per_picture"] > 0 for row in result["inference"])
    assert result["decode"]["ms_with_draft"] > 0
    assert set(result["collect_pages"]["seconds_by_scan_count"]) == {"100", "1000", "5000", "20000"}
    assert "default" in proc.stdout and "forward pass" in proc.stdout
    assert_no_keys(redis_client, result["key_prefix"])


def test_a_commands_peak_memory_is_its_own_not_the_benchmarks(tmp_path: Path) -> None:
    # Linux starts an exec'd child's ru_maxrss at its spawner's RSS: a benchmark grown
    # to 600 MB would report every command after as at least 600 MB.
    from bench.procs import genderscore, memory_kib

    grown = bytearray(b"\1") * (600 * 2**20)  # written, so resident
    assert memory_kib(os.getpid())["VmRSS"] > 600 * 1024
    result = genderscore(["--help"], bench_env(), tmp_path, timeout=60).check("genderscore --help")
    assert 10 < result.max_rss_mb < 400, result.max_rss_mb
    del grown
