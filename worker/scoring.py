"""Batched scoring: pictures -> outcomes, shared by the Celery worker and ``--local``.

Outcomes stay aligned with their userids by construction (each carries its userid);
the forward pass runs on whole batches (``predict_pixels``), never one
``model.predict`` per picture. Pictures stay uint8 pixels until then: Keras gets each
batch scaled by ``worker.preprocess.scale``, the compiled twin the pixels themselves
(it applies the same factor in its graph).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.model import ModelBundle
from worker.preprocess import PictureError, load_picture, pixels, scale


@dataclass(frozen=True)
class Scored:
    """A picture scored by the model."""

    userid: str
    p_female: float
    gender: str  # "female" or "male", by the model's own threshold
    digest: str = ""  # content hash of the picture (nightly --only-new)


@dataclass(frozen=True)
class Failed:
    """A picture that could not be scored, with a reason."""

    userid: str
    kind: str
    message: str

    @property
    def reason(self) -> str:
        """``kind: message``, as written to the errors CSV."""
        return f"{self.kind}: {self.message}"


Outcome = Scored | Failed


def predict_pixels(model: Any, pixels: NDArray[np.uint8], batch_size: int) -> NDArray[np.float64]:
    """Sigmoid outputs for stacked uint8 pixels, ``batch_size`` at a time.

    Keras gets each chunk scaled by ``worker.preprocess.scale``; a compiled twin
    (``takes_pixels``) gets the pixels themselves and applies the same factor in its
    graph. Only one chunk is ever held in float32.
    """
    takes_pixels = getattr(model, "takes_pixels", False)
    outputs = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        raw = model.predict_pixels(chunk) if takes_pixels else model.predict_on_batch(scale(chunk))
        outputs.append(np.asarray(raw, dtype=np.float64).reshape(-1))
    return np.concatenate(outputs) if outputs else np.zeros(0)


def to_outcome(bundle: ModelBundle, userid: str, raw: float, digest: str = "") -> Outcome:
    """A raw sigmoid output read through the model's label mapping."""
    if not np.isfinite(raw):
        return Failed(userid, "model_output", f"the model returned {raw}")
    positive = bundle.positive_class
    negative = "male" if positive == "female" else "female"
    p_female = raw if positive == "female" else 1.0 - raw
    gender = positive if raw >= bundle.threshold else negative
    return Scored(userid, round(float(p_female), 6), gender, digest)


def content_digest(data: bytes) -> str:
    """Short content hash of a picture: tells a changed picture from a scored one."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# (uint8 pixels, content digest) or why not. Pixels wait for their batch as uint8, a
# quarter of float32; ``predict_pixels`` scales one chunk at a time for Keras, and the
# twin scales inside its graph.
Prepared = tuple[NDArray[np.uint8], str] | Failed


def prepare_bytes(bundle: ModelBundle, userid: str, data: bytes, version: str = "") -> Prepared:
    """Decode one picture's bytes: its pixels and what marks it as scored (the store's
    ``version`` token when the message carried one, else a digest of its content)."""
    try:
        return pixels(data, bundle.size_wh), version or content_digest(data)
    except PictureError as exc:
        return Failed(userid, exc.kind, exc.message)
    except Exception as exc:  # anything else one picture raises is still its own error
        return Failed(userid, "decode_failed", f"{type(exc).__name__}: {exc}"[:300])


def prepare(bundle: ModelBundle, item: tuple[str, Path]) -> Prepared:
    """Read and decode one ``(userid, path)``: its pixels and digest, or a Failed."""
    userid, path = item
    try:
        data = load_picture(path)
    except PictureError as exc:
        return Failed(userid, exc.kind, exc.message)
    return prepare_bytes(bundle, userid, data)


def infer(
    bundle: ModelBundle,
    userids: Sequence[str],
    prepared: Sequence[Prepared],
    batch_size: int,
) -> list[Outcome]:
    """Forward passes over prepared pictures: one outcome per userid, in order."""
    outcomes: list[Outcome | None] = [e if isinstance(e, Failed) else None for e in prepared]
    ready = [(i, e) for i, e in enumerate(prepared) if not isinstance(e, Failed)]
    if ready:
        try:
            batch = np.stack([array for _, (array, _) in ready])
            raw = predict_pixels(bundle.model, batch, batch_size)
        except Exception as exc:  # the model failed on these inputs: their error, not a crash
            reason = f"{type(exc).__name__}: {exc}"[:300]
            for index, _ in ready:
                outcomes[index] = Failed(userids[index], "inference_failed", reason)
        else:
            for (index, (_, digest)), value in zip(ready, raw, strict=True):
                outcomes[index] = to_outcome(bundle, userids[index], float(value), digest)
    return [o for o in outcomes if o is not None]  # every slot is filled by now


# A fetched picture: (userid, its bytes or why it could not be read, version token).
Fetched = tuple[str, bytes | PictureError, str]


def score_fetched(bundle: ModelBundle, items: Sequence[Fetched], batch_size: int) -> list[Outcome]:
    """Score fetched pictures; the result has one outcome per item, in order."""
    prepared = [
        Failed(userid, data.kind, data.message)
        if isinstance(data, PictureError)
        else prepare_bytes(bundle, userid, data, version)
        for userid, data, version in items
    ]
    return infer(bundle, [userid for userid, _, _ in items], prepared, batch_size)


def score_pictures(
    bundle: ModelBundle, items: Sequence[tuple[str, Path]], batch_size: int
) -> list[Outcome]:
    """Score ``(userid, path)`` pairs; the result has one outcome per item, in order."""
    prepared = [prepare(bundle, item) for item in items]
    return infer(bundle, [userid for userid, _ in items], prepared, batch_size)
