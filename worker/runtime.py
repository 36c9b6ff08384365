"""Which runtime serves a model: its compiled twin (OpenVINO) or Keras, once per process.

A model ``<name>.h5`` may have a compiled twin beside it, written by ``genderscore
export`` (or ``genderscore train``): ``<name>.onnx`` (the network at f32, served at f32
or bf16) and, when int8 passed its check, ``<name>.int8.onnx``. ``<name>.json`` records
under ``twin`` each precision's file, sha256 and its agreement with Keras f32 on the
calibration pictures. The ``.h5`` stays the model of record: a twin is used only
through the verified metadata of that ``.h5``.

Choosing (``GENDERSCORE_RUNTIME``, ``GENDERSCORE_PRECISION``):
- ``auto``: the twin when it is recorded, its sha256 matches and it loads; otherwise
  Keras, and the reason is logged once per load. ``keras``: Keras. ``openvino``: the
  twin, or a ``ModelError`` (the worker does not start: ``check_runtime`` runs in
  ``worker.model.check_model_file``).
- precision ``auto``: of the precisions that passed at export and that this CPU runs
  natively, the fastest measured at export (``ms_per_picture``); when one of them could
  not be timed there (a precision the exporting CPU lacks), the first of int8, bf16,
  f32. An explicit precision must have passed; one that failed is refused with its
  figures.
- A twin is refused, whatever the settings, when its bytes do not match the recorded
  sha256, when it holds operators outside OpenVINO's standard opsets (custom
  operators), or when its input shape differs from the ``.h5``'s.

Serving: the twin takes the uint8 pixels of ``worker.preprocess.pixels`` and multiplies
them by ``worker.preprocess.PIXEL_SCALE`` as the first step of its graph
(``with_pixel_input``), which OpenVINO folds into the first convolution; it is
compiled for one pool process's threads with its precision explicit
(``serving_config``) and warmed up by one pass at load.

OpenVINO, like TensorFlow, is imported inside functions only: the worker's parent
process must not start its threads before the pool forks. ``check_runtime`` needs
neither.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.model import (
    MAX_INPUT_SIDE,
    ModelError,
    ModelMetadata,
    file_sha256,
    read_metadata,
)
from worker.preprocess import PIXEL_SCALE
from worker.settings import settings

log = logging.getLogger(__name__)

TWIN_RUNTIME = "openvino"
Precision = Literal["f32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("f32", "bf16", "int8")
# Fastest first where AVX-512 VNNI/BF16 or AMX run them (docs/performance.md: int8 1.2,
# bf16 1.9, f32 3.9 ms per picture on an AMD EPYC Zen 4, 1 thread): what precision
# "auto" takes when the export could not time every candidate.
SPEED_ORDER: tuple[Precision, ...] = ("int8", "bf16", "f32")
# What a precision must reach against Keras f32 on the calibration pictures.
MIN_LABEL_AGREEMENT = 0.995
MAX_MEDIAN_ABS_DP = 1e-3
MAX_F32_ABS_DP = 1e-5  # f32 is the same network: it must match Keras to rounding
# Below this many pictures one disagreement already costs more than 0.5 %.
MIN_CHECK_PICTURES = 200
# OpenVINO's OPTIMIZATION_CAPABILITIES entry each precision needs to run natively.
NATIVE_CAPABILITY: dict[Precision, str] = {"f32": "FP32", "bf16": "BF16", "int8": "INT8"}
_TWIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.onnx$"  # a file beside the .h5, no path


class PrecisionCheck(BaseModel):
    """One precision of the twin, checked against Keras f32 at export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    file: str | None = Field(None, pattern=_TWIN_NAME)  # the twin file serving it
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    pictures: int = Field(0, ge=0)
    label_agreement: float | None = None
    median_abs_dp: float | None = None
    max_abs_dp: float | None = None
    ms_per_picture: float | None = None  # on the exporting machine, batch 16
    # Checked by emulation (bf16 on a CPU without it): figures, but no speed.
    emulated: bool = False
    reason: str = ""  # why it failed or was not measured

    def figures(self) -> str:
        """``labels agree 99.40 %, median |dp| 4.1e-03, max |dp| 6.6e-02 (2,000 pictures)``."""
        if self.label_agreement is None or self.median_abs_dp is None:
            return self.reason or "not measured"
        return (
            f"labels agree {self.label_agreement * 100:.2f} %, median |dp| "
            f"{self.median_abs_dp:.1e}, max |dp| {self.max_abs_dp or 0.0:.1e} "
            f"({self.pictures:,} pictures{', emulated' if self.emulated else ''})"
        )


class TwinMetadata(BaseModel):
    """``twin`` in ``<name>.json``: the compiled twin and what each precision reached."""

    model_config = ConfigDict(extra="allow", frozen=True)

    runtime: Literal["openvino"]
    format: Literal["onnx"] = "onnx"
    input_shape: tuple[
        None,
        Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)],
        Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)],
        Literal[3],
    ]
    precisions: dict[Precision, PrecisionCheck]


def passes(
    precision: Precision, agreement: float, median_abs_dp: float, max_abs_dp: float, pictures: int
) -> str:
    """Why ``precision`` fails the thresholds with these figures; "" when it passes."""
    problems = []
    if precision == "f32" and max_abs_dp > MAX_F32_ABS_DP:
        problems.append(f"max |dp| {max_abs_dp:.1e} > {MAX_F32_ABS_DP:.0e}")
    if precision != "f32" and pictures < MIN_CHECK_PICTURES:
        problems.append(
            f"only {pictures} calibration pictures (at least {MIN_CHECK_PICTURES} measure "
            f"{MIN_LABEL_AGREEMENT:.1%} agreement)"
        )
    if agreement < MIN_LABEL_AGREEMENT:
        problems.append(f"labels agree {agreement:.2%} < {MIN_LABEL_AGREEMENT:.1%}")
    if median_abs_dp > MAX_MEDIAN_ABS_DP:
        problems.append(f"median |dp| {median_abs_dp:.1e} > {MAX_MEDIAN_ABS_DP:.0e}")
    return "; ".join(problems)


def read_twin(meta: ModelMetadata | None) -> TwinMetadata | None:
    """The twin recorded in the model's metadata, checked; None when none is recorded."""
    raw = (meta.model_extra or {}).get("twin") if meta is not None else None
    if raw is None:
        return None
    try:
        return TwinMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"twin.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ModelError(f"invalid twin metadata: {problems}") from None


def native_precisions(capabilities: list[str] | None) -> set[Precision]:
    """The precisions a CPU with OpenVINO's ``capabilities`` runs natively."""
    if capabilities is None:  # not asked (no OpenVINO here): assume every one
        return set(PRECISIONS)
    return {p for p in PRECISIONS if NATIVE_CAPABILITY[p] in capabilities}


def check_precision(value: str) -> Precision:
    """``value`` as a Precision; ValueError if it is not one."""
    for precision in PRECISIONS:
        if value == precision:
            return precision
    raise ValueError(f"unknown precision {value!r}: one of {', '.join(PRECISIONS)}")


def choose_precision(
    twin: TwinMetadata, wanted: str, capabilities: list[str] | None = None
) -> Precision:
    """The precision to serve: ``wanted`` if it passed, or the fastest that passed."""
    native = native_precisions(capabilities)
    if wanted != "auto":
        check = twin.precisions.get(wanted)  # type: ignore[call-overload]
        if check is None:
            raise ModelError(
                f"GENDERSCORE_PRECISION={wanted}: the twin was not checked at {wanted}; "
                f"export it with `genderscore export MODEL.h5 --precision {wanted}`"
            )
        if not check.passed:
            raise ModelError(
                f"GENDERSCORE_PRECISION={wanted} refused: at export it reached "
                f"{check.figures()}, against labels agreeing on >= "
                f"{MIN_LABEL_AGREEMENT:.1%} and median |dp| <= {MAX_MEDIAN_ABS_DP:.0e}"
                + (f" ({check.reason})" if check.reason else "")
            )
        if wanted not in native:
            raise ModelError(
                f"GENDERSCORE_PRECISION={wanted}: this CPU does not run {wanted} natively "
                f"(OpenVINO capabilities: {', '.join(capabilities or [])})"
            )
        return check_precision(wanted)
    candidates = [p for p in SPEED_ORDER if (c := twin.precisions.get(p)) is not None and c.passed]
    candidates = [p for p in candidates if p in native]
    speeds = {p: twin.precisions[p].ms_per_picture for p in candidates}
    if candidates and all(ms is not None for ms in speeds.values()):
        # Every candidate was timed at export: the fastest measured (int8 is not always
        # faster than f32: without VNNI its quantize steps can cost more than they save).
        return min(candidates, key=lambda p: (speeds[p] or 0.0, SPEED_ORDER.index(p)))
    if candidates:  # one could not be timed at export (not native there): by kind
        return candidates[0]
    raise ModelError(
        "no precision of the twin passed its check at export: "
        + "; ".join(f"{p}: {c.figures()}" for p, c in twin.precisions.items())
    )


def _twin_file(model_path: Path, check: PrecisionCheck) -> Path:
    if check.file is None or check.sha256 is None:
        raise ModelError(f"twin metadata of {model_path.name} names no file for a passed precision")
    return model_path.with_name(check.file)


def read_twin_bytes(model_path: Path, check: PrecisionCheck) -> bytes:
    """The twin file's bytes, refused unless their sha256 is the recorded one."""
    import hashlib

    path = _twin_file(model_path, check)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(
            f"twin {path} is missing: export it with `genderscore export {model_path}`"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read twin {path}: {exc}") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != check.sha256:
        raise ModelError(
            f"twin {path} sha256 {sha[:12]}... does not match the model's metadata "
            f"({(check.sha256 or '')[:12]}...): refused"
        )
    return data


def twin_recorded(model_path: Path) -> bool:
    """Whether the model's metadata records a twin that the settings would serve (read
    without OpenVINO; nothing verified: the load does that)."""
    if settings.runtime == "keras":
        return False
    try:
        return read_twin(read_metadata(model_path.resolve())) is not None
    except (ModelError, OSError):
        return False


def tensorflow_installed() -> bool:
    """Whether Keras' backend can be imported here (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def check_runtime(model_path: Path, meta: ModelMetadata | None) -> None:
    """At start, without OpenVINO or TensorFlow: can this model be served as configured?

    Raises ModelError when an explicit runtime or precision cannot be honoured (missing
    twin, sha256 mismatch, a precision that failed), or when neither the twin nor Keras
    could serve. Under ``auto`` a twin problem is left for the load to log.
    """
    if settings.runtime == "keras":
        if settings.precision not in ("auto", "f32"):
            raise ModelError(
                f"GENDERSCORE_PRECISION={settings.precision} needs the twin, not "
                "GENDERSCORE_RUNTIME=keras (Keras scores at f32)"
            )
        if not tensorflow_installed():
            raise ModelError(_NO_TENSORFLOW)
        return
    try:
        twin = read_twin(meta)
        if twin is None:
            raise ModelError(
                f"{model_path.name} has no compiled twin: export one with "
                f"`genderscore export {model_path} --calibration DIR`"
            )
        precision = choose_precision(twin, settings.precision)
        file = _twin_file(model_path, twin.precisions[precision])
        if not file.is_file():
            raise ModelError(f"twin {file} is missing: export it again")
        if file_sha256(file) != twin.precisions[precision].sha256:
            raise ModelError(f"twin {file} sha256 does not match the model's metadata: refused")
    except ModelError as exc:
        if settings.runtime != "auto" or settings.precision not in ("auto", "f32"):
            raise
        if not tensorflow_installed():
            raise ModelError(f"{exc}; and TensorFlow is not installed for Keras") from None


_NO_TENSORFLOW = (
    "Keras needs TensorFlow, which this install does not have: "
    "pip install 'genderscore[train]', or export the model's twin"
)


# --- serving ------------------------------------------------------------------------

_core: Any = None
_core_lock = threading.Lock()


def openvino_core() -> Any:
    """This process's OpenVINO Core (created on first use, after the fork)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def cpu_capabilities() -> list[str]:
    """OpenVINO's optimization capabilities of this CPU (FP32, BF16, INT8, ...)."""
    return [str(c) for c in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def h5_input_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) declared by an HDF5 model's config, read without TensorFlow."""
    import h5py

    with h5py.File(io.BytesIO(data), "r") as h5:
        raw = h5.attrs.get("model_config")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    found = _first_shape(config)
    if found is None or len(found) != 4 or not all(isinstance(s, int) for s in found[1:3]):
        return None
    return int(found[1]), int(found[2])


def _first_shape(node: Any) -> list[Any] | None:
    """The first ``batch_shape`` (Keras 3) or ``batch_input_shape`` (Keras 2) in a config."""
    if isinstance(node, dict):
        for key in ("batch_shape", "batch_input_shape"):
            if isinstance(node.get(key), list):
                return list(node[key])
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _first_shape(child)
        if found is not None:
            return found
    return None


class TwinModel:
    """A compiled twin: ``predict_pixels`` (what ``worker.scoring`` calls) takes the uint8
    pixels and scales them inside the graph; ``predict_on_batch`` takes float32 inputs as
    Keras does (compiled on first use: tests and tools, not the scoring path)."""

    takes_pixels = True  # worker.scoring hands it uint8 pixels, not scaled floats

    def __init__(
        self,
        graph: Any,
        config: dict[str, Any],
        path: Path,
        precision: Precision,
        input_size: tuple[int, int],
    ) -> None:
        self._graph = graph  # the twin as read (float32 input), for predict_on_batch
        self._config = config
        self._pixels = _compile(with_pixel_input(graph.clone()), config, path, precision)
        self._floats: Any = None
        self._local = threading.local()  # one infer request per thread (threads pool)
        self._lock = threading.Lock()
        self.path = path
        self.precision = precision
        # As Keras gives it: worker.model checks it the same way for both.
        self.input_shape: tuple[None, int, int, int] = (None, input_size[0], input_size[1], 3)

    def predict_pixels(self, pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Sigmoid outputs, shape (n, 1), for a (n, height, width, 3) uint8 batch: the
        pixels ``worker.preprocess.pixels`` gives, scaled by ``PIXEL_SCALE`` in the graph."""
        if pixels.dtype != np.uint8:
            raise TypeError(f"the twin takes uint8 pixels, not {pixels.dtype}")
        request = getattr(self._local, "pixels", None)
        if request is None:
            request = self._local.pixels = self._pixels.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(pixels)})
        return np.array(result[0], dtype=np.float32)  # a copy: the request reuses its buffer

    def predict_on_batch(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Sigmoid outputs, shape (n, 1), for a (n, height, width, 3) float32 batch."""
        request = getattr(self._local, "floats", None)
        if request is None:
            with self._lock:
                if self._floats is None:
                    self._floats = _compile(self._graph, self._config, self.path, self.precision)
            request = self._local.floats = self._floats.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.array(result[0], dtype=np.float32)


def with_pixel_input(graph: Any) -> Any:
    """``graph`` taking uint8 pixels: convert to float32 and multiply by ``PIXEL_SCALE``
    (the one factor ``worker.preprocess.scale`` applies) before the first layer. OpenVINO
    folds the constant into the first convolution, so no separate scaling pass runs and
    the pixels wait for their batch as uint8, a quarter of float32."""
    import openvino
    import openvino.opset13 as ops
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(graph)
    ppp.input().tensor().set_element_type(openvino.Type.u8)
    steps = ppp.input().preprocess()
    steps.convert_element_type(openvino.Type.f32)
    factor = ops.constant(np.float32(PIXEL_SCALE))
    steps.custom(lambda node: ops.multiply(node, factor).output(0))
    return ppp.build()


def serving_config(precision: Precision, threads: int) -> dict[str, Any]:
    """OpenVINO's CPU settings for one pool process serving at ``precision``.

    One stream of ``threads`` threads (the pool process's share of the cores: workers
    split ``cores / concurrency``, ``worker.model.default_tf_threads``), the latency hint
    (one batch at a time), no pinning (the pool processes of one worker would pin to the
    same cores), and the precision explicit: OpenVINO would otherwise run bf16 on a CPU
    with AMX even for an f32 twin.
    """
    return {
        # int8 lives in the graph (quantize/dequantize pairs); the rest runs at f32.
        "INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision,
        "INFERENCE_NUM_THREADS": max(1, threads),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
    }


def _compile(graph: Any, config: dict[str, Any], path: Path, precision: Precision) -> Any:
    try:
        return openvino_core().compile_model(graph, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ModelError(
            f"OpenVINO cannot compile the twin {path.name} at {precision}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from None


def compile_twin(
    model_path: Path,
    data: bytes,
    precision: Precision,
    input_size: tuple[int, int],
    threads: int,
    edit: Callable[[Any], None] | None = None,
) -> TwinModel:
    """Read a twin's bytes with OpenVINO, refuse what is not plain and shaped right, compile.

    ``edit`` changes the checked graph in place before it is compiled (the export's bf16
    emulation, ``training.export.round_to_bf16``)."""
    core = openvino_core()
    try:
        graph = core.read_model(data)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ModelError(
            f"twin of {model_path.name} cannot be read by OpenVINO (custom or unknown "
            f"operators?): {str(exc).splitlines()[0][:300]}"
        ) from None
    custom = sorted(
        {
            f"{op.get_type_name()} ({op.get_type_info().version_id})"
            for op in graph.get_ops()
            if not str(op.get_type_info().version_id).startswith("opset")
        }
    )
    if custom:
        raise ModelError(
            f"twin of {model_path.name} holds custom operators {', '.join(custom)}: refused"
        )
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ModelError(f"twin of {model_path.name} must have one input and one output")
    shape = graph.inputs[0].get_partial_shape()
    dims = [None if d.is_dynamic else d.get_length() for d in shape]
    if len(dims) != 4 or dims[1:] != [input_size[0], input_size[1], 3]:
        raise ModelError(
            f"twin of {model_path.name} takes input {shape}, but the .h5 takes "
            f"[?,{input_size[0]},{input_size[1]},3]: refused"
        )
    import openvino

    if graph.inputs[0].get_element_type() != openvino.Type.f32:
        raise ModelError(f"twin of {model_path.name} must take float32 inputs: refused")
    if edit is not None:
        edit(graph)
    config = serving_config(precision, threads)
    return TwinModel(graph, config, model_path.with_suffix(".onnx"), precision, input_size)


def load_twin(
    model_path: Path,
    meta: ModelMetadata | None,
    input_size: tuple[int, int],
    threads: int,
    wanted: str | None = None,
) -> TwinModel:
    """The verified twin of ``model_path`` at the chosen precision; ModelError if it cannot."""
    twin = read_twin(meta)
    if twin is None:
        raise ModelError(
            f"{model_path.name} has no compiled twin (export one with `genderscore export`)"
        )
    if twin.input_shape[1:3] != input_size:
        raise ModelError(
            f"twin of {model_path.name} was recorded for input {list(twin.input_shape)}, "
            f"the .h5 takes {list(input_size)}: refused"
        )
    precision = choose_precision(twin, wanted or settings.precision, cpu_capabilities())
    check = twin.precisions[precision]
    data = read_twin_bytes(model_path, check)
    model = compile_twin(model_path, data, precision, input_size, threads)
    model.path = _twin_file(model_path, check)
    # One pass of a full batch of black pixels: OpenVINO prepares its kernels for a
    # shape on its first inference (measured: the first batch 0.27 s, the next 0.14 s),
    # which then happens during the load (the worker's preload), not on a real batch.
    model.predict_pixels(np.zeros((settings.batch_size, *input_size, 3), dtype=np.uint8))
    return model


def serving_threads(threads: int | None) -> int:
    """Inference threads: as given, else every core of this process."""
    return threads or len(os.sched_getaffinity(0))


def load_model(
    model_path: Path,
    data: bytes,
    meta: ModelMetadata | None,
    threads: int | None,
    load_keras: Any,
) -> tuple[Any, str, str]:
    """The model that serves ``model_path``: (model, runtime, precision).

    ``load_keras()`` loads the checked ``.h5`` with Keras; it is called only when the
    twin does not serve.
    """
    if settings.runtime != "keras":
        try:
            input_size = h5_input_size(data) or (meta.input_size if meta else None)
            if input_size is None:
                raise ModelError(f"{model_path.name} declares no input shape")
            twin = load_twin(model_path, meta, input_size, serving_threads(threads))
            return twin, TWIN_RUNTIME, twin.precision
        except ModelError as exc:
            if settings.runtime != "auto" or settings.precision not in ("auto", "f32"):
                raise
            if not tensorflow_installed():
                raise ModelError(f"{exc}; and TensorFlow is not installed for Keras") from None
            log.warning("model %s: serving with Keras, not its twin: %s", model_path, exc)
    elif not tensorflow_installed():
        raise ModelError(_NO_TENSORFLOW)
    return load_keras(), "keras", "f32"
