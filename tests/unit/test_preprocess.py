"""The shared preprocessing: golden values, unusual modes, and a typed error for every bad file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.badfiles import ANY, BAD_FILES, SCORE
from tests.helpers import jpeg_bytes, picture
from worker.preprocess import PictureError, decode, load_picture, preprocess

SIZE = (32, 32)


def _gradient_png() -> bytes:
    """A 100x80 picture with a different value at every pixel (lossless, so exact)."""
    y, x = np.mgrid[0:80, 0:100]
    rgb = np.stack([x * 255 // 99, y * 255 // 79, (x * y) % 256], -1).astype(np.uint8)
    return _png(Image.fromarray(rgb))


# Pinned once from the preprocessing as specified (bilinear resize, then x 1/255). A
# nearest-neighbour resize, a missing 1/255, a swapped axis or channel moves them.
GOLDEN = {
    (0, 0): [0.011765, 0.015686, 0.003922],
    (5, 7): [0.231373, 0.168627, 0.231373],
    (16, 16): [0.513726, 0.517647, 0.466667],
    (31, 31): [0.988235, 0.988235, 0.505882],
    (20, 3): [0.105882, 0.643137, 0.521569],
}


def test_golden_values_of_a_gradient() -> None:
    array = preprocess(_gradient_png(), SIZE)
    assert array.shape == (32, 32, 3) and array.dtype == np.float32
    for (row, column), expected in GOLDEN.items():
        assert np.allclose(array[row, column], expected, atol=1e-6), (row, column)
    assert np.allclose(array.mean(axis=(0, 1)), [0.499265, 0.499754, 0.474793], atol=1e-6)


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


# --- reading files safely ------------------------------------------------------------


def test_a_fifo_named_like_a_picture_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "u1.jpg"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(PictureError) as info:
        load_picture(fifo)
    assert info.value.kind == "not_a_file" and "FIFO" in info.value.message
    assert time.monotonic() - started < 2


def test_links_and_folders_are_not_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes(picture("male", (40, 40))))
    folder = tmp_path / "pictures"
    folder.mkdir()
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink(outside / "secret.jpg", folder / "linked.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")  # a link to itself
    os.link(outside / "secret.jpg", folder / "hard.jpg")
    (folder / "dir.jpg").mkdir()
    expected = {
        "zero.jpg": "not_a_file",
        "linked.jpg": "not_a_file",
        "loop.jpg": "not_a_file",
        "hard.jpg": "hard_link",
        "dir.jpg": "not_a_file",
        "none.jpg": "missing",
    }
    for name, kind in expected.items():
        with pytest.raises(PictureError) as info:
            load_picture(folder / name)
        assert info.value.kind == kind, (name, info.value)


def test_reads_stop_at_the_byte_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff" * 5000)
    with pytest.raises(PictureError) as info:
        load_picture(path, max_bytes=4096)
    assert info.value.kind == "too_large"
    assert load_picture(path, max_bytes=5000) == b"\xff" * 5000


def test_non_jpeg_formats_have_the_lower_pixel_limit() -> None:
    wide = Image.new("L", (4200, 4000))  # 16.8 Mpixels: under the JPEG limit, over the raw one
    with pytest.raises(PictureError) as info:
        decode(_png(wide), SIZE)
    assert info.value.kind == "too_many_pixels" and "PNG" in info.value.message
    assert decode(jpeg_bytes(wide.convert("RGB")), SIZE).size == SIZE


def test_a_large_16_bit_png_is_reduced_before_any_conversion(tmp_path: Path) -> None:
    # 4000 x 4000 at 16 bits: 32 MB decoded. Converting it at full size in float64, as
    # before, took over 500 MB; reduced first, the whole preprocessing stays near 100 MB.
    script = (
        "import io, resource, sys, numpy as np\n"
        "from PIL import Image\n"
        "from worker.preprocess import preprocess\n"
        "row = (np.arange(4000) * 16).astype(np.uint16)\n"
        "buffer = io.BytesIO()\n"
        "Image.fromarray(np.tile(row, (4000, 1))).save(buffer, 'PNG')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "array = preprocess(buffer.getvalue(), (150, 150))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024, float(array.mean()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    grown_mb, mean = int(out[0]), float(out[1])
    assert grown_mb < 150, f"preprocessing grew the process by {grown_mb} MB"
    assert 0.45 < mean < 0.55  # a ramp over the full 16-bit range, scaled, not clipped
