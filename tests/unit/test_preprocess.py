"""The shared preprocessing: golden values, unusual modes, and a typed error for every bad file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.badfiles import ANY, BAD_FILES, SCORE
from tests.helpers import jpeg_bytes, picture
from worker.preprocess import PictureError, decode, preprocess

SIZE = (32, 32)


def test_golden_array_is_rgb_resized_and_scaled() -> None:
    # A flat colour survives decode + resize exactly (up to JPEG rounding) and is divided by 255.
    data = jpeg_bytes(Image.new("RGB", (100, 80), (255, 128, 0)))
    array = preprocess(data, SIZE)
    assert array.shape == (32, 32, 3) and array.dtype == np.float32
    assert np.allclose(array.mean(axis=(0, 1)), [1.0, 128 / 255, 0.0], atol=3 / 255)
    assert array.min() >= 0.0 and array.max() <= 1.0


def test_preprocessing_is_deterministic_and_not_in_0_255() -> None:
    data = jpeg_bytes(picture("male", (120, 90), seed=3))
    first, second = preprocess(data, SIZE), preprocess(data, SIZE)
    assert np.array_equal(first, second)
    assert first.max() <= 1.0  # the origin's scoring forgot the 1/255


def test_exif_orientation_is_applied() -> None:
    upright = picture("female", (96, 64), seed=9)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displays upright after a 270-degree turn
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    rotated = preprocess(jpeg_bytes(stored, exif=exif.tobytes()), (48, 32))
    plain = preprocess(jpeg_bytes(upright), (48, 32))
    assert np.abs(rotated - plain).mean() < 0.05
    unrotated = preprocess(jpeg_bytes(stored), (48, 32))
    assert np.abs(unrotated - plain).mean() > np.abs(rotated - plain).mean() * 2


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    array = np.full((20, 20), 32768, dtype=np.uint16)
    image = Image.fromarray(array)
    out = np.asarray(decode(_png(image), SIZE))
    assert 120 <= out.mean() <= 135  # half range, not 255


def test_transparency_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    out = np.asarray(decode(_png(image), SIZE))
    assert out.min() == 255


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_and_unusual_files(name: str) -> None:
    make, expected = BAD_FILES[name]
    data = make()
    if expected == SCORE:
        array = preprocess(data, SIZE)
        assert array.shape == (32, 32, 3) and np.isfinite(array).all()
        return
    try:
        preprocess(data, SIZE)
    except PictureError as exc:
        assert expected == ANY or exc.kind == expected, exc
        assert exc.message
    else:
        assert expected == ANY, f"{name} was scored, expected {expected}"
