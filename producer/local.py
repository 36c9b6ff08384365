"""``genderscore score --local``: the worker's scoring in one process, no broker.

Decoding runs in a thread pool (Pillow releases the GIL) one chunk ahead of the
forward pass, which uses every core; the scoring code is the worker's own. Pictures of
a URL prefix or a manifest are fetched with the worker's own ``Fetcher`` (its URL
policy, limits and typed errors); a store that stays unavailable is that picture's
error here, since there is no queue to hand it back to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from producer.collect import RunData
from worker.results import Prediction
from worker.settings import cpu_count, settings

CHUNK = 512


class _Results:
    """What a local run scored and failed so far; its run data at the end."""

    def __init__(self) -> None:
        self.started = time.time()
        self.predictions: dict[str, Prediction] = {}
        self.errors: dict[str, str] = {}

    def add(self, outcomes: Sequence[Any]) -> None:
        """Record a chunk's outcomes (``worker.scoring.Scored`` or ``Failed``)."""
        from worker.scoring import Failed

        now = time.time()
        for outcome in outcomes:
            if isinstance(outcome, Failed):
                self.errors[outcome.userid] = outcome.reason
            else:
                self.predictions[outcome.userid] = Prediction(outcome.p_female, outcome.gender, now)

    def run_data(self, model_path: Path, model_sha: str, source: str, total: int) -> RunData:
        """The local run as a run's data, for the collector's writers."""
        meta = {
            "model": str(model_path),
            "model_sha": model_sha,
            "source": source,
            "started_at": f"{self.started:.3f}",
            "finished_at": f"{time.time():.3f}",
            "total": str(total),
        }
        return RunData("local", meta, self.predictions, self.errors)


def score_local(
    model_path: Path,
    images_dir: Path,
    pictures: Sequence[tuple[str, str]],
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunData:
    """Score the ``(userid, file name)`` pictures of a folder in this process; return them
    as a run's data."""
    from worker.model import load_bundle
    from worker.scoring import infer, prepare

    bundle = load_bundle(model_path, tf_threads=cpu_count())
    size = batch_size or settings.batch_size
    items = [(u, images_dir / name) for u, name in pictures]
    results = _Results()
    with ThreadPoolExecutor(max_workers=cpu_count()) as pool:

        def submit(start: int) -> list[Future[Any]]:
            return [pool.submit(prepare, bundle, item) for item in items[start : start + CHUNK]]

        pending = submit(0)
        for start in range(0, len(items), CHUNK):
            prepared = [f.result() for f in pending]
            pending = submit(start + CHUNK)  # decode the next chunk during inference
            userids = [userid for userid, _ in items[start : start + CHUNK]]
            results.add(infer(bundle, userids, prepared, size))
            if progress:
                progress(len(prepared))
    return results.run_data(model_path, bundle.sha256, f"folder:{images_dir}", len(items))


def score_local_urls(
    model_path: Path,
    spec: str,
    pictures: Sequence[tuple[str, str]],
    batch_size: int | None = None,
) -> RunData:
    """Score the ``(userid, name)`` pictures of a URL prefix or manifest (``spec``, a
    run's source spec) in this process, fetching them as a worker would."""
    from worker.fetch import Fetcher, Unavailable
    from worker.model import load_bundle
    from worker.preprocess import PictureError
    from worker.scoring import Failed, Prepared, infer, prepare_bytes
    from worker.sources import parse_spec, picture_string

    bundle = load_bundle(model_path, tf_threads=cpu_count())
    size = batch_size or settings.batch_size
    source = parse_spec(spec)
    items = [(u, picture_string(source, name)) for u, name in pictures]
    results = _Results()

    def decode(entry: tuple[str, str, Any]) -> Prepared:
        userid, _, got = entry
        if isinstance(got, Unavailable | PictureError):
            return Failed(userid, got.kind, got.message)
        return prepare_bytes(bundle, userid, got)

    fetcher = Fetcher()
    try:
        with ThreadPoolExecutor(max_workers=cpu_count()) as pool:
            fetched = fetcher.fetch_pictures(items)
            for start in range(0, len(items), CHUNK):
                chunk = [next(fetched) for _ in items[start : start + CHUNK]]
                prepared = list(pool.map(decode, chunk))
                results.add(infer(bundle, [u for u, _, _ in chunk], prepared, size))
    finally:
        fetcher.close()
    return results.run_data(model_path, bundle.sha256, spec, len(items))
