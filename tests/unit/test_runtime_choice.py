"""Choosing the twin's precision, and keeping OpenVINO out of the worker's parent."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import ROOT, worker_env
from worker.model import ModelError
from worker.runtime import PrecisionCheck, TwinMetadata, choose_precision, passes

GOOD = {"passed": True, "file": "m.onnx", "sha256": "a" * 64, "pictures": 500}


def twin(**precisions: dict[str, Any]) -> TwinMetadata:
    return TwinMetadata.model_validate(
        {"runtime": "openvino", "input_shape": [None, 150, 150, 3], "precisions": precisions}
    )


def test_thresholds() -> None:
    assert passes("bf16", 0.995, 1e-3, 0.5, 200) == ""
    assert "labels agree 99.40%" in passes("bf16", 0.994, 1e-4, 0.01, 500)
    assert "median |dp| 2.0e-03 > 1e-03" in passes("int8", 0.999, 2e-3, 0.01, 500)
    assert "only 199 calibration pictures" in passes("int8", 1.0, 0.0, 0.0, 199)
    assert passes("f32", 1.0, 0.0, 1e-5, 10) == ""  # f32 is exact: no minimum count
    assert "max |dp| 2.0e-05 > 1e-05" in passes("f32", 1.0, 0.0, 2e-5, 500)


def test_auto_takes_the_fastest_precision_that_passed_and_runs_natively() -> None:
    failed = {
        "passed": False,
        "pictures": 500,
        "label_agreement": 0.99,
        "median_abs_dp": 2e-3,
        "max_abs_dp": 0.1,
        "reason": "labels agree 99.00% < 99.5%",
    }
    both = twin(f32=GOOD, bf16=GOOD, int8=GOOD | {"file": "m.int8.onnx"})
    assert choose_precision(both, "auto", ["FP32", "BF16", "INT8"]) == "int8"
    assert (
        choose_precision(twin(f32=GOOD, bf16=GOOD, int8=failed), "auto", ["FP32", "BF16", "INT8"])
        == "bf16"
    )
    # No native bf16 (e.g. AVX2 only): OpenVINO would run f32, so auto does not pick it.
    assert choose_precision(twin(f32=GOOD, bf16=GOOD), "auto", ["FP32", "INT8"]) == "f32"
    assert choose_precision(both, "f32", ["FP32"]) == "f32"


def test_auto_takes_the_fastest_measured_at_export_when_every_candidate_was_timed() -> None:
    native = ["FP32", "BF16", "INT8"]
    int8 = GOOD | {"file": "m.int8.onnx"}
    # An AVX2 CPU without VNNI: int8's quantize steps cost more than they save.
    timed = twin(f32=GOOD | {"ms_per_picture": 3.1}, int8=int8 | {"ms_per_picture": 3.4})
    assert choose_precision(timed, "auto", native) == "f32"
    timed = twin(f32=GOOD | {"ms_per_picture": 3.1}, int8=int8 | {"ms_per_picture": 1.2})
    assert choose_precision(timed, "auto", native) == "int8"
    # bf16 passed its check but could not be timed where it was exported (no native
    # bf16 there): no speed to compare, so the kinds' order decides.
    untimed = twin(
        f32=GOOD | {"ms_per_picture": 3.1},
        bf16=GOOD | {"ms_per_picture": None},
        int8=int8 | {"ms_per_picture": 3.4},
    )
    assert choose_precision(untimed, "auto", native) == "int8"
    assert choose_precision(untimed, "auto", ["FP32", "BF16"]) == "bf16"


def test_an_explicit_precision_must_have_passed_and_be_native() -> None:
    failed = PrecisionCheck(
        passed=False,
        pictures=800,
        label_agreement=0.9925,
        median_abs_dp=6.4e-4,
        max_abs_dp=8e-3,
        reason="labels agree 99.25% < 99.5%",
    )
    with pytest.raises(ModelError, match=r"bf16 refused: .*labels agree 99.25 %.*800 pictures"):
        choose_precision(twin(f32=GOOD, bf16=failed.model_dump()), "bf16", ["FP32", "BF16"])
    with pytest.raises(ModelError, match="not checked at int8"):
        choose_precision(twin(f32=GOOD), "int8", ["FP32", "INT8"])
    with pytest.raises(ModelError, match="does not run bf16 natively"):
        choose_precision(twin(f32=GOOD, bf16=GOOD), "bf16", ["FP32", "INT8"])


def test_twin_metadata_is_checked() -> None:
    with pytest.raises(ValueError, match="file"):
        twin(f32=GOOD | {"file": "../elsewhere/m.onnx"})
    with pytest.raises(ValueError, match="input_shape"):
        TwinMetadata.model_validate(
            {"runtime": "openvino", "input_shape": [None, 150, 150, 4], "precisions": {}}
        )


def test_worker_parent_imports_neither_openvino_nor_tensorflow() -> None:
    # pandas too: the pool processes fork from this parent and carry what it imported
    # (80 MB each, and a second of the cold start, for a collector they never run).
    code = (
        "import sys, worker, worker.tasks, worker.runtime;"
        "from worker.celery import app; app.loader.import_default_modules();"
        "from worker.model import check_model_file;"
        "bad = [m for m in ('tensorflow', 'keras', 'openvino', 'pandas') if m in sys.modules];"
        "import producer.cli;"
        "bad += [m for m in ('tensorflow', 'keras', 'openvino') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
