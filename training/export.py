"""Compiling a model's twin: ``<name>.h5`` -> ``<name>.onnx`` (+ ``<name>.int8.onnx``), checked.

``export_twin`` is called by ``genderscore export`` and at the end of ``genderscore
train``. It converts the Keras model to ONNX (Keras' own ``model.export``), quantizes
it to int8 when asked (ONNX Runtime's static quantization, calibrated on the
calibration pictures), and checks every precision the way a worker will serve it
(``worker.runtime.compile_twin``: OpenVINO at f32, bf16 or int8) against Keras f32 on
the calibration pictures: label agreement, median and max |dp|. The figures, each
passing file's name and sha256 go into ``<name>.json`` under ``twin``; files are
written first and the metadata last, so a worker never reads metadata naming a twin
that is not there yet. A precision that fails keeps its figures and gets no file.

Calibration pictures are the training run's validation split, or a folder of pictures
like those that will be scored (``--calibration DIR``), decoded by ``worker.preprocess``
and fed as a worker feeds them (``worker.scoring.predict_pixels``): Keras gets the
scaled arrays, the twin the same uint8 pixels with the same factor applied in its graph.

TensorFlow, tf2onnx, ONNX Runtime and OpenVINO are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.files import write_atomic
from worker.ids import PICTURE_EXTENSIONS
from worker.model import (
    BARE_H5_DEFAULTS,
    METADATA_FORMAT,
    ModelError,
    _keras_load,
    check_h5_config,
    configure_tensorflow,
    metadata_path,
    read_metadata,
    read_model_file,
    verify_model_bytes,
)
from worker.preprocess import PictureError, load_picture, pixels, scale
from worker.runtime import (
    PRECISIONS,
    TWIN_RUNTIME,
    Precision,
    PrecisionCheck,
    TwinMetadata,
    choose_precision,
    compile_twin,
    cpu_capabilities,
    native_precisions,
    passes,
)
from worker.scoring import predict_pixels
from worker.settings import cpu_count

log = logging.getLogger(__name__)

BATCH = 16
MAX_CALIBRATION = 2000  # pictures checked (more only costs time)
QUANTIZATION_PICTURES = 300  # pictures int8's activation ranges are fitted on
TIMED_PASSES = 4
TIMED_ROUNDS = 5


class ExportError(RuntimeError):
    """A twin that cannot be made; the message says what to do."""


def twin_names(model_path: Path) -> dict[str, Path]:
    """Where each twin file goes: ``<name>.onnx`` (f32, bf16) and ``<name>.int8.onnx``."""
    return {
        "f32": model_path.with_suffix(".onnx"),
        "int8": model_path.with_name(f"{model_path.stem}.int8.onnx"),
    }


def calibration_pictures(
    folder: Path, size: tuple[int, int], limit: int = MAX_CALIBRATION
) -> NDArray[np.uint8]:
    """Up to ``limit`` pictures of ``folder`` (sorted by name) as the worker decodes them
    (``worker.preprocess.pixels``, uint8) at ``size`` (height, width); unreadable pictures
    are skipped."""
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in PICTURE_EXTENSIONS and p.is_file()
    )
    arrays: list[NDArray[np.uint8]] = []
    skipped: list[str] = []
    for path in files:
        if len(arrays) >= limit:
            break
        try:
            arrays.append(pixels(load_picture(path), (size[1], size[0])))
        except PictureError as exc:
            skipped.append(f"{path.name} ({exc.kind})")
    if skipped:
        log.warning("calibration: %d pictures skipped, e.g. %s", len(skipped), skipped[0])
    if not arrays:
        raise ExportError(f"no readable picture in {folder} to calibrate and check the twin")
    return np.stack(arrays)


def _predict(model: Any, pictures: NDArray[np.uint8]) -> NDArray[np.float64]:
    """Outputs as a worker computes them (``worker.scoring.predict_pixels``): Keras on
    the scaled pixels, the twin on the pixels themselves."""
    return predict_pixels(model, pictures, BATCH)


def _ms_per_picture(model: Any, pictures: NDArray[np.uint8]) -> float:
    """Median of ``TIMED_ROUNDS`` rounds of ``TIMED_PASSES`` full batches (the median: a
    shared machine's noise hits single rounds)."""
    batch = pictures[:BATCH]
    if len(batch) < BATCH:  # time a full batch even with few pictures
        batch = np.resize(batch, (BATCH, *batch.shape[1:]))
    _predict(model, batch)
    rounds = []
    for _ in range(TIMED_ROUNDS):
        started = time.perf_counter()
        for _ in range(TIMED_PASSES):
            _predict(model, batch)
        rounds.append((time.perf_counter() - started) / (TIMED_PASSES * BATCH) * 1000)
    return round(float(np.median(rounds)), 3)


def _check(
    precision: Precision,
    model: Any,
    reference: NDArray[np.float64],
    pictures: NDArray[np.uint8],
    threshold: float,
    file: Path,
    sha: str,
    emulated: bool = False,
) -> PrecisionCheck:
    """Figures of one compiled precision against Keras f32 on the calibration pictures;
    its speed unless ``emulated`` (then it is not what the precision would cost)."""
    values = _predict(model, pictures)
    diff = np.abs(values - reference)
    agreement = float(np.mean((values >= threshold) == (reference >= threshold)))
    median, largest = float(np.median(diff)), float(np.max(diff))
    problem = passes(precision, agreement, median, largest, len(pictures))
    return PrecisionCheck(
        passed=not problem,
        file=None if problem else file.name,
        sha256=None if problem else sha,
        pictures=len(pictures),
        label_agreement=round(agreement, 6),
        median_abs_dp=float(f"{median:.3e}"),
        max_abs_dp=float(f"{largest:.3e}"),
        ms_per_picture=None if emulated else _ms_per_picture(model, pictures),
        emulated=emulated,
        reason=problem,
    )


def round_to_bf16(graph: Any) -> None:
    """Emulate OpenVINO's bf16 on a CPU without it: round both inputs (activations and
    weights) of every convolution and matrix product to bf16, accumulate in f32, as AMX
    and AVX-512 BF16 do. The f32 CPU plugin keeps these conversion pairs (checked: they
    change the outputs by bf16's rounding), so the figures are bf16's, not f32's."""
    import openvino
    import openvino.opset13 as ops

    for op in list(graph.get_ops()):
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        for index in (0, 1):
            source = op.input_value(index)
            rounded = ops.convert(ops.convert(source, openvino.Type.bf16), openvino.Type.f32)
            op.input(index).replace_source_output(rounded.output(0))
    graph.validate_nodes_and_infer_types()


def _to_onnx(model: Any, size: tuple[int, int], target: Path) -> bytes:
    """The Keras model as ONNX (``model.export``, tf2onnx under the hood)."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, size[0], size[1], 3), tf.float32, name="pictures")]
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its INFO lines are per pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probing numpy
            model.export(str(target), format="onnx", verbose=False, input_signature=signature)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs genderscore[train] ({exc})") from None
    return target.read_bytes()


def _to_int8(f32_file: Path, pictures: NDArray[np.uint8], folder: Path) -> bytes:
    """Static int8 quantization (QDQ: per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step = max(1, len(pictures) // QUANTIZATION_PICTURES)
    sample = pictures[::step][:QUANTIZATION_PICTURES]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(
                {"pictures": scale(sample[i : i + BATCH])} for i in range(0, len(sample), BATCH)
            )

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self._batches, None)

    prepared, quantized = folder / "prepared.onnx", folder / "int8.onnx"
    quant_pre_process(str(f32_file), str(prepared))
    quantize_static(
        str(prepared),
        str(quantized),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return quantized.read_bytes()


def _versions() -> dict[str, str]:
    found = {}
    for name in ("openvino", "onnxruntime", "tf2onnx", "tensorflow", "keras"):
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def export_twin(
    model_path: Path,
    pictures: NDArray[np.uint8] | None = None,
    calibration_dir: Path | None = None,
    precisions: Sequence[str] | None = None,
    calibration_source: str = "",
) -> dict[str, Any]:
    """Write the twin of ``model_path`` and record it in its metadata; return the metadata.

    ``pictures`` (uint8 pixels as ``worker.preprocess.pixels`` gives them, e.g. the
    validation split) or ``calibration_dir`` give the calibration pictures.
    ``precisions`` (default: all) are checked; f32 is always exported: bf16 is compiled
    from it.
    """
    model_path = Path(model_path).resolve()  # a served link: the version it names
    meta = read_metadata(model_path)
    data = read_model_file(model_path)
    sha = verify_model_bytes(model_path, data, meta)  # a bare .h5 only when allowed
    check_h5_config(model_path, data)
    precisions = PRECISIONS if precisions is None else tuple(precisions)
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ExportError(f"unknown precision {', '.join(unknown)}: choose from {PRECISIONS}")
    configure_tensorflow(cpu_count())
    model = _keras_load(model_path, data)
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    if pictures is None:
        if calibration_dir is None:
            raise ExportError(
                "calibration pictures are needed to check the twin: give --calibration DIR "
                "(pictures like the ones you will score)"
            )
        pictures = calibration_pictures(calibration_dir, size)
        calibration_source = calibration_source or f"folder {calibration_dir.name}"
    if pictures.dtype != np.uint8:
        raise ExportError(
            f"calibration pictures must be uint8 pixels (worker.preprocess.pixels), "
            f"not {pictures.dtype}"
        )
    pictures = np.ascontiguousarray(pictures[:MAX_CALIBRATION])
    if pictures.shape[1:] != (size[0], size[1], 3):
        raise ExportError(f"calibration pictures are {pictures.shape[1:]}, the model takes {size}")
    threshold = meta.threshold if meta else float(BARE_H5_DEFAULTS["threshold"])
    reference = _predict(model, pictures)
    keras_ms = _ms_per_picture(model, pictures)
    capabilities = cpu_capabilities()
    native = native_precisions(capabilities)
    names = twin_names(model_path)
    checks: dict[Precision, PrecisionCheck] = {}
    threads = cpu_count()
    with tempfile.TemporaryDirectory(prefix="genderscore-export-") as tmp:
        folder = Path(tmp)
        f32_bytes = _to_onnx(model, size, folder / "f32.onnx")
        files: dict[str, bytes] = {"f32": f32_bytes}
        for precision in [p for p in PRECISIONS if p == "f32" or p in precisions]:
            # Without native bf16 OpenVINO silently runs f32: bf16 is emulated instead,
            # its figures recorded, its speed not (there is none to measure here).
            emulated = precision == "bf16" and precision not in native
            if precision not in native and not emulated:
                checks[precision] = PrecisionCheck(
                    passed=False,
                    reason=f"not measured: this CPU ({_cpu_model()}) has no native {precision}",
                )
                continue
            if precision == "int8":
                files["int8"] = _to_int8(folder / "f32.onnx", pictures, folder)
            source = files["int8" if precision == "int8" else "f32"]
            compiled = compile_twin(
                model_path,
                source,
                "f32" if emulated else precision,
                size,
                threads,
                edit=round_to_bf16 if emulated else None,
            )
            file = names["int8" if precision == "int8" else "f32"]
            checks[precision] = _check(
                precision,
                compiled,
                reference,
                pictures,
                threshold,
                file,
                _sha256(source),
                emulated,
            )
            log.info("twin %s: %s", precision, checks[precision].figures())
        if not checks["f32"].passed:
            raise ExportError(
                f"the ONNX export does not match Keras: {checks['f32'].figures()} "
                f"({checks['f32'].reason}); no twin written"
            )
        write_atomic(names["f32"], files["f32"])
        if checks.get("int8") is not None and checks["int8"].passed:
            write_atomic(names["int8"], files["int8"])
        else:
            names["int8"].unlink(missing_ok=True)  # a stale one would only confuse
    twin = TwinMetadata(
        runtime=TWIN_RUNTIME,
        input_shape=(None, size[0], size[1], 3),
        precisions=checks,
    )
    record = twin.model_dump(mode="json") | {
        "calibration": {"source": calibration_source, "pictures": len(pictures)},
        "exported_on": {
            "cpu": _cpu_model(),
            "capabilities": capabilities,
            "threads": threads,
            "keras_ms_per_picture": keras_ms,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **_versions(),
        },
    }
    return _write_metadata(model_path, sha, size, record)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_metadata(
    model_path: Path, sha: str, size: tuple[int, int], twin: dict[str, Any]
) -> dict[str, Any]:
    """The model's metadata with ``twin`` set, written atomically (fields kept as they are).

    A bare origin ``.h5`` (exported under GENDERSCORE_ALLOW_UNVERIFIED_MODEL) gets the
    origin's defaults, its sha256 and input size.
    """
    meta_file = metadata_path(model_path)
    try:
        current: dict[str, Any] = json.loads(meta_file.read_text())
    except FileNotFoundError:
        current = {
            "format": METADATA_FORMAT,
            **BARE_H5_DEFAULTS,
            "input_size": list(size),
            "note": "bare .h5 exported under GENDERSCORE_ALLOW_UNVERIFIED_MODEL: origin defaults",
        }
    current["sha256"] = sha
    current["twin"] = twin
    write_atomic(meta_file, (json.dumps(current, indent=2, sort_keys=True) + "\n").encode())
    return current


def describe(meta: dict[str, Any]) -> list[str]:
    """Lines for a person: each precision's figures and what ``auto`` serves here."""
    twin = TwinMetadata.model_validate(meta["twin"])
    lines = []
    for precision in PRECISIONS:
        check = twin.precisions.get(precision)
        if check is None:
            continue
        verdict = f"passed -> {check.file}" if check.passed else f"refused ({check.reason})"
        speed = f", {check.ms_per_picture} ms/picture" if check.ms_per_picture else ""
        lines.append(f"{precision:>5}: {check.figures()}{speed}: {verdict}")
    keras_ms = meta["twin"].get("exported_on", {}).get("keras_ms_per_picture")
    if keras_ms:
        lines.append(f"keras: {keras_ms} ms/picture (f32, the reference)")
    try:
        chosen = choose_precision(twin, "auto", cpu_capabilities())
        served_ms = twin.precisions[chosen].ms_per_picture
        if keras_ms and served_ms:
            # The bar: never slower than Keras. Said here, where both were timed.
            lines.append(
                f"GENDERSCORE_PRECISION=auto serves {chosen} on this CPU: "
                f"{keras_ms / served_ms:.2f}x Keras' speed here"
                + ("" if served_ms <= keras_ms else " (SLOWER than Keras on this CPU)")
            )
        else:
            lines.append(f"GENDERSCORE_PRECISION=auto serves {chosen} on this CPU")
    except ModelError as exc:
        lines.append(f"no precision can serve: {exc}")
    return lines
