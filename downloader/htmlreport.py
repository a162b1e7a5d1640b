"""The run report: ``OUTDIR/manifest.jsonl`` → one self-contained HTML file.

``imgdl report OUTDIR`` (or ``imgdl fetch … --report``) writes
``OUTDIR/report.html``: totals, failure reasons, the hosts that failed most,
outcomes over time, and histograms of sizes and dimensions, drawn as inline SVG.
The page loads nothing (no script, no external CSS, fonts or images; a
Content-Security-Policy says so too), so it can be mailed or archived and opened
anywhere.

Memory stays bounded whatever the manifest's length: the manifest is streamed
once (``state.read_raw``, the same reader and filter as the merge), and every
figure is a bounded accumulator:

- counts by status, reason and HTTP status are :class:`report.Totals`, the same
  counter that writes ``summary.json``, so both always agree;
- histograms have fixed buckets (sizes by powers of two, dimensions by fixed
  edges);
- the timeline keeps at most :data:`MAX_BUCKETS` buckets: when the records span
  more, the bucket width doubles and neighbours merge;
- failing hosts are a :class:`BoundedCounter` (see there for when its counts are
  lower bounds; the page says so when it happened);
- one example URL and error per reason.

Every string that comes from the manifest (URLs, hosts, error messages, input
names) is hostile input: it is cut to a bounded length, stripped of control
characters and HTML-escaped before it reaches the page.
"""

from __future__ import annotations

import bisect
import dataclasses
import html
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from downloader import __version__
from downloader.errors import ImgdlError
from downloader.outcomes import Reason, Status
from downloader.report import Totals
from downloader.state import FAILURES, MANIFEST, REPORT_HTML, SUMMARY, read_raw

REPORT = REPORT_HTML
#: Hosts listed in "hosts that failed most".
TOP_HOSTS = 15
#: Distinct failing hosts counted exactly; see BoundedCounter.
HOST_CAP = 10_000
#: Bars of the timeline at most.
MAX_BUCKETS = 120
#: The timeline's narrowest bucket (a power of two, so that doubling merges exactly).
MIN_BUCKET_S = 1 / 16
#: Failure reasons that say something about the host; the input's own faults
#: (invalid_url, invalid_name, name_collision) and ours (write_error, upload_error,
#: worker_crashed, internal_error, interrupted) do not.
HOST_REASONS = frozenset(r for r in Reason if r.status is Status.FAILED) - {
    Reason.INVALID_URL,
    Reason.INVALID_NAME,
    Reason.NAME_COLLISION,
    Reason.WRITE_ERROR,
    Reason.UPLOAD_ERROR,
    Reason.WORKER_CRASHED,
    Reason.INTERNAL_ERROR,
    Reason.INTERRUPTED,
}
#: Pixel edges of the width and height histograms (the last bucket is open).
SIDE_EDGES = (1, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
#: Megapixel edges of the area histogram.
MP_EDGES = (0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 50, 100)
#: Longest string from the manifest shown on the page.
MAX_TEXT = 300
#: Plausible Unix times for finished_at (anything else is ignored as foreign).
_TIME_RANGE = (1.0, 1e11)

_COLORS = {
    Status.SAVED: "#2e7d32",
    Status.SKIPPED: "#8d99a6",
    Status.FAILED: "#c62828",
    "bars": "#1f6fb5",
}
_CONTROL = {c: "\ufffd" for c in [*range(32), 127]}


class BoundedCounter:
    """A Counter that holds at most ``2 * cap`` keys.

    When a new key would pass that, only the ``cap`` most counted stay. Counts
    are exact as long as fewer than ``2 * cap`` distinct keys were ever seen
    (``trimmed == 0``). After a trim, a dropped key that comes back starts again
    from zero, so every count is a lower bound and a key with fewer than about
    (total / cap) may be missing; the heavy hitters the report lists are kept.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counts: Counter[str] = Counter()
        self.trimmed = 0

    def add(self, key: str) -> None:
        self.counts[key] += 1
        if len(self.counts) > 2 * self.cap:
            kept = self.counts.most_common(self.cap)
            self.trimmed += len(self.counts) - len(kept)
            self.counts = Counter(dict(kept))

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return self.counts.most_common(n)


class Timeline:
    """Outcomes per time bucket, at most ``max_buckets`` buckets from first to last.

    Buckets are aligned to multiples of the width on the Unix clock, and the
    width is a power of two: doubling it maps bucket ``k`` to ``k // 2`` exactly.
    Each bucket holds [saved, skipped, failed, bytes saved].
    """

    def __init__(self, max_buckets: int = MAX_BUCKETS, width: float = MIN_BUCKET_S) -> None:
        self.max_buckets = max_buckets
        self.width = width
        self.buckets: dict[int, list[int]] = {}
        self.first = math.inf
        self.last = -math.inf

    def add(self, when: float, status: str, nbytes: int) -> None:
        self.first = min(self.first, when)
        self.last = max(self.last, when)
        while math.floor(self.last / self.width) - math.floor(self.first / self.width) >= (
            self.max_buckets
        ):
            self._widen()
        bucket = self.buckets.setdefault(math.floor(when / self.width), [0, 0, 0, 0])
        bucket[_STATUS_INDEX[status]] += 1
        if status == Status.SAVED:
            bucket[3] += nbytes

    def _widen(self) -> None:
        self.width *= 2
        merged: dict[int, list[int]] = {}
        for key, counts in self.buckets.items():
            into = merged.setdefault(key // 2, [0, 0, 0, 0])
            for i, n in enumerate(counts):
                into[i] += n
        self.buckets = merged

    def rows(self) -> list[tuple[float, list[int]]]:
        """(bucket start, counts) for every bucket from the first to the last, empty ones too."""
        if not self.buckets:
            return []
        low, high = min(self.buckets), max(self.buckets)
        return [(k * self.width, self.buckets.get(k, [0, 0, 0, 0])) for k in range(low, high + 1)]


_STATUS_INDEX: dict[str, int] = {Status.SAVED: 0, Status.SKIPPED: 1, Status.FAILED: 2}


@dataclasses.dataclass
class RunFigures:
    """Everything the page shows, gathered in one pass over the manifest."""

    totals: Totals = dataclasses.field(default_factory=Totals)
    timeline: Timeline = dataclasses.field(default_factory=Timeline)
    hosts: BoundedCounter = dataclasses.field(default_factory=lambda: BoundedCounter(HOST_CAP))
    host_reasons: BoundedCounter = dataclasses.field(
        default_factory=lambda: BoundedCounter(HOST_CAP)
    )
    #: bytes.bit_length() → saved images: bucket k holds [2^(k-1), 2^k) bytes.
    sizes: Counter[int] = dataclasses.field(default_factory=Counter)
    widths: Counter[int] = dataclasses.field(default_factory=Counter)
    heights: Counter[int] = dataclasses.field(default_factory=Counter)
    megapixels: Counter[int] = dataclasses.field(default_factory=Counter)
    no_dimensions: int = 0
    no_time: int = 0
    examples: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def add(self, record: Mapping[str, Any]) -> None:
        self.totals.add(record)
        status, reason = record["status"], record.get("reason")
        when = record.get("finished_at")
        if isinstance(when, int | float) and _TIME_RANGE[0] <= when < _TIME_RANGE[1]:
            self.timeline.add(float(when), status, _int(record.get("bytes")))
        else:
            self.no_time += 1
        if reason is not None and reason not in self.examples:
            self.examples[reason] = (record["url"], str(record.get("error") or ""))
        if status == Status.SAVED:
            self._add_image(record)
        elif reason in HOST_REASONS:
            host = host_of(record["url"])
            self.hosts.add(host)
            self.host_reasons.add(f"{reason} {host}")

    def _add_image(self, record: Mapping[str, Any]) -> None:
        self.sizes[_int(record.get("bytes")).bit_length()] += 1
        width, height = _int(record.get("width")), _int(record.get("height"))
        if width <= 0 or height <= 0:
            self.no_dimensions += 1
            return
        self.widths[bisect.bisect_right(SIDE_EDGES, width) - 1] += 1
        self.heights[bisect.bisect_right(SIDE_EDGES, height) - 1] += 1
        self.megapixels[bisect.bisect_right(MP_EDGES, width * height / 1e6) - 1] += 1

    def main_reason(self, host: str) -> str:
        """The reason counted most often for ``host`` (kept by host_reasons)."""
        best, most = "", 0
        for reason in HOST_REASONS:
            count = self.host_reasons.counts.get(f"{reason} {host}", 0)
            if count > most:
                best, most = str(reason), count
        return best


def _int(value: Any) -> int:
    """An integer field of a record; anything else (null, a string) counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def host_of(url: str) -> str:
    """The host name of a URL, as imgdl's per-host limits see it, bounded in length."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return "(unparsable URL)"
    return (host or "(no host)")[:255]


def gather(records: Iterable[Mapping[str, Any]]) -> RunFigures:
    figures = RunFigures()
    for record in records:
        figures.add(record)
    return figures


def write_report(outdir: Path, output: Path | None = None) -> Path:
    """Read ``OUTDIR/manifest.jsonl`` once and write the report; returns its path.

    Raises ImgdlError when OUTDIR has no manifest (nothing was run there yet).
    The file is written next to its final name and renamed into place, so a
    reader never sees half a page.
    """
    manifest = outdir / MANIFEST
    if not manifest.is_file():
        raise ImgdlError(
            f"no manifest in {outdir} ({manifest} not found): "
            f"run 'imgdl fetch LIST -o {outdir}' first"
        )
    target = output if output is not None else outdir / REPORT
    if target.resolve() in {(outdir / name).resolve() for name in (MANIFEST, FAILURES, SUMMARY)}:
        raise ImgdlError(f"the report would overwrite {target}: choose another --output")
    try:
        figures = gather(raw for raw, _ in read_raw(manifest))
    except OSError as exc:
        raise ImgdlError(f"cannot read {manifest}: {exc.strerror or exc}") from None
    page = render(figures, outdir, _read_summary(outdir))
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", errors="replace") as handle:
            handle.write(page)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImgdlError(f"cannot write the report {target}: {exc.strerror or exc}") from None
    return target


def report_after_fetch(outdir: Path) -> str:
    """The line ``fetch --report`` prints: the report's path, or why there is none.

    A report that cannot be written must not change the exit code of the run
    it describes, so this never raises an ImgdlError.
    """
    try:
        return f"imgdl: report {write_report(outdir)}"
    except ImgdlError as exc:
        return f"imgdl: no report: {exc}"


def _read_summary(outdir: Path) -> dict[str, Any]:
    """summary.json of the last run, if there is a readable one."""
    try:
        summary = json.loads((outdir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


# -- text ------------------------------------------------------------------------------


def _e(value: object, limit: int = MAX_TEXT) -> str:
    """Any value as safe HTML text: bounded, no control characters, escaped."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text.translate(_CONTROL), quote=True)


def _num(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


# -- charts ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    color: str


@dataclasses.dataclass(frozen=True)
class Column:
    """One bar of a column chart: its label, the count of each series, its tooltip."""

    label: str
    counts: Sequence[int]
    tip: str


def _ticks(top: float) -> list[float]:
    """Round gridline values from 0 up to at least ``top`` (at most about six)."""
    if top <= 0:
        return [0, 1]
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def column_chart(
    name: str,
    title: str,
    columns: Sequence[Column],
    series: Sequence[Series],
    y_label: str,
    per: float = 1.0,
    size: tuple[int, int] = (1100, 300),
) -> str:
    """Vertical (stacked) bars as an SVG: one column per bucket, the height of each
    series' segment being its count / ``per`` (per = bucket seconds gives a rate)."""
    width, height = size
    left, right, top, bottom = 56, 12, 14, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    heights = [sum(c.counts) / per for c in columns]
    ticks = _ticks(max(heights, default=0))
    y_max = ticks[-1]
    slot = plot_w / max(len(columns), 1)
    bar_w = max(slot * 0.82, 1)
    every = max(1, math.ceil(len(columns) / 16))  # at most ~16 x labels
    parts = [
        f'<svg class="chart" data-chart="{_e(name)}" viewBox="0 0 {width} {height}" '
        f'style="max-width:{width}px" '
        f'role="img" aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for tick in ticks:
        y = top + plot_h - plot_h * tick / y_max
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_e(_num(tick))}</text>"
        )
    for i, column in enumerate(columns):
        x = left + i * slot + (slot - bar_w) / 2
        base: float = top + plot_h
        parts.append(f'<g data-label="{_e(column.label)}"><title>{_e(column.tip)}</title>')
        for s, count in zip(series, column.counts, strict=True):
            h = plot_h * (count / per) / y_max
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{s.color}" data-series="{_e(s.name)}" data-count="{count}"/>'
            )
        parts.append("</g>")
        if i % every == 0:
            cx = left + i * slot + slot / 2
            parts.append(
                f'<text class="tick" x="{cx:.1f}" y="{top + plot_h + 14}" text-anchor="end" '
                f'transform="rotate(-35 {cx:.1f} {top + plot_h + 14})">{_e(column.label)}</text>'
            )
    parts.append(
        f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
        f'y2="{top + plot_h}"/>'
        f'<text class="axis-label" x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{_e(y_label)}</text></svg>'
    )
    return "".join(parts)


def bar_rows(name: str, title: str, rows: Sequence[tuple[str, int, str]]) -> str:
    """Horizontal bars as an SVG, one per (label, count, colour), longest first."""
    label_w, width, row_h = 260, 1100, 22
    plot_w = width - label_w - 70
    height = row_h * len(rows) + 8
    top = max((count for _, count, _ in rows), default=0) or 1
    parts = [
        f'<svg class="chart" data-chart="{_e(name)}" viewBox="0 0 {width} {height}" '
        f'style="max-width:{width}px" '
        f'role="img" aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (label, count, color) in enumerate(rows):
        y = 4 + i * row_h
        w = max(plot_w * count / top, 1)
        parts.append(
            f'<g data-label="{_e(label)}"><title>{_e(label)}: {count}</title>'
            f'<text class="row-label" x="{label_w - 8}" y="{y + 15}" text-anchor="end">'
            f"{_e(label, 40)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
            f'fill="{color}" data-count="{count}"/>'
            f'<text class="tick" x="{label_w + w + 6:.1f}" y="{y + 15}">{_num(count)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def stacked_total(by_status: Counter[str]) -> str:
    """One bar the page's width: saved, skipped and failed side by side."""
    total = sum(by_status.values()) or 1
    parts = [
        '<svg class="chart strip" data-chart="totals" viewBox="0 0 1100 26" role="img" '
        'aria-label="saved, skipped and failed lines" xmlns="http://www.w3.org/2000/svg">'
    ]
    x = 0.0
    for status in Status:
        w = 1100 * by_status[status] / total
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="26" fill="{_COLORS[status]}" '
            f'data-series="{status}" data-count="{by_status[status]}">'
            f"<title>{status}: {by_status[status]}</title></rect>"
        )
        x += w
    parts.append("</svg>")
    return "".join(parts)


# -- the page --------------------------------------------------------------------------


def _bucket_columns(
    counts: Counter[int], labels: Sequence[str], tips: Sequence[str], unit: str
) -> list[Column]:
    """Columns from the first to the last non-empty bucket (empty ones between)."""
    if not counts:
        return []
    low, high = min(counts), max(counts)
    return [
        Column(labels[k], [counts[k]], f"{tips[k]}: {counts[k]} {unit}")
        for k in range(low, high + 1)
    ]


def _size_columns(sizes: Counter[int]) -> list[Column]:
    top = max(sizes, default=0) + 1
    labels = ["0 B"] + [_bytes(1 << (k - 1)) for k in range(1, top)]
    tips = ["0 bytes"] + [f"{_bytes(1 << (k - 1))} to {_bytes(1 << k)}" for k in range(1, top)]
    return _bucket_columns(sizes, labels, tips, "images")


def _edge_columns(counts: Counter[int], edges: Sequence[float], unit: str) -> list[Column]:
    labels = [f"{e:,g}" for e in edges]
    tips = [
        f"{low:,g} to {high:,g} {unit}"
        for low, high in zip(edges, [*edges[1:], math.inf], strict=True)
    ]
    tips[-1] = f"{edges[-1]:,g} {unit} and more"
    return _bucket_columns(counts, labels, tips, "images")


def _chart_or_none(columns: list[Column], chart: str) -> str:
    return chart if columns else '<p class="none">No data.</p>'


_STYLE = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1d232a; background: #f4f6f8; }
header { background: #1d2b3a; color: #fff; padding: 18px 28px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #c7d2de; }
main { max-width: 1180px; margin: 0 auto; padding: 18px 20px 40px; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 8px; padding: 14px 18px;
  margin: 0 0 16px; }
h2 { font-size: 17px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 8px 0 4px; color: #44505c; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px;
  margin-bottom: 12px; }
.card { border: 1px solid #e3e8ee; border-radius: 6px; padding: 8px 10px; background: #fafbfc; }
.card .k { font-size: 12px; color: #5b6773; }
.card .v { font-size: 20px; font-weight: 600; }
.saved .v { color: #2e7d32; } .skipped .v { color: #5f6b77; } .failed .v { color: #c62828; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 14px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
table.narrow { width: auto; min-width: 260px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #edf0f3;
  vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.ex { word-break: break-all; color: #44505c; font-size: 12px; }
svg.chart { width: 100%; height: auto; display: block; margin: 4px 0 10px; }
svg.strip { border-radius: 4px; }
.grid { stroke: #e6eaef; } .axis { stroke: #8a96a3; }
.tick, .row-label { font-size: 11px; fill: #44505c; }
.axis-label { font-size: 11px; fill: #5b6773; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px;
  border-radius: 2px; vertical-align: -1px; }
.none, .note { color: #5b6773; font-size: 13px; }
footer { color: #7a8591; font-size: 12px; text-align: center; padding: 10px; }
"""


def _legend(series: Sequence[Series]) -> str:
    items = "".join(
        f'<span><i style="background:{s.color}"></i>{_e(s.name)}</span>' for s in series
    )
    return f'<div class="legend">{items}</div>'


def _card(key: str, label: str, value: str, raw: float | int, css: str = "") -> str:
    return (
        f'<div class="card {css}" data-total="{key}" data-value="{raw}">'
        f'<div class="k">{_e(label)}</div><div class="v">{_e(value)}</div></div>'
    )


def _totals_section(figures: RunFigures, summary: Mapping[str, Any]) -> str:
    totals = figures.totals
    lines = totals.lines
    timeline = figures.timeline
    cards = [
        _card("lines", "input lines", _num(lines), lines),
        *(_card(s, s, _num(totals.by_status[s]), totals.by_status[s], s) for s in Status),
        _card("bytes", "bytes saved", _bytes(totals.bytes), totals.bytes),
        _card("refetchable", "failures to retry", _num(totals.refetchable), totals.refetchable),
    ]
    if timeline.buckets:
        span = timeline.last - timeline.first
        cards.append(_card("span_s", "first to last record", _duration(span), round(span, 3)))
    elapsed = summary.get("elapsed_s")
    if isinstance(elapsed, int | float):
        cards.append(_card("elapsed_s", "last run's time", _duration(elapsed), elapsed))
    rate = summary.get("images_per_s")
    if isinstance(rate, int | float):
        cards.append(_card("images_per_s", "last run: images/s", _num(rate), rate))
    notes = []
    if timeline.buckets:
        notes.append(f"Records from {_utc(timeline.first)} to {_utc(timeline.last)}.")
    if isinstance(summary.get("started_at"), str) and isinstance(summary.get("exit_code"), int):
        notes.append(
            f"Last run started {_e(summary['started_at'])}, exit code {summary['exit_code']}"
            + (
                ""
                if summary.get("input_complete", True)
                else ", stopped before the end of its input"
            )
            + "."
        )
    status_series = [Series(str(s), _COLORS[s]) for s in Status]
    return (
        '<section id="totals"><h2>Totals</h2>'
        f'<div class="cards">{"".join(cards)}</div>'
        f"{stacked_total(totals.by_status)}{_legend(status_series)}"
        f'<p class="note">{" ".join(notes)}</p></section>'
    )


def _reasons_section(figures: RunFigures) -> str:
    totals = figures.totals
    by_reason = totals.by_reason.most_common()
    failed = [(r, n) for r, n in by_reason if Reason(r).status is Status.FAILED]
    rows = [(r, n, _COLORS[Status.FAILED]) for r, n in failed]
    chart = bar_rows("reasons", "failed lines by reason", rows) if rows else ""
    table = [
        '<table data-table="reasons"><thead><tr><th>reason</th><th>status</th>'
        '<th class="n">lines</th><th class="n">share</th><th>an example</th></tr></thead><tbody>'
    ]
    for reason, count in by_reason:
        url, error = figures.examples.get(reason, ("", ""))
        table.append(
            f'<tr data-reason="{_e(reason)}"><td>{_e(reason)}</td><td>{Reason(reason).status}</td>'
            f'<td class="n" data-count="{count}">{_num(count)}</td>'
            f'<td class="n">{_share(count, totals.lines)}</td>'
            f'<td class="ex">{_e(url)}<br>{_e(error)}</td></tr>'
        )
    table.append("</tbody></table>")
    http = ""
    if totals.http_errors:
        cells = "".join(
            f'<tr data-http="{code}"><td>{code}</td>'
            f'<td class="n" data-count="{n}">{_num(n)}</td></tr>'
            for code, n in totals.http_errors.most_common(20)
        )
        http = (
            '<h3>HTTP errors by status</h3><table class="narrow" data-table="http"><thead>'
            '<tr><th>status</th><th class="n">lines</th></tr></thead>'
            f"<tbody>{cells}</tbody></table>"
        )
    body = (
        chart + "".join(table) + http if by_reason else '<p class="none">Every line was saved.</p>'
    )
    return f'<section id="reasons"><h2>Failure and skip reasons</h2>{body}</section>'


def _hosts_section(figures: RunFigures) -> str:
    top = figures.hosts.most_common(TOP_HOSTS)
    if not top:
        return (
            '<section id="hosts"><h2>Hosts that failed most</h2>'
            '<p class="none">No host failed.</p></section>'
        )
    failures = sum(n for r, n in figures.totals.by_reason.items() if r in HOST_REASONS)
    chart = bar_rows(
        "hosts", "failed lines by host", [(h, n, _COLORS[Status.FAILED]) for h, n in top]
    )
    rows = "".join(
        f'<tr data-host="{_e(host)}"><td>{_e(host)}</td>'
        f'<td class="n" data-count="{n}">{_num(n)}</td>'
        f'<td class="n">{_share(n, failures)}</td><td>{_e(figures.main_reason(host))}</td></tr>'
        for host, n in top
    )
    note = (
        "Counted: failures the host had a part in (not invalid_url, invalid_name, "
        "name_collision, write_error, upload_error, worker_crashed, internal_error, "
        "interrupted)."
    )
    if figures.hosts.trimmed:
        note += (
            f" More than {2 * HOST_CAP:,} hosts failed: the counts are lower bounds "
            "(hosts seen rarely were dropped to keep memory bounded)."
        )
    return (
        f'<section id="hosts"><h2>Hosts that failed most</h2>{chart}'
        '<table data-table="hosts"><thead><tr><th>host</th><th class="n">failed lines</th>'
        f'<th class="n">of host failures</th><th>main reason</th></tr></thead><tbody>{rows}'
        f'</tbody></table><p class="note">{note}</p></section>'
    )


def _timeline_section(figures: RunFigures) -> str:
    timeline = figures.timeline
    rows = timeline.rows()
    series = [Series(str(s), _COLORS[s]) for s in Status]
    width = timeline.width
    columns = []
    start = rows[0][0] if rows else 0.0
    peak = 0.0
    for at, counts in rows:
        saved_rate = counts[0] / width
        peak = max(peak, saved_rate)
        columns.append(
            Column(
                f"+{_duration(at - start)}" if at > start else "0",
                counts[:3],
                f"{_utc(at)} (+{_duration(at - start)}): {counts[0]} saved "
                f"({_num(saved_rate)} images/s, {_bytes(counts[3] / width)}/s), "
                f"{counts[1]} skipped, {counts[2]} failed",
            )
        )
    chart = column_chart(
        "timeline", "outcomes per second over time", columns, series, "lines per second", per=width
    )
    saved_timed = sum(c[0] for _, c in rows)
    active = len([c for _, c in rows if any(c[:3])]) * width
    note = (
        f"Bars of {_duration(width)} from the first record to the last, by each line's "
        f"finished_at; the green part is the throughput in images/s. Peak {_num(peak)} "
        f"images/s; {_num(saved_timed / active if active else 0)} images/s over the bars "
        "that had any outcome."
    )
    untimed = (
        f" Records without finished_at (written by a version before it): {figures.no_time:,}."
        if figures.no_time
        else ""
    )
    if columns:
        body = chart + _legend(series) + f'<p class="note">{note}{untimed}</p>'
    else:
        body = f'<p class="none">No data.{untimed}</p>'
    return f'<section id="timeline"><h2>Throughput over time</h2>{body}</section>'


def _histograms_section(figures: RunFigures) -> str:
    one = [Series("saved images", _COLORS["bars"])]
    sizes = _size_columns(figures.sizes)
    widths = _edge_columns(figures.widths, SIDE_EDGES, "px")
    heights = _edge_columns(figures.heights, SIDE_EDGES, "px")
    areas = _edge_columns(figures.megapixels, MP_EDGES, "megapixels")

    def block(name: str, title: str, columns: list[Column], y_label: str) -> str:
        chart = column_chart(name, title, columns, one, y_label, size=(540, 240))
        return f"<div><h3>{_e(title)}</h3>{_chart_or_none(columns, chart)}</div>"

    note = ""
    if figures.no_dimensions:
        note = (
            '<p class="note">Saved images without known dimensions, not in the dimension '
            "charts (AVIF, HEIC, SVG, a header beyond the bytes held in memory, or records "
            f"of a version before width and height): {figures.no_dimensions:,}.</p>"
        )
    return (
        '<section id="histograms"><h2>Sizes and dimensions of the saved images</h2>'
        '<div class="grid2">'
        + block("sizes", "File size (log scale: each bar doubles)", sizes, "images")
        + block("megapixels", "Megapixels", areas, "images")
        + block("widths", "Width in pixels", widths, "images")
        + block("heights", "Height in pixels", heights, "images")
        + f"</div>{note}</section>"
    )


def render(figures: RunFigures, outdir: Path, summary: Mapping[str, Any]) -> str:
    """The whole page as one string (a few hundred KiB at most: its size does not
    depend on the manifest's length)."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>imgdl report: {_e(outdir)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>imgdl run report</h1><p>{_e(outdir)} · {_num(figures.totals.lines)} "
        f"lines · generated {generated}</p></header><main>"
        + _totals_section(figures, summary)
        + _reasons_section(figures)
        + _hosts_section(figures)
        + _timeline_section(figures)
        + _histograms_section(figures)
        + f"</main><footer>imgdl {__version__} · from {_e(MANIFEST)} · "
        "self-contained: no scripts, nothing loaded from the network</footer></body></html>\n"
    )
