"""Model loading refuses what it must: sha256 mismatch, missing metadata, Lambda layers."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from tests.helpers import make_model_file
from worker.model import ModelError, check_h5_config, load_bundle, read_metadata, verify_model_file
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
