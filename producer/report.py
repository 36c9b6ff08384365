"""``genderscore report``: one self-contained HTML page about a run.

The page (``index.html``, PNG plots embedded as data URIs: no network, one file to
mail or archive) shows the run's facts, the histogram of ``p_female``, throughput
over the run, errors by type, a table of errors and, given labels, accuracy against
the majority baseline, a confusion matrix and accuracy per confidence band.

Numbers are computed by plain functions (``run_facts``, and ``worker.evaluation``'s
``evaluate``, which ``genderscore evaluate`` uses too), so what the page shows can be
checked against the collected CSV. matplotlib is imported inside
the plotting functions and used through its object API with the Agg canvas: no
pyplot state, no display needed.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.collect import RunData, iso, prediction_frame
from worker.evaluation import GENDERS, Band, Evaluation, evaluate
from worker.files import write_atomic
from worker.results import Prediction

log = logging.getLogger(__name__)

ERROR_ROWS = 100  # errors listed in the table; the rest are counted


@dataclass(frozen=True)
class RunFacts:
    """The headline numbers of a run."""

    run_id: str
    model_sha: str
    model_created_at: str
    val_accuracy: float | None
    total: int
    scored: int
    errors: int
    missing: int
    started_at: float | None
    finished_at: float | None
    finished_estimated: bool  # no finished_at yet: the last prediction's time is used

    @property
    def wall_s(self) -> float | None:
        """Seconds from the run's start to its end."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def images_per_s(self) -> float | None:
        """Pictures scored per second of wall time."""
        wall = self.wall_s
        return self.scored / wall if wall else None


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_facts(data: RunData, model_meta: Mapping[str, Any] | None = None) -> RunFacts:
    """The facts of a run; ``model_meta`` is the model's metadata JSON, when known."""
    meta = model_meta or {}
    started = _float(data.meta.get("started_at"))
    finished = _float(data.meta.get("finished_at"))
    estimated = finished is None and bool(data.predictions)
    if estimated:
        finished = max(p.scored_at for p in data.predictions.values())
    settled = len(data.predictions) + len(data.errors) + len(data.missing)
    total = int(_float(data.meta.get("total")) or 0)
    return RunFacts(
        run_id=data.run_id,
        model_sha=data.meta.get("model_sha") or str(meta.get("sha256", "")),
        model_created_at=str(meta.get("created_at", "")),
        val_accuracy=_float(meta.get("val_accuracy")),
        total=max(total, settled),
        scored=len(data.predictions),
        errors=len(data.errors),
        missing=len(data.missing),
        started_at=started,
        finished_at=finished,
        finished_estimated=estimated,
    )


def evaluate_run(data: RunData, labels: Mapping[str, str]) -> Evaluation:
    """The run's predictions against ``labels`` (``worker.evaluation``)."""
    return evaluate(
        prediction_frame(data.predictions), labels, errors=data.errors, what=f"run {data.run_id}"
    )


def error_kind(reason: str) -> str:
    """``kind`` of a ``kind: message`` error reason."""
    kind = reason.split(":", 1)[0].strip()
    return kind or "unknown"


# -- plots -------------------------------------------------------------------------


def _figure(width: float = 6.0, height: float = 3.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_p_female(values: Sequence[float], threshold: float = 0.5) -> bytes:
    """PNG: histogram of p_female over [0, 1], with the decision threshold."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.hist(values, bins=40, range=(0.0, 1.0), color="#7a5195", edgecolor="white")
    axes.axvline(threshold, color="#333333", linestyle="--", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_xlabel("p_female")
    axes.set_ylabel("users")
    axes.set_title(f"p_female of {len(values)} scored pictures")
    return _png(figure)


def throughput_bins(
    times: Sequence[float], start: float, max_bins: int = 60
) -> tuple[int, list[int]]:
    """Bin width (whole seconds) and predictions per bin, counted from ``start``.

    Whole-second bins, because ``scored_at`` has one-second resolution.
    """
    origin = math.floor(start)
    offsets = [max(0.0, t - origin) for t in times]
    span = max(offsets, default=0.0) + 1
    width = max(1, math.ceil(span / max_bins))
    counts = [0] * max(1, math.ceil(span / width))
    for offset in offsets:
        counts[min(int(offset // width), len(counts) - 1)] += 1
    return width, counts


def plot_throughput(times: Sequence[float], start: float) -> bytes:
    """PNG: pictures scored per second over the run's duration."""
    width, counts = throughput_bins(times, start)
    figure = _figure()
    axes = figure.add_subplot()
    lefts = [i * width for i in range(len(counts))]
    axes.bar(lefts, [c / width for c in counts], width=width, align="edge", color="#ef5675")
    axes.set_xlabel(f"seconds since the run started ({width} s bins)")
    axes.set_ylabel("pictures scored / s")
    axes.set_title("throughput")
    return _png(figure)


def plot_errors(kinds: Mapping[str, int]) -> bytes:
    """PNG: errors by type, largest first.

    An error kind comes from the data (a worker wrote it): it is drawn as plain text,
    never read as mathtext or TeX (``$...$`` in a kind would otherwise be parsed, and a
    malformed one would stop the report), and cut to 60 characters.
    """
    from matplotlib import rc_context

    items = sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
    with rc_context({"text.parse_math": False, "text.usetex": False}):
        figure = _figure(height=max(1.6, 0.9 + 0.35 * len(items)))
        axes = figure.add_subplot()
        names = [name[:60] for name, _ in reversed(items)]
        axes.barh(names, [count for _, count in reversed(items)], color="#ffa600")
        axes.set_xlabel("pictures")
        axes.set_title("errors by type")
        return _png(figure)


def plot_bands(bands: Sequence[Band]) -> bytes:
    """PNG: accuracy per confidence band |p - 0.5|."""
    figure = _figure()
    axes = figure.add_subplot()
    names = [f"{b.low:.1f}-{b.high:.1f}" for b in bands]
    axes.bar(names, [b.accuracy or 0.0 for b in bands], color="#003f5c")
    for index, band in enumerate(bands):
        axes.annotate(
            f"n={band.users}", (index, (band.accuracy or 0.0) + 0.02), ha="center", fontsize=8
        )
    axes.set_ylim(0, 1.1)
    axes.set_xlabel("|p_female - 0.5|")
    axes.set_ylabel("accuracy")
    axes.set_title("accuracy per confidence band")
    return _png(figure)


# -- HTML --------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots img { max-width: 540px; }
.note { color: #666; font-size: .9em; } code { font-size: .95em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _when(ts: float | None) -> str:
    return iso(ts) if ts is not None else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _row(key: str, label: str, value: object) -> str:
    return f'<tr data-key="{key}"><th>{_e(label)}</th><td class="num">{_e(value)}</td></tr>'


def facts_html(facts: RunFacts) -> str:
    """The facts table."""
    rate = facts.images_per_s
    finished = _when(facts.finished_at) + (
        " (last prediction; run not finished)" if facts.finished_estimated else ""
    )
    rows = [
        _row("model_sha", "model sha256", facts.model_sha or "unknown"),
        _row("model_created_at", "model created", facts.model_created_at or "unknown"),
        _row(
            "val_accuracy",
            "model validation accuracy",
            "unknown" if facts.val_accuracy is None else f"{facts.val_accuracy:.4f}",
        ),
        _row("total", "pictures", facts.total),
        _row("scored", "scored", facts.scored),
        _row("errors", "errors", facts.errors),
    ]
    if facts.missing:
        rows.append(_row("missing", "missing (not settled yet)", facts.missing))
    rows += [
        _row("started", "started", _when(facts.started_at)),
        _row("finished", "finished", finished),
        _row("wall_time", "wall time", _duration(facts.wall_s)),
        _row("images_per_s", "pictures scored / s", "-" if rate is None else f"{rate:.1f}"),
    ]
    return "<table>" + "".join(rows) + "</table>"


def evaluation_html(result: Evaluation) -> str:
    """Accuracy, baseline, confusion matrix and band tables."""
    summary = "".join(
        [
            _row("labelled_users", "labelled scored users", result.users),
            _row("accuracy", "accuracy", f"{result.accuracy:.4f}"),
            _row(
                "majority_baseline",
                f"majority baseline (always {result.majority_class})",
                f"{result.majority_accuracy:.4f}",
            ),
            _row("labelled_errors", "labelled users not scored (errors)", result.labelled_errors),
            _row("unlabelled", "scored users without a label", result.unlabelled),
        ]
    )
    head = "".join(f"<th>predicted {g}</th>" for g in GENDERS)
    body = "".join(
        f"<tr><th>true {t}</th>"
        + "".join(
            f'<td class="num" data-key="confusion_{t}_{g}">{result.confusion[(t, g)]}</td>'
            for g in GENDERS
        )
        + "</tr>"
        for t in GENDERS
    )
    bands = "".join(
        f'<tr data-key="band_{i}"><td>{b.low:.1f} &le; |p &minus; 0.5| '
        f"{'&le;' if i == len(result.bands) - 1 else '&lt;'} {b.high:.1f}</td>"
        f'<td class="num">{b.users}</td><td class="num">{_pct(b.accuracy)}</td></tr>'
        for i, b in enumerate(result.bands)
    )
    return (
        f"<table>{summary}</table>"
        f"<h3>Confusion matrix</h3><table><tr><th></th>{head}</tr>{body}</table>"
        "<h3>Accuracy per confidence band</h3>"
        f"<table><tr><th>band</th><th>users</th><th>accuracy</th></tr>{bands}</table>"
    )


def errors_html(errors: Mapping[str, str], limit: int = ERROR_ROWS) -> str:
    """The first ``limit`` errors by userid, with a count of the rest."""
    if not errors:
        return "<p>No errors.</p>"
    items = sorted(errors.items())
    rows = "".join(
        f"<tr><td><code>{_e(u)}</code></td><td>{_e(r)}</td></tr>" for u, r in items[:limit]
    )
    rest = len(items) - limit
    more = ""
    if rest > 0:
        more = f'<p class="note" data-key="errors_more">&hellip; and {rest} more</p>'
    return f"<table><tr><th>userid</th><th>reason</th></tr>{rows}</table>{more}"


def render_html(
    data: RunData, facts: RunFacts, result: Evaluation | None, labels_name: str | None = None
) -> str:
    """The whole page."""
    predictions: list[Prediction] = list(data.predictions.values())
    plots = []
    if predictions:
        plots.append(_img(plot_p_female([p.p_female for p in predictions]), "p_female histogram"))
        start = facts.started_at
        if start is None:
            start = min(p.scored_at for p in predictions)
        plots.append(_img(plot_throughput([p.scored_at for p in predictions], start), "throughput"))
    kinds = Counter(error_kind(r) for r in data.errors.values())
    if kinds:
        plots.append(_img(plot_errors(kinds), "errors by type"))
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>genderscore run {_e(data.run_id)}</title><style>{CSS}</style></head><body>",
        f"<h1>genderscore run <code>{_e(data.run_id)}</code></h1>",
        f'<p class="note">Generated {_e(iso(time.time()))}.</p>',
        "<h2>Run</h2>",
        facts_html(facts),
        '<h2>Plots</h2><div class="plots">',
        *plots,
        "</div>",
    ]
    if result is not None:
        parts += [
            f"<h2>Against labels <code>{_e(labels_name or '')}</code></h2>",
            evaluation_html(result),
            '<div class="plots">',
            _img(plot_bands(result.bands), "accuracy per confidence band"),
            "</div>",
        ]
    if kinds:
        parts.append(
            "<h2>Errors by type</h2><table>"
            + "".join(
                f'<tr data-key="kind_{_e(k)}"><th>{_e(k)}</th><td class="num">{n}</td></tr>'
                for k, n in sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
            )
            + "</table>"
        )
    parts += ["<h2>Errors</h2>", errors_html(data.errors), "</body></html>\n"]
    return "\n".join(parts)


def build_report(
    data: RunData,
    out_dir: Path,
    labels: Mapping[str, str] | None = None,
    model_meta: Mapping[str, Any] | None = None,
    labels_name: str | None = None,
) -> Path:
    """Write ``<out_dir>/index.html`` for a run; return its path.

    ``labels`` maps userid -> "male"/"female" (``read_labels(...).genders``);
    ``model_meta`` is the model's metadata JSON (``worker.model.read_metadata``).
    """
    run_sha = data.meta.get("model_sha")
    meta_sha = (model_meta or {}).get("sha256")
    if model_meta and run_sha and meta_sha != run_sha:
        log.warning(
            "model metadata sha256 %s is not the run's model %s (the file was replaced "
            "since the run): its created_at and val_accuracy are left out",
            str(meta_sha)[:12],
            run_sha[:12],
        )
        model_meta = None
    facts = run_facts(data, model_meta)
    result = evaluate_run(data, labels) if labels is not None else None
    page = render_html(data, facts, result, labels_name)
    path = out_dir / "index.html"
    write_atomic(path, page.encode("utf-8"))
    log.info("report of run %s: %s", data.run_id, path)
    return path
