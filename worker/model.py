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
import io
import json
import logging
import os
import re
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.settings import cpu_count, settings

log = logging.getLogger(__name__)

METADATA_FORMAT = "genderscore-model/1"
CLASSES = ("male", "female")
# The origin trained with flow_from_directory on male/ and female/ folders: classes are
# sorted alphabetically (female=0, male=1), so a bare origin .h5 outputs P(male).
BARE_H5_DEFAULTS: dict[str, Any] = {"positive_class": "male", "threshold": 0.5}
FORBIDDEN_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
# Every picture is resized to the input size: a model declaring 100000x100000 would make
# each one about 120 GB. The origin's CNN takes 150x150.
MAX_INPUT_SIDE = 1024
# Models kept loaded per process: the one being served and the one replacing it.
CACHED_MODELS = 2


class ModelError(RuntimeError):
    """A model that must not or cannot be loaded; the message says what to do.

    ``kind`` is the error kind recorded for the pictures it could not score.
    """

    def __init__(self, message: str, kind: str = "model_error") -> None:
        super().__init__(message)
        self.kind = kind


class ModelMetadata(BaseModel):
    """``<name>.json``: what the model's output means, checked field by field.

    Training adds more (history, data fingerprint, versions): kept, not checked.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["genderscore-model/1"] = "genderscore-model/1"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_size: tuple[
        Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)],
        Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)],
    ]
    positive_class: Literal["male", "female"]
    threshold: float = Field(0.5, gt=0.0, lt=1.0, allow_inf_nan=False)
    preprocessing: str | None = None


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
    runtime: str = "keras"  # or the twin's runtime (worker.runtime)
    precision: str = "f32"

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


def check_suffix(model_path: Path) -> None:
    """Only HDF5 models, named ``.h5``, are loaded (Keras picks its loader by the name)."""
    if model_path.suffix != ".h5":
        raise ModelError(f"{model_path}: a model must be a Keras HDF5 file named <name>.h5")


def read_metadata(model_path: Path) -> ModelMetadata | None:
    """The model's checked metadata, or None when there is no metadata file."""
    meta_file = metadata_path(model_path)
    try:
        text = meta_file.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read model metadata {meta_file}: {exc}") from None
    try:
        return ModelMetadata.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'the file'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelError(f"invalid model metadata {meta_file}: {problems}") from None


def _unverified_warning(model_path: Path, why: str) -> None:
    log.warning("model %s %s (allowed by GENDERSCORE_ALLOW_UNVERIFIED_MODEL)", model_path, why)


def verify_model_bytes(model_path: Path, data: bytes, meta: ModelMetadata | None) -> str:
    """Check the model's bytes against its metadata's sha256; return the bytes' sha256."""
    sha = hashlib.sha256(data).hexdigest()
    if meta is None:
        if not settings.allow_unverified_model:
            raise ModelError(
                f"{model_path} has no metadata file {metadata_path(model_path).name}, so its "
                "integrity and label mapping are unknown; set "
                "GENDERSCORE_ALLOW_UNVERIFIED_MODEL=true to load it with the origin's "
                "defaults (sigmoid = P(male), threshold 0.5)"
            )
        _unverified_warning(model_path, f"has no metadata: using defaults {BARE_H5_DEFAULTS}")
    elif meta.sha256 != sha:
        if not settings.allow_unverified_model:
            raise ModelError(
                f"{model_path} sha256 {sha[:12]}... does not match its metadata "
                f"({meta.sha256[:12]}...): refusing to load it "
                "(GENDERSCORE_ALLOW_UNVERIFIED_MODEL=true overrides)"
            )
        _unverified_warning(model_path, "sha256 does not match its metadata")
    return sha


def read_model_file(model_path: Path) -> bytes:
    """The model file's bytes (read once: what is checked is what is loaded)."""
    check_suffix(model_path)
    try:
        return model_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(
            f"model file {model_path} not found: train one with `genderscore train` "
            "or set GENDERSCORE_MODEL"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc}") from None


def verify_model_file(model_path: Path, meta: ModelMetadata | None) -> str:
    """Check the .h5's sha256 against its metadata; return the sha256."""
    return verify_model_bytes(model_path, read_model_file(model_path), meta)


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


def check_h5_config(model_path: Path, data: bytes | None = None) -> None:
    """Refuse a model that is not plain HDF5 or whose architecture holds code (Lambda).

    Checks ``data`` (the file's bytes, read once by the caller) when given. A file that
    is also a zip archive (HDF5 with a ``.keras`` zip appended) is refused: only the
    HDF5 part would have been checked.
    """
    import h5py

    data = read_model_file(model_path) if data is None else data
    if zipfile.is_zipfile(io.BytesIO(data)):
        raise ModelError(f"{model_path} is also a zip archive: not a plain HDF5 model, refused")
    try:
        with h5py.File(io.BytesIO(data), "r") as h5:
            raw = h5.attrs.get("model_config")
    except OSError as exc:
        raise ModelError(f"{model_path} is not a readable HDF5 model: {exc}") from None
    if raw is None:
        raise ModelError(f"{model_path} holds no model_config: save the whole model")
    try:
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{model_path} has an unreadable model_config: {exc}") from None
    bad = sorted(set(_walk_layers(config)) & FORBIDDEN_LAYERS)
    if bad:
        raise ModelError(f"{model_path} contains {', '.join(bad)} layers (arbitrary code): refused")


@dataclass(frozen=True)
class CheckedModel:
    """A model file read once and checked: its resolved path, metadata, bytes, sha256."""

    path: Path
    meta: ModelMetadata | None
    data: bytes
    sha256: str


def read_checked(model_path: Path) -> CheckedModel:
    """Everything checkable without TensorFlow: the name, the metadata's fields, the
    sha256 against the metadata, plain HDF5 with no Lambda layers; raises ModelError. A
    served name that links to a versioned model is resolved first."""
    check_suffix(model_path)
    path = model_path.resolve()
    meta = read_metadata(path)
    data = read_model_file(path)
    sha = verify_model_bytes(path, data, meta)
    check_h5_config(path, data)
    return CheckedModel(path, meta, data, sha)


def check_model_file(model_path: Path) -> str:
    """``read_checked`` and the runtime's twin check (an explicit runtime needs it);
    returns the sha256."""
    checked = read_checked(model_path)
    model_path, meta, sha = checked.path, checked.meta, checked.sha256
    from worker.runtime import check_runtime

    check_runtime(model_path, meta)
    return sha


def configure_tensorflow(threads: int | None = None) -> None:
    """Set TensorFlow's thread pools (before its first op) and GPU memory growth."""
    from worker.logs import import_tensorflow

    tf = import_tensorflow()  # without its C++ log lines

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


def _keras_load(model_path: Path, data: bytes) -> Any:
    """Keras loads the very bytes that were checked, from a private copy named .h5."""
    import keras

    with tempfile.TemporaryDirectory(prefix="genderscore-model-") as folder:
        copy = Path(folder) / "model.h5"
        copy.write_bytes(data)
        try:
            return keras.models.load_model(copy, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad file
            raise ModelError(f"cannot load {model_path}: {type(exc).__name__}: {exc}") from None


def load_bundle(model_path: Path, tf_threads: int | None = None) -> ModelBundle:
    """Verify, check and load a model with its metadata (a link is resolved first)."""
    checked = read_checked(model_path)
    model_path, meta, data, sha = checked.path, checked.meta, checked.data, checked.sha256
    from worker.runtime import load_model  # the verified compiled twin, or Keras

    def keras_model() -> Any:
        configure_tensorflow(tf_threads)
        return _keras_load(model_path, data)

    model, runtime, precision = load_model(model_path, data, meta, tf_threads, keras_model)
    shape = model.input_shape
    if (
        not isinstance(shape, tuple)
        or len(shape) != 4
        or shape[3] != 3
        or not all(isinstance(side, int) and 1 <= side <= MAX_INPUT_SIDE for side in shape[1:3])
    ):
        raise ModelError(
            f"{model_path} input shape {shape} is not (None, height, width, 3) with sides "
            f"of at most {MAX_INPUT_SIDE}"
        )
    input_size = (int(shape[1]), int(shape[2]))
    if meta is not None and meta.input_size != input_size:
        raise ModelError(f"metadata input_size {list(meta.input_size)} != model input {input_size}")
    positive = meta.positive_class if meta else BARE_H5_DEFAULTS["positive_class"]
    threshold = meta.threshold if meta else BARE_H5_DEFAULTS["threshold"]
    log.info(
        "model loaded: %s sha256=%s input=%s sigmoid=P(%s) runtime=%s precision=%s "
        "tensorflow=%s pid=%d",
        model_path,
        sha[:12],
        input_size,
        positive,
        runtime,
        precision,
        "loaded" if "tensorflow" in sys.modules else "not loaded",
        os.getpid(),
    )
    return ModelBundle(
        model=model,
        path=model_path,
        sha256=sha,
        input_size=input_size,
        positive_class=positive,
        threshold=float(threshold),
        metadata=meta.model_dump() if meta else {},
        runtime=runtime,
        precision=precision,
    )


class ModelCache:
    """Models loaded by this process, keyed by path and sha256, at most CACHED_MODELS.

    A model retrained in place gets a new sha256 in its metadata: the next request for
    it loads the new file, and a request that names the old sha256 is refused
    (``model_changed``) instead of being scored by another model.
    """

    def __init__(self, tf_threads: int | None = None) -> None:
        self._bundles: OrderedDict[tuple[Path, str], ModelBundle] = OrderedDict()
        self._tf_threads = tf_threads
        self._lock = threading.Lock()  # a threads pool must not load a model twice
        self.loads = 0

    def get(self, model_path: Path, expected_sha: str | None = None) -> ModelBundle:
        """The bundle of ``model_path`` as it is now; ModelError if it is not ``expected_sha``."""
        path = model_path.resolve()
        check_suffix(path)
        meta = read_metadata(path)
        # A bare .h5 (allowed unverified) has no metadata: the run's sha256 names it,
        # and the load checks the file against it.
        if meta is not None:
            current = meta.sha256
        else:
            current = expected_sha or hashlib.sha256(read_model_file(path)).hexdigest()
        if expected_sha and current != expected_sha:
            raise ModelError(
                f"{path} is now model {current[:12]}, not {expected_sha[:12]} that the run "
                "was enqueued with (the model was replaced): score the run again",
                kind="model_changed",
            )
        with self._lock:
            key = (path, current)
            bundle = self._bundles.get(key)
            if bundle is None:
                bundle = load_bundle(path, self._tf_threads)
                if expected_sha and bundle.sha256 != expected_sha:
                    raise ModelError(
                        f"{path} holds model {bundle.sha256[:12]}, not {expected_sha[:12]} that "
                        "the run was enqueued with",
                        kind="model_changed",
                    )
                key = (path, bundle.sha256)
                self._bundles[key] = bundle
                self.loads += 1
                while len(self._bundles) > CACHED_MODELS:
                    self._bundles.popitem(last=False)
            self._bundles.move_to_end(key)
        return bundle


MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def versioned_model_path(name: str, folder: Path | None = None) -> Path:
    """``<folder>/<name>-<YYYYmmdd-HHMMSS>.h5``, a new file in the models folder
    (default: the folder of GENDERSCORE_MODEL). Training writes there, never over the
    served model; ``promote_model`` makes a version the served one."""
    if MODEL_NAME_RE.fullmatch(name) is None:
        raise ModelError(f"invalid model name {name[:80]!a}: expected [A-Za-z0-9_-]{{1,64}}")
    folder = (folder or settings.model.parent).resolve()
    path = folder / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}.h5"
    if path.exists() or path.is_symlink():
        raise ModelError(f"{path} exists already: a version is never overwritten")
    return path


def promote_model(model: Path, served: Path) -> str:
    """Make ``model`` (a checked version in the served name's folder) the served model.

    The served ``<name>.h5`` and ``<name>.json`` become links to the version, each
    replaced atomically. Runs enqueued before keep scoring with the version they named
    (messages carry the resolved file). A served name that was a plain file is kept as
    ``<name>-previous-<time>.h5``. Returns the promoted model's sha256.
    """
    check_suffix(served)
    sha = check_model_file(model)
    target = model.resolve()
    if target.parent != served.parent.resolve():
        raise ModelError(f"{model} is not in {served.parent}: promote a version of that folder")
    if target.stem == served.stem:
        raise ModelError(f"{model} is the served name itself: promote a versioned file")
    if served.exists() and not served.is_symlink():
        keep = served.with_name(f"{served.stem}-previous-{datetime.now(UTC):%Y%m%d-%H%M%S}.h5")
        if metadata_path(served).exists():
            os.replace(metadata_path(served), metadata_path(keep))
        os.replace(served, keep)
    for link, name in ((metadata_path(served), metadata_path(target).name), (served, target.name)):
        tmp = link.with_name(f".{link.name}.promote")
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, link)
    log.info("promoted %s (sha256 %s) to %s", target.name, sha[:12], served)
    return sha


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
