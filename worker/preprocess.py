"""Picture bytes -> model input: the one preprocessing used by training and scoring.

``load_picture`` reads a file with a size guard; ``preprocess`` decodes, applies the
EXIF orientation, flattens any mode to RGB, resizes to the model's input size and
scales pixels by 1/255 (how every genderscore and origin model was trained).
Every failure raises ``PictureError`` with a kind that ends up in the errors CSV.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.settings import settings

# Formats Pillow may try; anything else (gzip, HTML, PDF, ...) is "not_an_image".
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Signatures of the allowed formats: such a file that fails to open is corrupt, not foreign.
KNOWN_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
RESAMPLE = Image.Resampling.BILINEAR
PREPROCESSING_ID = "rgb-exif-bilinear-div255-v1"  # stored in model metadata


class PictureError(Exception):
    """A picture that cannot be scored; ``kind`` is a short machine-readable tag."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def load_picture(path: Path, max_bytes: int | None = None) -> bytes:
    """Read a picture file, refusing missing, empty, non-regular or oversized files."""
    limit = max_bytes or settings.max_image_bytes
    try:
        if not path.is_file():
            raise PictureError("missing", f"no picture file at {path}")
        size = path.stat().st_size
        if size == 0:
            raise PictureError("empty", "the file is empty")
        if size > limit:
            raise PictureError("too_large", f"{size} bytes is over the {limit}-byte limit")
        return path.read_bytes()
    except OSError as exc:
        raise PictureError("unreadable", f"{type(exc).__name__}: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode(data: bytes, size: tuple[int, int], max_pixels: int | None = None) -> Image.Image:
    """Decode picture bytes to an RGB image of ``size`` (width, height)."""
    pixel_limit = max_pixels or settings.max_image_pixels
    if not data:
        raise PictureError("empty", "the file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow's decompression-bomb warning becomes an error, never a log line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = opened.size
            if width * height > pixel_limit:
                raise PictureError(
                    "too_many_pixels",
                    f"{width}x{height} is over the {pixel_limit}-pixel limit",
                )
            if width < 1 or height < 1:
                raise PictureError("bad_size", f"{width}x{height}")
            # JPEG DCT scaling: decode at the smallest scale still >= the target size.
            opened.draft("RGB", (max(size), max(size)))
            return _to_rgb(ImageOps.exif_transpose(opened)).resize(size, RESAMPLE)
    except PictureError:
        raise
    except UnidentifiedImageError:
        if data.startswith(KNOWN_MAGIC):
            raise PictureError("corrupt", "picture header is truncated or damaged") from None
        raise PictureError("not_an_image", "not a picture format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PictureError("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise PictureError("corrupt", f"{type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise PictureError("too_large", "out of memory while decoding") from None


def preprocess(data: bytes, size: tuple[int, int]) -> NDArray[np.float32]:
    """Picture bytes -> float32 array (height, width, 3) scaled to [0, 1]."""
    image = decode(data, size)
    return np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)


def preprocess_file(path: Path, size: tuple[int, int]) -> NDArray[np.float32]:
    """``preprocess`` of a file, with the size guard of ``load_picture``."""
    return preprocess(load_picture(path), size)
