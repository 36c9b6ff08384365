"""Model loading refuses what it must: sha256 mismatch, missing metadata, Lambda layers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from unittest import mock

import pytest

from tests.helpers import make_model_file
from worker.model import (
    ModelError,
    check_h5_config,
    check_model_file,
    load_bundle,
    read_metadata,
    verify_model_file,
)
from worker.settings import settings


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("m") / "m.h5", image_size=24)


def test_verified_model_loads_with_its_mapping(model_file: Path) -> None:
    bundle = load_bundle(model_file)
    assert bundle.input_size == (24, 24) and bundle.positive_class == "female"
    assert bundle.model_id == json.loads(model_file.with_suffix(".json").read_text())["sha256"][:12]


def test_sha256_mismatch_is_refused_unless_allowed(model_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m.h5"
    copy.write_bytes(model_file.read_bytes() + b"\0")
    copy.with_suffix(".json").write_text(model_file.with_suffix(".json").read_text())
    with pytest.raises(ModelError, match="does not match its metadata"):
        verify_model_file(copy, read_metadata(copy))
    with mock.patch.object(settings, "allow_unverified_model", True):
        assert verify_model_file(copy, read_metadata(copy))


def test_bare_h5_needs_the_allow_setting_and_means_p_male(model_file: Path, tmp_path: Path) -> None:
    bare = tmp_path / "origin.h5"
    bare.write_bytes(model_file.read_bytes())
    with pytest.raises(ModelError, match="GENDERSCORE_ALLOW_UNVERIFIED_MODEL"):
        load_bundle(bare)
    with mock.patch.object(settings, "allow_unverified_model", True):
        bundle = load_bundle(bare)
    assert bundle.positive_class == "male"  # flow_from_directory sorted female, male


def test_lambda_layer_is_refused_before_deserializing(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(1)(
        keras.layers.Flatten()(keras.layers.Lambda(lambda x: x * 2)(inputs))
    )
    path = tmp_path / "lambda.h5"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelError, match="Lambda"):
        check_h5_config(path)
    with (
        mock.patch.object(settings, "allow_unverified_model", True),
        mock.patch("keras.models.load_model") as load,
        pytest.raises(ModelError, match="Lambda"),
    ):
        load_bundle(path)
    load.assert_not_called()


def test_missing_model_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="genderscore train"):
        verify_model_file(tmp_path / "none.h5", None)


def _with_metadata(model_file: Path, tmp_path: Path, name: str = "m.h5", **changes: object) -> Path:
    """A copy of ``model_file`` whose metadata has ``changes`` (None removes a field)."""
    copy = tmp_path / name
    copy.write_bytes(model_file.read_bytes())
    meta = json.loads(model_file.with_suffix(".json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    copy.with_suffix(".json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"threshold": "abc"}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"input_size": 5}, "input_size"),
        ({"input_size": [100000, 100000]}, "input_size"),
        ({"input_size": [0, 24]}, "input_size"),
        ({"positive_class": "other"}, "positive_class"),
        ({"positive_class": None}, "positive_class"),
        ({"sha256": "x" * 64}, "sha256"),
        ({"format": "something-else/9"}, "format"),
    ],
)
def test_every_metadata_field_is_checked_before_loading(
    model_file: Path, tmp_path: Path, changes: dict[str, object], field: str
) -> None:
    path = _with_metadata(model_file, tmp_path, **changes)
    with pytest.raises(ModelError, match=f"invalid model metadata .*{field}"):
        check_model_file(path)  # the CLI's check, without TensorFlow
    with (
        mock.patch("keras.models.load_model") as load,
        pytest.raises(ModelError, match=f"invalid model metadata .*{field}"),
    ):
        load_bundle(path)  # the worker's load
    load.assert_not_called()


def test_metadata_that_is_not_an_object_is_a_model_error(model_file: Path, tmp_path: Path) -> None:
    path = _with_metadata(model_file, tmp_path)
    for text in ("[1, 2]", "not json", '"a string"'):
        path.with_suffix(".json").write_text(text)
        with pytest.raises(ModelError, match="invalid model metadata"):
            check_model_file(path)


def test_only_h5_files_are_models(model_file: Path, tmp_path: Path) -> None:
    keras_named = tmp_path / "model.keras"
    keras_named.write_bytes(model_file.read_bytes())
    with pytest.raises(ModelError, match=r"named <name>\.h5"):
        check_model_file(keras_named)
    with pytest.raises(ModelError, match=r"named <name>\.h5"):
        load_bundle(keras_named)


def test_hdf5_with_a_zip_appended_is_refused(model_file: Path, tmp_path: Path) -> None:
    import io
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", '{"class_name": "Lambda"}')
    path = tmp_path / "polyglot.h5"
    path.write_bytes(model_file.read_bytes() + archive.getvalue())
    meta = json.loads(model_file.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="zip archive"):
        check_model_file(path)
    with mock.patch("keras.models.load_model") as load, pytest.raises(ModelError, match="zip"):
        load_bundle(path)
    load.assert_not_called()


def test_keras_loads_the_bytes_that_were_checked(model_file: Path, tmp_path: Path) -> None:
    # The file is replaced after it was read and checked: the model loaded is the checked one.
    from worker import model as model_module

    path = _with_metadata(model_file, tmp_path)
    original = model_module.read_model_file

    def read_then_swap(p: Path) -> bytes:
        data = original(p)
        p.write_bytes(b"swapped after the check")
        return data

    with mock.patch.object(model_module, "read_model_file", read_then_swap):
        bundle = load_bundle(path)
    assert bundle.sha256 == json.loads(path.with_suffix(".json").read_text())["sha256"]


def test_cache_reloads_a_model_replaced_in_place_and_refuses_the_old_sha(
    tmp_path: Path,
) -> None:
    from tests.helpers import make_model_file
    from worker.model import ModelCache

    path = make_model_file(tmp_path / "gender.h5", image_size=24, seed=1)
    old_sha = json.loads(path.with_suffix(".json").read_text())["sha256"]
    cache = ModelCache()
    first = cache.get(path, old_sha)
    assert cache.get(path, old_sha) is first and cache.loads == 1
    make_model_file(path, image_size=24, seed=2)  # retrained in place, metadata too
    new_sha = json.loads(path.with_suffix(".json").read_text())["sha256"]
    assert new_sha != old_sha
    with pytest.raises(ModelError, match="replaced") as info:
        cache.get(path, old_sha)
    assert info.value.kind == "model_changed"
    second = cache.get(path, new_sha)
    assert second.sha256 == new_sha and cache.loads == 2
    # Bounded: a third model evicts the least recently used.
    third_path = make_model_file(tmp_path / "other.h5", image_size=24, seed=3)
    cache.get(third_path)
    make_model_file(path, image_size=24, seed=4)
    cache.get(path)
    assert len(cache._bundles) == 2
