"""Bad and unusual files named ``<userid>.jpg``: what each must give (an error kind or a score)."""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from tests.helpers import jpeg_bytes, picture

SCORE = "score"  # must be scored
ANY = "any"  # a typed error or a score, never a crash


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _good() -> Image.Image:
    return picture("female", (96, 72), seed=123)


def _bomb_header() -> bytes:
    """A small JPEG whose SOF header claims 30000 x 30000 pixels."""
    data = bytearray(jpeg_bytes(_good()))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    return bytes(data)


def _corrupt_scan() -> bytes:
    data = bytearray(jpeg_bytes(_good()))
    start = data.index(b"\xff\xda") + 20
    for i in range(start, len(data) - 10, 7):
        data[i] = 0xFF if data[i] != 0xFF else 0x00
    return bytes(data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    return jpeg_bytes(_good().transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [_good().convert("P"), picture("male", (96, 72), seed=5).convert("P")]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit() -> bytes:
    array = (np.asarray(_good().convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return _save(Image.fromarray(array), "PNG")


def _huge() -> bytes:
    return jpeg_bytes(Image.new("RGB", (6600, 6400), (120, 80, 60)))


BAD_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "empty"),
    "text": (lambda: b"hello, I am not a picture\n" * 20, "not_an_image"),
    "html": (lambda: b"<!doctype html><html><body><img src=x></body></html>", "not_an_image"),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "not_an_image"),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "not_an_image"),
    "gzip": (lambda: gzip.compress(jpeg_bytes(_good())), "not_an_image"),
    "random": (lambda: np.random.default_rng(1).bytes(5000), "not_an_image"),
    "truncated": (lambda: jpeg_bytes(_good())[:900], "corrupt"),
    "header_only": (lambda: jpeg_bytes(_good())[:160], "corrupt"),
    "corrupt_scan": (_corrupt_scan, ANY),
    "bomb_header": (_bomb_header, "too_many_pixels"),
    "huge": (_huge, "too_many_pixels"),
    "png_named_jpg": (lambda: _save(_good(), "PNG"), SCORE),
    "gif_named_jpg": (lambda: _save(_good().convert("P"), "GIF"), SCORE),
    "webp_named_jpg": (lambda: _save(_good(), "WEBP"), SCORE),
    "bmp_named_jpg": (lambda: _save(_good(), "BMP"), SCORE),
    "one_pixel": (lambda: jpeg_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), SCORE),
    "cmyk": (lambda: jpeg_bytes(_good().convert("CMYK")), SCORE),
    "grayscale": (lambda: jpeg_bytes(_good().convert("L")), SCORE),
    "palette": (lambda: _save(_good().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), SCORE),
    "sixteen_bit": (_sixteen_bit, SCORE),
    "rgba": (lambda: _save(_good().convert("RGBA"), "PNG"), SCORE),
    "exif_rotated": (_exif_rotated, SCORE),
    "progressive": (lambda: jpeg_bytes(_good(), progressive=True), SCORE),
    "animated": (_animated_gif, SCORE),
}
