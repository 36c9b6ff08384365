"""All runtime settings, read once from the environment (prefix ``GENDERSCORE_``).

Every component imports the one ``settings`` object from here; nothing else reads
the environment. The defaults are the ones measured best on a 2-core machine
(see README, Performance); each says why next to it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SettingsError(RuntimeError):
    """The environment holds an invalid setting; the message says which and why."""


class Settings(BaseSettings):
    """genderscore settings; each field is ``GENDERSCORE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="GENDERSCORE_", extra="ignore")

    # --- Redis and Celery -------------------------------------------------
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis for predictions and (by default) the broker; "
        "redis://user:password@host:port/db, rediss:// for TLS.",
    )
    broker_url: str | None = Field(None, description="Celery broker, if not redis_url.")
    key_prefix: str = Field(
        "genderscore",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Every Redis key of the project (queues included) starts with '<prefix>:'.",
    )
    # A batch takes well under a second; a SIGKILLed worker's reserved messages come
    # back after this many seconds, so it is short for scoring. Training has its own.
    visibility_timeout: int = Field(
        900, ge=10, description="Seconds before an unacked scoring message is delivered again."
    )
    score_time_limit: int = Field(300, ge=1, description="Hard limit for one batch (s).")
    training_visibility_timeout: int = Field(
        7 * 24 * 3600, ge=60, description="The same for the training queue (its own index)."
    )
    training_time_limit: int = Field(
        3 * 24 * 3600, ge=60, description="Hard limit for one training run (s)."
    )
    max_deliveries: int = Field(
        3, ge=1, description="A picture whose worker died this many times becomes an error."
    )
    result_ttl_days: int = Field(30, ge=1, description="How long a run's keys live in Redis.")
    # Redis as broker can lose a message popped by BRPOP before kombu records it as
    # unacknowledged (celery/celery#7950): scoring workers re-publish what a stalled run
    # is missing. A run is repaired at most interval + stall seconds after it stalls.
    repair_interval: float = Field(
        30, gt=0, description="Seconds between a worker's checks for stalled runs (Redis broker)."
    )
    repair_stall_seconds: float = Field(
        60,
        gt=0,
        description="A run without progress this long, and nothing of it in flight, is repaired.",
    )

    # --- Scoring ------------------------------------------------------------
    model: Path = Field(Path("models/gender.h5"), description="Keras .h5 model for scoring.")
    allow_unverified_model: bool = Field(
        False, description="Load a model with no metadata or a sha256 mismatch."
    )
    # Measured (bench/tune.py, 2 cores, origin CNN at 150x150): batches of 16, 32 and 64
    # score at the same speed per picture, but a pool process peaks at 774 MB with 16
    # against 1,046 MB with 64 (TensorFlow alone takes 642 MB).
    batch_size: int = Field(16, ge=1, le=4096, description="Pictures per forward pass.")
    # The tail of a run waits at most this long for a partial batch.
    flush_interval: float = Field(
        0.5, gt=0, description="Seconds a partial batch waits before it is scored."
    )
    # celery-batches needs prefetch x concurrency > batch_size, or a batch never fills:
    # 3 batches per process keeps one scoring, one filling and one queued.
    prefetch_batches: int = Field(
        3, ge=2, description="Batches each pool process keeps prefetched."
    )
    tf_threads: int = Field(
        0,
        ge=0,
        description="Inference threads per worker process, TensorFlow or the twin's "
        "(0: cores / concurrency).",
    )
    # Measured (docs/performance.md, origin CNN at 150x150, batch 16): the compiled twin
    # (OpenVINO) scores a picture at bf16 in half Keras' time on an AVX-512 BF16 CPU,
    # imports in 0.3 s instead of 3-10 s and needs 150 MB instead of 880 MB per process;
    # "auto" uses it when its sha256 matches the model's metadata, else Keras.
    runtime: Literal["auto", "keras", "openvino"] = Field(
        "auto",
        description="auto: the model's verified compiled twin (OpenVINO), else Keras "
        "(logged once); keras: always Keras (needs genderscore[train]); openvino: the "
        "twin or the worker does not start.",
    )
    # A precision is served only if it passed its check at export against Keras f32:
    # labels agree on >= 99.5 % of the calibration pictures and median |dp| <= 1e-3
    # (f32: max |dp| <= 1e-5). "auto" takes the fastest that passed and that this CPU
    # runs natively (int8, then bf16, then f32).
    precision: Literal["auto", "f32", "bf16", "int8"] = Field(
        "auto",
        description="Twin precision: auto (fastest that passed at export) or one that "
        "passed; a failed one is refused with its figures.",
    )
    # Three events per picture cost the worker's main process more than the messages
    # themselves on a fast CPU (docs/performance.md); Flower then shows batches.
    task_events: Literal["batch", "message"] = Field(
        "batch",
        description="Task events for Flower: one task per batch, or one per picture.",
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Larger picture files are errors."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=10_000, description="Larger pictures are errors, before decoding."
    )
    # A JPEG decodes at a reduced DCT scale; PNG, WebP, GIF, BMP and TIFF decode at full
    # size (a 16-bit 6300x6300 PNG is 79 MB decoded), so they get a lower limit.
    max_raw_image_pixels: int = Field(
        16_000_000,
        ge=10_000,
        description="Pixel limit for formats without DCT scaling (all but JPEG).",
    )

    # --- Picture sources (folders, object stores, URLs) -------------------------------
    # Issue 14: pictures come as .jpg, .jpeg, .png or .webp, in any case. A comma list
    # (".jpg,.png") or a JSON list; the same rule lists folders and URL prefixes.
    picture_extensions: Annotated[list[str], NoDecode] = Field(
        [".jpg", ".jpeg", ".png", ".webp"],
        description="File extensions listed as pictures (any case), comma-separated.",
    )
    # A manifest is user input: each scheme here is a kind of request a worker makes on
    # its behalf. No ftp (plain-text credentials), data: or javascript:.
    url_schemes: Annotated[list[str], NoDecode] = Field(
        ["s3", "gs", "https", "http", "file"],
        description="URL schemes a manifest or a source prefix may use, comma-separated.",
    )
    # file:// URLs in a manifest read the worker's own disk: only under this folder.
    file_url_root: Path | None = Field(
        None, description="Folder that file:// manifest URLs must be under (unset: refused)."
    )
    # A worker fetching a URL must not become a proxy into its own network: link-local
    # (cloud metadata at 169.254.169.254), AWS's IPv6 metadata, Alibaba's metadata.
    # Add private ranges (10.0.0.0/8, ...) here where pictures never live on them.
    fetch_blocked_networks: Annotated[list[str], NoDecode] = Field(
        ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"],
        description="Networks a worker never connects to for a picture URL, comma-separated.",
    )
    # One attempt (connect to last byte) of one picture; a stalled store or a server that
    # never answers costs this much per attempt, not the batch's whole time limit.
    fetch_timeout: float = Field(
        10.0, gt=0, le=120, description="Seconds one fetch attempt of a picture may take."
    )
    # 5xx, timeouts and connection errors are retried with backoff (0.2 s, doubling);
    # after the last attempt the picture goes back to the queue, never an error record.
    fetch_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per picture for transient store faults."
    )
    # Fetches in flight per worker process: with 20 ms per request, 16 keep a batch's
    # I/O under its decoding time (bench/sources.py).
    fetch_concurrency: int = Field(
        16, ge=1, le=256, description="Pictures fetched at once by one worker process."
    )
    fetch_max_redirects: int = Field(
        5, ge=0, le=20, description="HTTP redirects followed for one picture URL."
    )

    # --- Nightly scoring ----------------------------------------------------------
    nightly_cron: str = Field(
        "0 2 * * *", description="minute hour day month weekday (UTC), or a number of seconds"
    )
    nightly_images_dir: Path | None = Field(None, description="Folder the nightly run scores.")
    nightly_output_dir: Path = Field(
        Path("out"), description="Nightly CSVs: <date>-<run>.csv and latest.csv."
    )
    nightly_lock_seconds: int = Field(
        6 * 3600, ge=60, description="Expiry of the lock that stops overlapping nightly runs."
    )
    # A share that failed to mount, or a sync that deleted most pictures, must not pass
    # as "nothing new": the night is refused and recorded as failed.
    nightly_min_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The nightly run refuses a source below this share of the previous "
        "night's picture count (0: never).",
    )
    # How often the nightly run's finisher checks whether the run is done.
    nightly_poll_seconds: float = Field(
        30, gt=0, description="How often the nightly run checks whether it finished."
    )

    @field_validator("picture_extensions", "url_schemes", "fetch_blocked_networks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # "a,b" or '["a", "b"]' from the environment; lists as they are from code.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("picture_extensions")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        exts = [("." + e.lstrip(".")).lower() for e in value]
        for ext in exts:
            if not re.fullmatch(r"\.[a-z0-9]{1,10}", ext):
                raise ValueError(f"{ext!r} is not a file extension like .jpg")
        if not exts:
            raise ValueError("at least one extension is needed")
        return list(dict.fromkeys(exts))

    @field_validator("url_schemes")
    @classmethod
    def _schemes(cls, value: list[str]) -> list[str]:
        schemes = [s.lower().removesuffix("://").removesuffix(":") for s in value]
        for scheme in schemes:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]{0,19}", scheme):
                raise ValueError(f"{scheme!r} is not a URL scheme like s3")
            if scheme in ("data", "javascript"):
                raise ValueError(f"{scheme}: URLs carry no picture location")
        return list(dict.fromkeys(schemes))

    @field_validator("fetch_blocked_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network like 169.254.0.0/16") from None
        return value

    @model_validator(mode="after")
    def _limits_below_visibility(self) -> Settings:
        # A task still running when its message becomes visible again is delivered twice.
        if self.score_time_limit >= self.visibility_timeout:
            raise ValueError(
                f"score_time_limit ({self.score_time_limit}s) must be below "
                f"visibility_timeout ({self.visibility_timeout}s)"
            )
        if self.training_time_limit >= self.training_visibility_timeout:
            raise ValueError(
                f"training_time_limit ({self.training_time_limit}s) must be below "
                f"training_visibility_timeout ({self.training_visibility_timeout}s)"
            )
        return self

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker URL."""
        return self.broker_url or self.redis_url


def load_settings() -> Settings:
    """Read and validate the settings, raising SettingsError with a readable message."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"GENDERSCORE_{'_'.join(str(p) for p in err['loc']).upper() or '?'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid genderscore settings: {problems}") from None


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


settings = load_settings()
