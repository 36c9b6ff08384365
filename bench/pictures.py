"""Generated JPEGs shaped like profile pictures, reproducible from a seed.

Sizes run from 100x100 to 1024x768 (square avatars, 4:3 and 3:4 photos), a few are
progressive and a few grayscale; the content is a smooth colour field with a face-like
ellipse and mild noise, so files decode and compress like photos, not like noise.
Picture ``i`` depends only on ``(seed, i, profile)``: a folder generated once is reused
when its manifest matches, and smaller runs use copies of its first pictures.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# (width, height) of profile pictures, from thumbnails to camera photos.
PROFILE_SIZES: tuple[tuple[int, int], ...] = (
    (100, 100),
    (128, 128),
    (150, 150),
    (200, 200),
    (240, 320),
    (250, 250),
    (320, 240),
    (400, 400),
    (480, 640),
    (512, 512),
    (640, 480),
    (600, 800),
    (720, 720),
    (800, 600),
    (768, 1024),
    (1024, 768),
)
# --quick: pictures about the size of the test suite's, so a smoke run stays short.
QUICK_SIZES: tuple[tuple[int, int], ...] = ((48, 48), (64, 64), (80, 60), (60, 80), (96, 96))
PROGRESSIVE_SHARE = 0.08
GRAYSCALE_SHARE = 0.06
MANIFEST = "manifest.json"


NOISE_SIDE = 1024
_noise_tiles: dict[int, Image.Image] = {}


def _noise_tile(seed: int) -> Image.Image:
    """A NOISE_SIDE-square grayscale noise tile for ``seed``, made once per process."""
    tile = _noise_tiles.get(seed)
    if tile is None:
        values = np.random.default_rng([seed, 0x5EED]).normal(128, 40, (NOISE_SIDE, NOISE_SIDE))
        tile = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
        _noise_tiles[seed] = tile
    return tile


@dataclass(frozen=True)
class PictureSet:
    """A folder of ``<userid>.jpg`` pictures and what is in it."""

    folder: Path
    count: int
    seed: int
    profile: str
    progressive: int
    grayscale: int
    total_bytes: int
    min_wh: tuple[int, int]
    max_wh: tuple[int, int]

    def summary(self) -> dict[str, Any]:
        """The set as JSON-ready facts."""
        facts = asdict(self)
        facts["folder"] = str(self.folder)
        facts["mean_kib"] = round(self.total_bytes / max(1, self.count) / 1024, 1)
        return facts


def bench_userid(seed: int, index: int) -> str:
    """A course-like userid (32 hex digits), unique per ``(seed, index)``."""
    return hashlib.md5(f"genderscore-bench:{seed}:{index}".encode()).hexdigest()


def render(
    seed: int, index: int, profile: str = "full"
) -> tuple[bytes, tuple[int, int], str, bool]:
    """Picture ``index``: JPEG bytes, (width, height), mode and whether it is progressive."""
    rng = np.random.default_rng([seed, index])
    sizes = QUICK_SIZES if profile == "quick" else PROFILE_SIZES
    width, height = sizes[int(rng.integers(len(sizes)))]
    progressive = bool(rng.random() < PROGRESSIVE_SHARE)
    grayscale = bool(rng.random() < GRAYSCALE_SHARE)
    # A low-frequency colour field, upsampled: smooth like a photo's background.
    field = rng.integers(20, 235, size=(4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(field, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    rx, ry = width * rng.uniform(0.15, 0.25), height * rng.uniform(0.2, 0.3)
    skin = tuple(int(v) for v in rng.integers((150, 100, 80), (240, 190, 170)))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    # Sensor-like noise: a crop of one seeded tile (making noise per picture is slow).
    left = int(rng.integers(0, NOISE_SIDE - width + 1))
    top = int(rng.integers(0, NOISE_SIDE - height + 1))
    noise = _noise_tile(seed).crop((left, top, left + width, top + height)).convert("RGB")
    image = Image.blend(image, noise, float(rng.uniform(0.08, 0.16)))
    if grayscale:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(
        buffer,
        "JPEG",
        quality=int(rng.integers(75, 93)),
        progressive=progressive,
        optimize=progressive,
    )
    return buffer.getvalue(), (width, height), image.mode, progressive


@dataclass
class _Tally:
    progressive: int = 0
    grayscale: int = 0
    total_bytes: int = 0
    sizes: set[tuple[int, int]] = field(default_factory=set)

    def add(self, other: _Tally) -> None:
        self.progressive += other.progressive
        self.grayscale += other.grayscale
        self.total_bytes += other.total_bytes
        self.sizes |= other.sizes


def _write_range(folder: str, seed: int, profile: str, start: int, stop: int) -> _Tally:
    tally = _Tally()
    for index in range(start, stop):
        data, size, mode, progressive = render(seed, index, profile)
        Path(folder, f"{bench_userid(seed, index)}.jpg").write_bytes(data)
        tally.progressive += progressive
        tally.grayscale += mode == "L"
        tally.total_bytes += len(data)
        tally.sizes.add(size)
    return tally


def generate(
    folder: Path, count: int, seed: int = 1, profile: str = "full", processes: int | None = None
) -> PictureSet:
    """Write ``count`` pictures into ``folder`` (a folder holding at least those is reused)."""
    manifest = folder / MANIFEST
    if manifest.exists():
        known = json.loads(manifest.read_text())
        same = (known.get("seed"), known.get("profile")) == (seed, profile)
        if same and int(known.get("count", 0)) >= count:
            log.info("reusing %d pictures in %s", known["count"], folder)
            return _from_manifest(folder, known)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    workers = processes or len(os.sched_getaffinity(0))
    step = max(50, count // (workers * 8) + 1)
    tally = _Tally()
    log.info("generating %d pictures (%s) in %s", count, profile, folder)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(_write_range, str(folder), seed, profile, start, min(count, start + step))
            for start in range(0, count, step)
        ]
        for future in futures:
            tally.add(future.result())
    by_area = sorted(tally.sizes, key=lambda wh: wh[0] * wh[1])
    facts = {
        "count": count,
        "seed": seed,
        "profile": profile,
        "progressive": tally.progressive,
        "grayscale": tally.grayscale,
        "total_bytes": tally.total_bytes,
        "min_wh": list(by_area[0]),
        "max_wh": list(by_area[-1]),
    }
    # Written last: a folder whose generation was interrupted has no manifest.
    manifest.write_text(json.dumps(facts, indent=2) + "\n")
    return _from_manifest(folder, facts)


def _from_manifest(folder: Path, facts: dict[str, Any]) -> PictureSet:
    return PictureSet(
        folder=folder,
        count=int(facts["count"]),
        seed=int(facts["seed"]),
        profile=str(facts["profile"]),
        progressive=int(facts["progressive"]),
        grayscale=int(facts["grayscale"]),
        total_bytes=int(facts["total_bytes"]),
        min_wh=(int(facts["min_wh"][0]), int(facts["min_wh"][1])),
        max_wh=(int(facts["max_wh"][0]), int(facts["max_wh"][1])),
    )


def userids(pictures: PictureSet, count: int | None = None) -> list[str]:
    """The userids of the first ``count`` pictures of a set."""
    return [bench_userid(pictures.seed, i) for i in range(count or pictures.count)]


def subset(pictures: PictureSet, count: int, folder: Path) -> Path:
    """A folder holding copies of the first ``count`` pictures of a set.

    Copies, not hard links: the worker refuses a picture with more than one link.
    """
    if count > pictures.count:
        raise ValueError(f"asked for {count} pictures of a set of {pictures.count}")
    if count == pictures.count:
        return pictures.folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for uid in userids(pictures, count):
        shutil.copyfile(pictures.folder / f"{uid}.jpg", folder / f"{uid}.jpg")
    return folder
