"""The compiled twin: export and its figures, verification, refusals, and real workers
that serve it without TensorFlow (issue 11)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from producer.cli import main
from tests.helpers import ROOT, celery_worker, make_model_file, make_pictures, worker_env
from training.sample import make_sample
from worker.model import ModelError, load_bundle
from worker.settings import settings

FALLBACK_LINE = "serving with Keras, not its twin"
# What a process that imported TensorFlow maps (OpenVINO's own TF *frontend* is not it).
TENSORFLOW_LIBRARIES = ("libtensorflow_framework", "_pywrap_tensorflow_internal")


def read_meta(model: Path) -> dict[str, Any]:
    return json.loads(model.with_suffix(".json").read_text())  # type: ignore[no-any-return]


def copy_model(model: Path, folder: Path) -> Path:
    """The model, its metadata and its twin files, copied to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in model.parent.glob(f"{model.stem}.*"):
        shutil.copy(path, folder / path.name)
    return folder / model.name


def replace_twin(model: Path, data: bytes) -> None:
    """Put ``data`` in place of the f32 twin and record its sha256, as an attacker or a
    broken tool with write access to both files would."""
    meta = read_meta(model)
    entry = meta["twin"]["precisions"]["f32"]
    (model.parent / entry["file"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    model.with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """300 labelled pictures in the course layout."""
    return make_sample(tmp_path_factory.mktemp("runtime-data"), count=300, size=(48, 48))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 pictures of the same kind, none used for training."""
    folder = tmp_path_factory.mktemp("calibration")
    make_pictures(folder, 240, start=5000, size=(48, 48))
    return folder


@pytest.fixture(scope="module")
def trained(sample: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained by ``training.train.train``: .h5, metadata and its twin."""
    from training.train import train

    images, labels = sample
    out = tmp_path_factory.mktemp("runtime-model") / "small.h5"
    train(images, labels, out, epochs=2, image_size=32, kernel_size=3, val_fraction=0.2)
    return out


@pytest.fixture()
def allow(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set runtime settings of this test process for one test."""

    def set_(runtime: str = "auto", precision: str = "auto") -> None:
        monkeypatch.setattr(settings, "runtime", runtime)
        monkeypatch.setattr(settings, "precision", precision)

    return set_


# --- export -------------------------------------------------------------------------


def test_train_writes_the_twin_with_its_figures(trained: Path) -> None:
    meta = read_meta(trained)
    twin = meta["twin"]
    assert twin["runtime"] == "openvino" and twin["input_shape"] == [None, 32, 32, 3]
    assert twin["calibration"]["source"].startswith("validation split (60 users)")
    f32 = twin["precisions"]["f32"]
    assert f32["passed"] and f32["pictures"] == 60
    assert f32["max_abs_dp"] <= 1e-5 and f32["label_agreement"] == 1.0
    data = (trained.parent / f32["file"]).read_bytes()
    assert f32["file"] == "small.onnx" and hashlib.sha256(data).hexdigest() == f32["sha256"]
    # 60 validation pictures cannot show 99.5 % agreement: measured, refused, no file.
    for precision in ("bf16", "int8"):
        check = twin["precisions"][precision]
        assert not check["passed"] and check["file"] is None, check
        if check["label_agreement"] is not None:  # measured where the CPU runs it
            assert check["median_abs_dp"] is not None and check["max_abs_dp"] is not None
            assert "only 60 calibration pictures" in check["reason"]
    assert not (trained.parent / "small.int8.onnx").exists()
    assert meta["sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()


def test_export_command_checks_each_precision_on_calibration_pictures(
    trained: Path, calibration: Path, tmp_path: Path
) -> None:
    model = copy_model(trained, tmp_path)
    result = CliRunner().invoke(main, ["export", str(model), "--calibration", str(calibration)])
    assert result.exit_code == 0, result.output
    twin = read_meta(model)["twin"]
    assert twin["calibration"] == {"source": f"folder {calibration.name}", "pictures": 240}
    lines = result.output.splitlines()
    assert any(line.strip().startswith("f32: labels agree 100.00 %") for line in lines), lines
    assert "GENDERSCORE_PRECISION=auto serves" in result.output
    from worker.runtime import cpu_capabilities

    f32, bf16 = twin["precisions"]["f32"], twin["precisions"]["bf16"]
    if "BF16" in cpu_capabilities():  # measured for real, timed
        assert not bf16["emulated"] and bf16["ms_per_picture"] is not None
    else:  # OpenVINO would run f32: bf16 is emulated, its figures kept, no speed
        assert bf16["emulated"] and bf16["ms_per_picture"] is None
        assert "emulated" in result.output
    # bf16 rounding (8 bits of mantissa) shows; f32 differs from Keras by rounding only.
    assert bf16["max_abs_dp"] > 100 * f32["max_abs_dp"] and bf16["max_abs_dp"] > 1e-5
    for precision, check in twin["precisions"].items():
        assert check["pictures"] in (0, 240)
        if check["passed"]:
            assert check["label_agreement"] >= 0.995 and check["median_abs_dp"] <= 1e-3
            file = tmp_path / check["file"]
            assert hashlib.sha256(file.read_bytes()).hexdigest() == check["sha256"]
            assert f"{precision}: " in result.output and f"passed -> {file.name}" in result.output
        else:
            assert check["reason"] and f"refused ({check['reason']})" in result.output


def test_export_without_calibration_or_of_a_bare_h5_is_refused(
    trained: Path, calibration: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(trained)])
    assert result.exit_code != 0 and "--calibration" in result.output
    bare = tmp_path / "origin.h5"
    shutil.copy(trained, bare)
    cmd = [sys.executable, "-m", "producer.cli", "export", str(bare), "--calibration"]
    proc = subprocess.run(
        [*cmd, str(calibration)], cwd=ROOT, env=worker_env(), capture_output=True, text=True
    )
    assert proc.returncode == 5 and "GENDERSCORE_ALLOW_UNVERIFIED_MODEL" in proc.stderr
    assert "Traceback" not in proc.stderr and not bare.with_suffix(".json").exists()
    proc = subprocess.run(
        [*cmd, str(calibration), "--precision", "f32"],
        cwd=ROOT,
        env=worker_env({"GENDERSCORE_ALLOW_UNVERIFIED_MODEL": "true"}),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    meta = read_meta(bare)  # the origin's defaults, now with the file's sha256 and a twin
    assert meta["positive_class"] == "male" and meta["input_size"] == [32, 32]
    assert meta["sha256"] == hashlib.sha256(bare.read_bytes()).hexdigest()
    assert meta["twin"]["precisions"]["f32"]["passed"]
    assert set(meta["twin"]["precisions"]) == {"f32"}


# --- loading: verified, refused, fallback -------------------------------------------


def test_f32_twin_scores_within_1e_5_of_keras(trained: Path, calibration: Path, allow: Any) -> None:
    from worker.preprocess import load_picture, pixels, scale
    from worker.scoring import predict_pixels

    decoded = np.stack([pixels(load_picture(p), (32, 32)) for p in sorted(calibration.iterdir())])
    allow("keras")
    keras_bundle = load_bundle(trained, 1)
    allow("openvino", "f32")
    twin_bundle = load_bundle(trained, 1)
    assert (keras_bundle.runtime, twin_bundle.runtime) == ("keras", "openvino")
    assert twin_bundle.precision == "f32" and twin_bundle.input_size == (32, 32)
    expected = np.asarray(keras_bundle.model.predict_on_batch(scale(decoded))).reshape(-1)
    # What a worker runs: the twin gets the uint8 pixels and scales them in its graph ...
    served = predict_pixels(twin_bundle.model, decoded, 16)
    assert np.max(np.abs(served - expected)) <= 1e-5
    assert np.max(np.abs(predict_pixels(keras_bundle.model, decoded, 16) - expected)) == 0.0
    # ... and, like Keras, it takes the scaled arrays too.
    got = np.asarray(twin_bundle.model.predict_on_batch(scale(decoded))).reshape(-1)
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert len(np.unique(np.round(expected, 3))) > 10  # a model whose outputs vary


def test_twin_with_a_changed_sha256_is_refused_and_auto_falls_back_once(
    trained: Path, tmp_path: Path, allow: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = copy_model(trained, tmp_path)
    twin = model.with_suffix(".onnx")
    twin.write_bytes(twin.read_bytes() + b"\0")
    allow("openvino")
    with pytest.raises(ModelError, match="sha256 .* does not match the model's metadata"):
        load_bundle(model, 1)
    allow("auto")
    with caplog.at_level("WARNING", logger="worker.runtime"):
        bundle = load_bundle(model, 1)
    assert bundle.runtime == "keras"
    fallbacks = [r.getMessage() for r in caplog.records if FALLBACK_LINE in r.getMessage()]
    assert len(fallbacks) == 1 and "does not match" in fallbacks[0]


def test_twin_with_custom_operators_is_refused(trained: Path, tmp_path: Path, allow: Any) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Backdoor", ["pictures"], ["p"], domain="com.example.custom")],
        "custom",
        [helper.make_tensor_value_info("pictures", TensorProto.FLOAT, ["n", 32, 32, 3])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 1])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("com.example.custom", 1)],
    )
    model = copy_model(trained, tmp_path)
    replace_twin(model, proto.SerializeToString())
    onnx.checker.check_model(proto)  # a well-formed file: refused for its operator only
    allow("openvino")
    with pytest.raises(ModelError, match="custom"):
        load_bundle(model, 1)


def test_twin_of_another_input_shape_is_refused(
    trained: Path, calibration: Path, tmp_path: Path, allow: Any
) -> None:
    from training.export import export_twin

    other = make_model_file(tmp_path / "other" / "wide.h5", image_size=40)
    export_twin(other, calibration_dir=calibration, precisions=["f32"])
    model = copy_model(trained, tmp_path / "model")
    replace_twin(model, other.with_suffix(".onnx").read_bytes())
    allow("openvino")
    with pytest.raises(ModelError, match=r"takes input \[\?,40,40,3\], but the .h5 takes"):
        load_bundle(model, 1)


def test_a_precision_that_failed_is_refused_with_its_figures(
    trained: Path, tmp_path: Path, allow: Any
) -> None:
    allow("openvino", "int8")
    with pytest.raises(ModelError, match=r"GENDERSCORE_PRECISION=int8 refused: .*60 pictures"):
        load_bundle(trained, 1)


# --- real workers ---------------------------------------------------------------------


def _worker_start_fails(env: dict[str, str], log: Path) -> str:
    with pytest.raises(RuntimeError, match="worker exited") as info:  # noqa: SIM117
        with celery_worker("score", concurrency=1, extra_env=env, log_path=log, name="rt"):
            pass
    return str(info.value)


def test_explicit_runtime_with_a_missing_or_changed_twin_stops_the_worker_at_start(
    trained: Path, tmp_path: Path
) -> None:
    model = copy_model(trained, tmp_path / "missing")
    model.with_suffix(".onnx").unlink()
    env = {"GENDERSCORE_MODEL": str(model), "GENDERSCORE_RUNTIME": "openvino"}
    message = _worker_start_fails(env, tmp_path / "missing.log")
    assert "genderscore: twin" in message and "is missing" in message
    model = copy_model(trained, tmp_path / "changed")
    twin = model.with_suffix(".onnx")
    twin.write_bytes(twin.read_bytes()[:-1] + b"\1")
    env["GENDERSCORE_MODEL"] = str(model)
    message = _worker_start_fails(env, tmp_path / "changed.log")
    assert "sha256 does not match" in message


def _score_with_worker(
    model: Path, pictures: Path, tmp_path: Path, concurrency: int, env: dict[str, str]
) -> tuple[list[dict[str, str]], str, dict[int, str]]:
    """Score ``pictures`` through a real worker of its own key prefix; return the CSV's
    rows, the worker's log and each pool process's memory map, read before it stops."""
    env = {"GENDERSCORE_KEY_PREFIX": f"gsrt{os.getpid()}", "GENDERSCORE_MODEL": str(model), **env}
    log, out = tmp_path / "worker.log", tmp_path / "scored.csv"
    with celery_worker("score", concurrency, extra_env=env, log_path=log, name="rt") as proc:
        cmd = [sys.executable, "-m", "producer.cli", "score", str(pictures), "--model"]
        done = subprocess.run(
            [*cmd, str(model), "--wait", "--out", str(out), "--timeout", "120"],
            cwd=ROOT,
            env=worker_env(env),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in _children(proc.pid)}
    client = redis.Redis.from_url(settings.redis_url)
    for key in client.scan_iter(match=f"{env['GENDERSCORE_KEY_PREFIX']}:*", count=1000):
        client.delete(key)
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, log.read_text(errors="replace"), maps


def _children(pid: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and Path(f"/proc/{p}/stat").exists() and _parent(int(p)) == pid
        ]
        if found:
            return found
        time.sleep(0.2)
    return []


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def test_pool_processes_serve_the_twin_without_tensorflow(
    trained: Path, calibration: Path, tmp_path: Path
) -> None:
    rows, log, maps = _score_with_worker(trained, calibration, tmp_path, 2, {})
    assert len(rows) == 240
    assert len(maps) == 2
    for pid, text in maps.items():
        assert "libopenvino" in text, pid  # the twin served ...
        assert not any(lib in text for lib in TENSORFLOW_LIBRARIES), pid  # ... without TF
    loaded = [line for line in log.splitlines() if "model loaded:" in line]
    assert loaded and all("runtime=openvino" in line for line in loaded)
    assert all("tensorflow=not loaded" in line for line in loaded)


def test_auto_falls_back_to_keras_with_one_log_line(
    trained: Path, calibration: Path, tmp_path: Path
) -> None:
    model = copy_model(trained, tmp_path / "model")
    twin = model.with_suffix(".onnx")
    twin.write_bytes(twin.read_bytes() + b"\0")
    rows, log, maps = _score_with_worker(model, calibration, tmp_path, 1, {})
    assert len(rows) == 240
    fallbacks = [line for line in log.splitlines() if FALLBACK_LINE in line]
    assert len(fallbacks) == 1 and "does not match" in fallbacks[0], fallbacks
    assert any("runtime=keras" in line for line in log.splitlines() if "model loaded:" in line)
    assert all(any(lib in text for lib in TENSORFLOW_LIBRARIES) for text in maps.values())


def test_score_local_serves_the_twin_without_importing_tensorflow(
    trained: Path, calibration: Path, tmp_path: Path
) -> None:
    out = tmp_path / "local.csv"
    code = (
        "import sys; from producer.cli import main\n"
        f"main(['score', {str(calibration)!r}, '--local', '--model', {str(trained)!r}, "
        f"'--out', {str(out)!r}], standalone_mode=False)\n"
        "print('tensorflow' in sys.modules, 'openvino' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=worker_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False True"
    with out.open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 240
