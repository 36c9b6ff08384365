"""Loading a Keras model with its metadata, safely, once per process.

A model is ``<name>.h5`` plus ``<name>.json`` (written by training): input size,
what the sigmoid output means, threshold, and the ``.h5``'s sha256. The worker loads
only a model whose sha256 matches its metadata, unless
``GENDERSCORE_ALLOW_UNVERIFIED_MODEL`` is set; a bare origin ``.h5`` then gets the
origin's defaults (``flow_from_directory`` sorted the class folders, so its sigmoid
is P(male)). A ``Lambda`` layer (arbitrary code) is refused before deserializing.

TensorFlow is imported inside functions only: the worker's parent process must never
import it before the pool forks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.settings import cpu_count, settings

log = logging.getLogger(__name__)

METADATA_FORMAT = "genderscore-model/1"
CLASSES = ("male", "female")
# The origin trained with flow_from_directory on male/ and female/ folders: classes are
# sorted alphabetically (female=0, male=1), so a bare origin .h5 outputs P(male).
BARE_H5_DEFAULTS: dict[str, Any] = {"positive_class": "male", "threshold": 0.5}
FORBIDDEN_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})


class ModelError(RuntimeError):
    """A model that must not or cannot be loaded; the message says what to do."""


@dataclass
class ModelBundle:
    """A loaded model and what its output means."""

    model: Any
    path: Path
    sha256: str
    input_size: tuple[int, int]  # (height, width)
    positive_class: str  # the sigmoid output is P(positive_class)
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """Short identifier written with every prediction: 12 hex digits of the sha256."""
        return self.sha256[:12]

    @property
    def size_wh(self) -> tuple[int, int]:
        """Input size as Pillow wants it: (width, height)."""
        return self.input_size[1], self.input_size[0]


def file_sha256(path: Path) -> str:
    """sha256 of a file, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_path(model_path: Path) -> Path:
    """``<name>.json`` beside ``<name>.h5``."""
    return model_path.with_suffix(".json")


def read_metadata(model_path: Path) -> dict[str, Any] | None:
    """The model's metadata, or None when there is no metadata file."""
    meta_file = metadata_path(model_path)
    if not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model metadata {meta_file}: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"model metadata {meta_file} is not a JSON object")
    return meta


def verify_model_file(model_path: Path, meta: dict[str, Any] | None) -> str:
    """Check the .h5's sha256 against its metadata; return the sha256."""
    if not model_path.is_file():
        raise ModelError(
            f"model file {model_path} not found: train one with `genderscore train` "
            "or set GENDERSCORE_MODEL"
        )
    sha = file_sha256(model_path)
    if meta is None:
        if not settings.allow_unverified_model:
            raise ModelError(
                f"{model_path} has no metadata file {metadata_path(model_path).name}, so its "
                "integrity and label mapping are unknown; set "
                "GENDERSCORE_ALLOW_UNVERIFIED_MODEL=true to load it with the origin's "
                "defaults (sigmoid = P(male), threshold 0.5)"
            )
        log.warning(
            "model %s has no metadata: using defaults %s (unverified)", model_path, BARE_H5_DEFAULTS
        )
    elif meta.get("sha256") != sha:
        if not settings.allow_unverified_model:
            raise ModelError(
                f"{model_path} sha256 {sha[:12]}... does not match its metadata "
                f"({str(meta.get('sha256'))[:12]}...): refusing to load it "
                "(GENDERSCORE_ALLOW_UNVERIFIED_MODEL=true overrides)"
            )
        log.warning("model %s sha256 does not match its metadata (allowed by settings)", model_path)
    return sha


def _walk_layers(node: Any) -> Iterator[str]:
    """Every ``class_name`` in a Keras model config, depth first."""
    if isinstance(node, dict):
        name = node.get("class_name")
        if isinstance(name, str):
            yield name
        for value in node.values():
            yield from _walk_layers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_layers(value)


def check_h5_config(model_path: Path) -> None:
    """Refuse a .h5 whose architecture holds code (Lambda layers), before deserializing."""
    import h5py

    try:
        with h5py.File(model_path, "r") as h5:
            raw = h5.attrs.get("model_config")
    except OSError as exc:
        raise ModelError(f"{model_path} is not a readable HDF5 model: {exc}") from None
    if raw is None:
        raise ModelError(f"{model_path} holds no model_config: save the whole model")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    bad = sorted(set(_walk_layers(config)) & FORBIDDEN_LAYERS)
    if bad:
        raise ModelError(f"{model_path} contains {', '.join(bad)} layers (arbitrary code): refused")


def check_model_file(model_path: Path) -> str:
    """Everything checkable without TensorFlow: sha256 against the metadata, no Lambda
    layers. Returns the sha256; raises ModelError."""
    sha = verify_model_file(model_path, read_metadata(model_path))
    check_h5_config(model_path)
    return sha


def configure_tensorflow(threads: int | None = None) -> None:
    """Set TensorFlow's thread pools (before its first op) and GPU memory growth."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # already initialised in this process: keep its settings


def default_tf_threads(processes: int) -> int:
    """TensorFlow threads per process: the cores shared among ``processes``."""
    return settings.tf_threads or max(1, cpu_count() // max(1, processes))


def load_bundle(model_path: Path, tf_threads: int | None = None) -> ModelBundle:
    """Verify, check and load a model with its metadata."""
    meta = read_metadata(model_path)
    sha = verify_model_file(model_path, meta)
    check_h5_config(model_path)
    configure_tensorflow(tf_threads)
    import keras

    try:
        model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelError(f"cannot load {model_path}: {type(exc).__name__}: {exc}") from None
    shape = model.input_shape
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ModelError(f"{model_path} input shape {shape} is not (None, height, width, 3)")
    input_size = (int(shape[1]), int(shape[2]))
    info = dict(BARE_H5_DEFAULTS) if meta is None else meta
    declared = info.get("input_size")
    if declared is not None and tuple(declared) != input_size:
        raise ModelError(f"metadata input_size {declared} != model input {input_size}")
    positive = info.get("positive_class")
    if positive not in CLASSES:
        raise ModelError(f"metadata positive_class {positive!r} is not one of {CLASSES}")
    log.info(
        "model loaded: %s sha256=%s input=%s sigmoid=P(%s) pid=%d",
        model_path,
        sha[:12],
        input_size,
        positive,
        os.getpid(),
    )
    return ModelBundle(
        model=model,
        path=model_path,
        sha256=sha,
        input_size=input_size,
        positive_class=positive,
        threshold=float(info.get("threshold", 0.5)),
        metadata=meta or {},
    )


class ModelCache:
    """Models loaded by this process, by path: each one loaded once, on first use."""

    def __init__(self, tf_threads: int | None = None) -> None:
        self._bundles: dict[Path, ModelBundle] = {}
        self._tf_threads = tf_threads
        self._lock = threading.Lock()  # a threads pool must not load a model twice
        self.loads = 0

    def get(self, model_path: Path) -> ModelBundle:
        """The bundle for ``model_path``, loading it the first time."""
        key = model_path.resolve()
        with self._lock:
            bundle = self._bundles.get(key)
            if bundle is None:
                bundle = load_bundle(key, self._tf_threads)
                self._bundles[key] = bundle
                self.loads += 1
        return bundle


def save_model(model: Any, model_path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Save ``model`` as HDF5 with ``<name>.json`` beside it; return the metadata written.

    The sha256 of the written ``.h5`` goes into the metadata, which is written last:
    a worker never sees metadata that does not match its file.
    """
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(f".{model_path.stem}.tmp.h5")
    model.save(tmp)
    os.replace(tmp, model_path)
    shape = model.input_shape
    full = {
        "format": METADATA_FORMAT,
        "input_size": [int(shape[1]), int(shape[2])],
        **metadata,
        "sha256": file_sha256(model_path),
    }
    meta_tmp = metadata_path(model_path).with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    os.replace(meta_tmp, metadata_path(model_path))
    return full
