"""Generated sample data in the course's layout: pictures with a learnable signal.

Used by the quickstart (``genderscore demo``), the tests and nothing at scoring time.
Female pictures carry a warm square, male ones a cool disc, both under noise, so a
small CNN learns them in a few epochs; nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def userid(n: int) -> str:
    """A course-like userid: 32 hex characters."""
    return f"{n:032x}"


def picture(gender: str, size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """A noisy picture whose class shows: female = warm square, male = cool disc."""
    rng = np.random.default_rng(seed)
    w, h = size
    array = rng.integers(60, 140, size=(h, w, 3)).astype(np.int16)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.uniform(-h / 10, h / 10), w / 2 + rng.uniform(-w / 10, w / 10)
    r = min(w, h) * rng.uniform(0.22, 0.32)
    if gender == "female":
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        array[mask] = array[mask] // 3 + np.array([170, 60, 40])
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        array[mask] = array[mask] // 3 + np.array([40, 80, 170])
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, **options: Any) -> bytes:
    """Encode as JPEG."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def make_pictures(
    folder: Path,
    count: int,
    start: int = 0,
    size: tuple[int, int] = (64, 64),
    female_share: float = 0.6,
) -> dict[str, str]:
    """Write ``count`` labelled pictures ``<userid>.jpg``; return userid -> gender."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for n in range(start, start + count):
        gender = "female" if (n * 7919 % 100) < female_share * 100 else "male"
        uid = userid(n)
        (folder / f"{uid}.jpg").write_bytes(jpeg_bytes(picture(gender, size, seed=n)))
        labels[uid] = gender
    return labels


def write_profiles(path: Path, labels: dict[str, str]) -> None:
    """A course-format profile.csv (unnamed index column, gender 1.0 = female)."""
    lines = [",userid,age,gender,ope,con,ext,agr,neu"]
    for i, (uid, gender) in enumerate(sorted(labels.items())):
        code = "1.0" if gender == "female" else "0.0"
        lines.append(f"{i},{uid},23.0,{code},3.9,3.4,3.5,3.6,2.7")
    path.write_text("\n".join(lines) + "\n")


def make_sample(
    root: Path, count: int = 400, size: tuple[int, int] = (96, 96)
) -> tuple[Path, Path]:
    """A course-layout data root: ``image/<userid>.jpg`` and ``profile/profile.csv``."""
    labels = make_pictures(root / "image", count, size=size)
    profile = root / "profile" / "profile.csv"
    profile.parent.mkdir(parents=True, exist_ok=True)
    write_profiles(profile, labels)
    return root / "image", profile
