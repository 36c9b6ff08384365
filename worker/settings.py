"""All runtime settings, read once from the environment (prefix ``GENDERSCORE_``).

Every component imports the one ``settings`` object from here; nothing else reads
the environment. Where ``GENDERSCORE_SECRETS_DIR`` names a folder (Compose's
``/run/secrets``), a file there named like a variable is read for a variable the
environment does not set: passwords stay out of the environment. The defaults are the
ones measured best on a 2-core machine (see README, Performance); each says why next
to it.

``settings`` is read on first use, not when this module is imported, so that each
entry point turns an invalid environment into one line and exit status 2 instead of
a traceback: the ``genderscore`` command through its error handling, ``celery -A
worker`` through ``require_settings`` when the app module loads. An error names the
variable of every field involved. A ``GENDERSCORE_*`` variable that is no setting is
reported with the closest setting's name (``unknown_variables``), once logging is up.

``python -m worker.settings --markdown`` prints the README's settings table.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "GENDERSCORE_"
# Variables of the GENDERSCORE_ namespace that are not settings: docker-compose.yml's
# own (substituted into the file, never read by the code), and the test suite's.
NOT_SETTINGS = frozenset(
    {
        "GENDERSCORE_IMAGE",
        "GENDERSCORE_UID",
        "GENDERSCORE_GID",
        "GENDERSCORE_INPUT_DIR",
        "GENDERSCORE_MODELS_DIR",
        "GENDERSCORE_OUTPUT_DIR",
        "GENDERSCORE_MODEL_FILE",
        "GENDERSCORE_NIGHTLY_PICTURES",
        "GENDERSCORE_WORKER_CONCURRENCY",
    }
)
TEST_NAMESPACE = "GENDERSCORE_TEST_"  # the test suite's variables (tests/conftest.py)
SECRET_FIELDS = frozenset({"redis_url", "broker_url"})  # URLs that may hold a password


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
    # docker-compose.yml mounts the URLs (with their passwords) as secret files, so that
    # no password sits in a container's environment (`docker inspect`, /proc/*/environ).
    # pydantic-settings reads the environment first, then the files: a variable set in
    # the environment wins over its file.
    secrets_dir: Path | None = Field(
        None,
        description="Folder of secret files named like these variables (e.g. "
        "GENDERSCORE_REDIS_URL), each holding its value; a variable in the environment wins "
        "over its file.",
    )
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
    # The tail of a run waits at most this long for a partial batch; with a Redis broker
    # a partial batch is scored as soon as the queue is empty (worker.redis_transport).
    flush_interval: float = Field(
        0.5,
        gt=0,
        description="Seconds a partial batch waits before it is scored (Redis broker: "
        "no wait once the queue is empty).",
    )
    # celery-batches needs prefetch x concurrency > batch_size, or a batch never fills:
    # 3 batches per process keeps one scoring, one waiting in its pipe (pool_batches)
    # and one filling.
    prefetch_batches: int = Field(
        3, ge=2, description="Batches each pool process keeps prefetched."
    )
    # Celery's fair scheduling writes a pool process its next job only once it has
    # returned the last: the process then waited about 2 ms per batch for the main
    # process (docs/performance.md, issue 12). With 2, the next batch waits in its pipe.
    pool_batches: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches handed to each pool process at once: 2 hands over the next "
        "while one is scored; 1 hands over one at a time (Celery's -O fair).",
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
    # Issue 10: where pictures sit in an object store, the nightly run lists a URL prefix
    # (ETag or version from the listing, no download) and workers on any host fetch it.
    nightly_source: str | None = Field(
        None,
        description="Folder or URL prefix (s3://bucket/profiles/image/) the nightly run "
        "scores, instead of GENDERSCORE_NIGHTLY_IMAGES_DIR.",
    )
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

    # --- Operations ------------------------------------------------------------------
    # Log collectors (Loki, CloudWatch, journald with a JSON parser) want one object per
    # line; people at a terminal want text.
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Logs of the CLI and the workers: text, or json (one object per line).",
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
        problems = [
            f"{env_name(limit)}={getattr(self, limit)} must be below "
            f"{env_name(timeout)}={getattr(self, timeout)} (seconds)"
            for limit, timeout in (
                ("score_time_limit", "visibility_timeout"),
                ("training_time_limit", "training_visibility_timeout"),
            )
            if getattr(self, limit) >= getattr(self, timeout)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _prefetch_beyond_the_pool(self) -> Settings:
        # Batches fill from prefetched messages: with every prefetched batch in the pool,
        # none would fill while the pool processes score.
        if self.pool_batches >= self.prefetch_batches:
            raise ValueError(
                f"GENDERSCORE_POOL_BATCHES={self.pool_batches} must be below "
                f"GENDERSCORE_PREFETCH_BATCHES={self.prefetch_batches}"
            )
        return self

    @model_validator(mode="after")
    def _one_nightly_source(self) -> Settings:
        if self.nightly_source is None:
            return self
        if self.nightly_images_dir is not None:
            raise ValueError(
                "GENDERSCORE_NIGHTLY_SOURCE and GENDERSCORE_NIGHTLY_IMAGES_DIR are both set: "
                "set one (GENDERSCORE_NIGHTLY_SOURCE takes a folder or a URL prefix)"
            )
        from worker.sources import SourceError, parse_source

        try:
            parse_source(self.nightly_source, self.url_schemes)
        except SourceError as exc:
            raise ValueError(f"GENDERSCORE_NIGHTLY_SOURCE: {exc}") from None
        return self

    @property
    def nightly_source_text(self) -> str | None:
        """What the nightly run scores: GENDERSCORE_NIGHTLY_SOURCE, else the images folder."""
        if self.nightly_source is not None:
            return self.nightly_source
        return None if self.nightly_images_dir is None else str(self.nightly_images_dir)

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker URL."""
        return self.broker_url or self.redis_url


def env_name(field: str) -> str:
    """The environment variable of a settings field: ``GENDERSCORE_<FIELD>``."""
    return f"{ENV_PREFIX}{field.upper()}"


def _problem(err: Mapping[str, Any]) -> str:
    """One validation error as ``VARIABLE='value': reason`` (secrets never shown)."""
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        reason = str(err["ctx"]["error"])  # our own validators name their variables
    else:
        reason = str(err["msg"])
    loc = [str(part) for part in err["loc"]]
    if not loc:
        return reason
    field = loc[0]
    shown = "" if field in SECRET_FIELDS else f"={err.get('input')!r}"
    return f"{env_name(field)}{shown}: {reason}"


def _secrets_dir(environ: Mapping[str, str]) -> Path | None:
    """``GENDERSCORE_SECRETS_DIR`` (any case, as the settings read it), an existing folder."""
    name = env_name("secrets_dir")
    value = next((v for k, v in environ.items() if k.upper() == name), "")
    if not value:
        return None
    folder = Path(value)
    if not folder.is_dir():  # pydantic-settings would only warn, and read nothing
        raise SettingsError(f"invalid genderscore settings: {name}={value!r}: no such folder")
    return folder


def load_settings() -> Settings:
    """Read and validate the settings, raising SettingsError with a readable message.

    Sources, first wins: the environment, then the files of ``GENDERSCORE_SECRETS_DIR``,
    then the defaults.
    """
    folder = _secrets_dir(os.environ)
    try:
        with warnings.catch_warnings():
            # pydantic-settings skips, with only a warning, a secret file it will not read
            # (one that resolves outside the folder, a folder by a setting's name): the
            # setting would silently fall back to its default.
            warnings.filterwarnings("error", "attempted to load secret file", UserWarning)
            return Settings(_secrets_dir=folder)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise SettingsError(f"invalid genderscore settings: {problems}") from None
    except SourceError as exc:  # a secret file this user may not read, or one it would skip
        cause = exc.__cause__
        if isinstance(cause, UserWarning):
            raise SettingsError(f"invalid genderscore settings: {cause}") from None
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else exc
        field = re.search(r'field "(\w+)"', str(exc))
        name = env_name(field.group(1)) if field else "a file"
        raise SettingsError(
            f"invalid genderscore settings: cannot read {name} of "
            f"{env_name('secrets_dir')}={folder}: {reason} (secret files must be readable "
            "by the user this runs as)"
        ) from None


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``GENDERSCORE_*`` variable that is no setting (a typo, mostly)."""
    env = os.environ if environ is None else environ
    known = {env_name(name) for name in Settings.model_fields}
    warnings = []
    for name in sorted(env):
        upper = name.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in known
            or upper in NOT_SETTINGS
            or upper.startswith(TEST_NAMESPACE)
        ):
            continue
        # Compared without the prefix, which every name shares.
        fields = sorted(field.upper() for field in Settings.model_fields)
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), fields, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        warnings.append(f"{name} is not a genderscore setting and is ignored{hint}")
    return warnings


def require_settings() -> Settings:
    """The settings, or one line on stderr and exit status 2 when they are invalid.

    For entry points that have no error handling of their own around the import of
    the app (``celery -A worker ...``).
    """
    try:
        return _loaded()
    except SettingsError as exc:
        sys.stderr.write(f"genderscore: {exc}\n")
        raise SystemExit(2) from None


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- what is in force, and the README's table ------------------------------------------


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):  # comma lists, as the environment gives them
        return ",".join(str(item) for item in value)
    return str(value)


def describe(
    s: Settings, environ: Mapping[str, str] | None = None
) -> Iterator[tuple[str, str, str]]:
    """``(variable, value, source)`` of every setting, URLs with their passwords masked.

    The source is ``environment`` for a value read from a ``GENDERSCORE_*`` variable
    (any case, as pydantic-settings reads them), ``secrets`` for one read from a file of
    ``GENDERSCORE_SECRETS_DIR``, else ``default``.
    """
    from worker.results import redact

    env = os.environ if environ is None else environ
    present = {name.upper() for name in env}
    folder = s.secrets_dir
    files = (
        {p.name.upper() for p in folder.iterdir() if p.is_file()}
        if folder is not None and folder.is_dir()
        else set()
    )
    for field in Settings.model_fields:
        value = getattr(s, field)
        shown = redact(value) if field in SECRET_FIELDS and value else _shown(value)
        name = env_name(field)
        source = "environment" if name in present else "secrets" if name in files else "default"
        yield name, shown, source


def markdown_table() -> str:
    """The README's settings table: variable, default and description of every field."""
    lines = ["| variable | default | what |", "| --- | --- | --- |"]
    for field, info in Settings.model_fields.items():
        default = _shown(info.default)
        description = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{env_name(field)}` | `{default}` | {description} |")
    return "\n".join(lines) + "\n"


_settings: Settings | None = None


def _loaded() -> Settings:
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


# ``settings`` is read on first use (module __getattr__, PEP 562), once per process.
settings: Settings


def __getattr__(name: str) -> Any:
    if name == "settings":
        loaded = _loaded()
        globals()["settings"] = loaded
        return loaded
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m worker.settings --markdown")
    sys.stdout.write(markdown_table())
