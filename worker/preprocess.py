"""Picture bytes -> model input: the one preprocessing used by training and scoring.

``load_picture`` reads a file safely with a size guard; ``preprocess`` decodes, applies the
EXIF orientation, flattens any mode to RGB, resizes to the model's input size and
scales pixels by 1/255 (how every genderscore and origin model was trained).
Every failure raises ``PictureError`` with a kind that ends up in the errors CSV.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.settings import settings

# Formats Pillow may try; anything else (gzip, HTML, PDF, ...) is "not_an_image".
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Signatures of the allowed formats: such a file that fails to open is corrupt, not foreign.
KNOWN_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
RESAMPLE = Image.Resampling.BILINEAR
# Stored in model metadata. v2: formats without DCT scaling are box-reduced by an integer
# factor before their mode conversion (v1 converted them at full size).
PREPROCESSING_ID = "rgb-exif-bilinear-div255-v2"
# uint8 pixel -> model input: ``float32(k) * PIXEL_SCALE``. The compiled twin takes the
# uint8 pixels and applies this very factor inside its graph (``worker.runtime``).
PIXEL_SCALE = np.float32(1.0 / 255.0)


class PictureError(Exception):
    """A picture that cannot be scored; ``kind`` is a short machine-readable tag."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def refusal(info: os.stat_result, limit: int) -> PictureError | None:
    """Why a file with this ``stat`` is not read as a picture, or None.

    Only regular files with a single link are read: a FIFO would block a reader, a device
    could be endless, and a hard link may be a file from outside the folder (where its
    other names are cannot be checked, so every hard-linked file is refused).
    """
    if not stat.S_ISREG(info.st_mode):
        return PictureError("not_a_file", f"not a regular file ({_file_type(info.st_mode)})")
    if info.st_nlink > 1:
        return PictureError(
            "hard_link", f"the file has {info.st_nlink} hard links; only single-link files are read"
        )
    if info.st_size == 0:
        return PictureError("empty", "the file is empty")
    if info.st_size > limit:
        return PictureError("too_large", f"{info.st_size} bytes is over the {limit}-byte limit")
    return None


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def load_picture(path: Path, max_bytes: int | None = None) -> bytes:
    """Read a picture file once, safely, relative to its folder.

    The file is opened without following a symbolic link and without blocking, through
    a descriptor of its folder; that descriptor is what is checked (``fstat``: a
    regular, single-link file within the byte limit) and read, at most limit + 1 bytes,
    so a file swapped after any earlier check cannot hang or flood the reader.
    """
    limit = max_bytes or settings.max_image_bytes
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PictureError("missing", f"no folder {path.parent}") from None
    except OSError as exc:
        raise PictureError("unreadable", f"{type(exc).__name__}: {exc.strerror}") from None
    try:
        fd = os.open(
            path.name,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
            dir_fd=folder,
        )
    except FileNotFoundError:
        raise PictureError("missing", f"no picture file at {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PictureError("not_a_file", "a symbolic link (links are not followed)") from None
        raise PictureError("unreadable", f"{type(exc).__name__}: {exc.strerror}") from None
    finally:
        os.close(folder)
    try:
        problem = refusal(os.fstat(fd), limit)
        if problem is not None:
            raise problem
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise PictureError("unreadable", f"{type(exc).__name__}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise PictureError("too_large", f"over the {limit}-byte limit (the file grew)")
    if not data:
        raise PictureError("empty", "the file is empty")
    return data


def _reduction(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest integer factor that keeps ``size`` at or above ``target``."""
    return max(1, min(size[0] // max(1, target[0]), size[1] // max(1, target[1])))


def _block_mean(array: NDArray[Any], factor: int) -> NDArray[np.float32]:
    """Mean of ``factor`` x ``factor`` blocks of a 2-D array, in float32."""
    if factor == 1:
        return array.astype(np.float32)
    height, width = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
    blocks = array[:height, :width].reshape(height // factor, factor, width // factor, factor)
    result: NDArray[np.float32] = blocks.mean(axis=(1, 3), dtype=np.float32)
    return result


def _to_rgb(image: Image.Image, factor: int) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, reduced first by ``factor``.

    The reduction (a box filter by an integer factor) comes before any mode conversion,
    so a large picture is never converted, or held in floating point, at full size.
    Wide grayscale (16/32-bit, float) is scaled to 8 bits over its full range instead of
    clipped; transparency is flattened onto white.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image)
        if image.mode == "F":
            top = 255.0
        elif image.mode.startswith("I;16") or int(array.max(initial=0)) > 255:
            top = 65535.0
        else:
            top = 255.0
        small = _block_mean(array, factor) * np.float32(255.0 / top)
        return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    if factor > 1:
        image = image.reduce(factor)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode(data: bytes, size: tuple[int, int], max_pixels: int | None = None) -> Image.Image:
    """Decode picture bytes to an RGB image of ``size`` (width, height).

    JPEGs decode at a reduced DCT scale, so their pixel limit is
    ``GENDERSCORE_MAX_IMAGE_PIXELS``; other formats decode at full size, under the lower
    ``GENDERSCORE_MAX_RAW_IMAGE_PIXELS``.
    """
    if not data:
        raise PictureError("empty", "the file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow's decompression-bomb warning becomes an error, never a log line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = opened.size
            if opened.format == "JPEG":
                pixel_limit = max_pixels or settings.max_image_pixels
            else:
                pixel_limit = min(
                    max_pixels or settings.max_image_pixels, settings.max_raw_image_pixels
                )
            if width * height > pixel_limit:
                raise PictureError(
                    "too_many_pixels",
                    f"{width}x{height} is over the {pixel_limit}-pixel limit for {opened.format}",
                )
            if width < 1 or height < 1:
                raise PictureError("bad_size", f"{width}x{height}")
            # JPEG DCT scaling: decode at the smallest scale still >= the target size;
            # other formats are reduced by an integer factor before any conversion.
            opened.draft("RGB", (max(size), max(size)))
            upright = ImageOps.exif_transpose(opened)
            factor = 1 if opened.format == "JPEG" else _reduction(upright.size, size)
            return _to_rgb(upright, factor).resize(size, RESAMPLE)
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


def pixels(data: bytes, size: tuple[int, int]) -> NDArray[np.uint8]:
    """Picture bytes -> uint8 RGB pixels (height, width, 3), before scaling."""
    return np.asarray(decode(data, size), dtype=np.uint8)


def scale(values: NDArray[np.uint8]) -> NDArray[np.float32]:
    """uint8 pixels (one picture or a stacked batch) -> the model's float32 input in [0, 1].

    Element by element ``float32(k) * float32(1/255)``: a batch scaled at once is bit for
    bit the stack of its pictures scaled one by one (the scorer scales whole batches).
    """
    result = values.astype(np.float32)
    result *= PIXEL_SCALE
    return result


def preprocess(data: bytes, size: tuple[int, int]) -> NDArray[np.float32]:
    """Picture bytes -> float32 array (height, width, 3) scaled to [0, 1]."""
    return scale(pixels(data, size))


def preprocess_file(path: Path, size: tuple[int, int]) -> NDArray[np.float32]:
    """``preprocess`` of a file, with the size guard of ``load_picture``."""
    return preprocess(load_picture(path), size)
