"""The run report: numbers checked against the manifest, hostile strings, a real browser.

One real run (the CLI against the dev server: good images on two host names, 404s,
500s, cut bodies, HTML pages, an invalid line, a duplicate, a body large enough to
be spooled) is shared by the tests of this module.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from downloader.devserver import DevServer
from downloader.htmlreport import (
    HOST_REASONS,
    MAX_BUCKETS,
    SIDE_EDGES,
    BoundedCounter,
    Timeline,
    host_of,
    report_after_fetch,
    write_report,
)
from downloader.outcomes import Outcome, Reason, Status
from tests.conftest import read_manifest, read_summary, run_cli, write_list
from tests.headless import check_page, install_browser


class Page(HTMLParser):
    """What the report's data attributes say, plus every tag and attribute name seen."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.totals: dict[str, float] = {}
        self.rows: dict[str, dict[str, int]] = {"reason": {}, "host": {}, "http": {}}
        self.charts: dict[str, list[dict[str, str]]] = {}
        self.tags: Counter[str] = Counter()
        self.attributes: list[tuple[str, str]] = []
        self.text: list[str] = []
        self._chart: str | None = None
        self._label: str | None = None
        self._row: tuple[str, str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.tags[tag] += 1
        self.attributes += found.items()
        if tag == "svg":
            self._chart = found.get("data-chart", "")
            self.charts.setdefault(self._chart, [])
        elif tag == "g" and "data-label" in found:
            self._label = found["data-label"]
        elif tag == "rect" and self._chart is not None:
            self.charts[self._chart].append({**found, "label": self._label or ""})
        elif tag == "tr":
            for kind in self.rows:
                if f"data-{kind}" in found:
                    self._row = (kind, found[f"data-{kind}"])
        elif tag == "td" and "data-count" in found and self._row is not None:
            kind, key = self._row
            self.rows[kind][key] = int(found["data-count"])
        if "data-total" in found:
            self.totals[found["data-total"]] = float(found["data-value"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        elif tag == "g":
            self._label = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def counts(self, chart: str, series: str | None = None) -> Counter[str]:
        """Count per bar label of one chart (one series of it, or all)."""
        found: Counter[str] = Counter()
        for rect in self.charts[chart]:
            if series is None or rect.get("data-series") == series:
                found[rect["label"]] += int(rect["data-count"])
        return found


@dataclasses.dataclass
class Run:
    out: Path
    records: list[dict[str, Any]]
    started: float
    ended: float
    fetch_stderr: str


def _noise_png(size: tuple[int, int]) -> bytes:
    """A PNG too big to be held in memory by the fetcher (it is spooled to disk)."""
    out = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    big = _noise_png((500, 300))  # about 450 kB: more than the 256 KiB held
    assert len(big) > 256 * 1024
    with DevServer(bodies={"big": (big, "image/png")}) as server:
        other = server.url.replace("127.0.0.1", "localhost")
        urls = [f"{server.url}/i/{n}.jpg" for n in range(40)]
        urls += [f"{other}/i/{n}.jpg" for n in range(100, 110)]
        urls += [f"{server.url}/status/404/{n}" for n in range(5)]
        urls += [f"{other}/status/500/{n}" for n in range(2)]
        urls += [f"{server.url}/truncated/{n}" for n in range(3)]
        urls += [f"{other}/html/{n}" for n in range(4)]
        urls += [f"{server.url}/body/big", "ftp://example.invalid/x.jpg", urls[0]]
        folder = tmp_path_factory.mktemp("report")
        listing = write_list(folder / "urls.txt", urls)
        out = folder / "out"
        started = time.time()
        fetched = run_cli("fetch", str(listing), "-o", str(out), "--tries", "1", "--report")
        ended = time.time()
    assert fetched.returncode == 1, fetched.stderr
    yield Run(out, read_manifest(out), started, ended, fetched.stderr)


def test_fetch_report_flag_writes_the_page(run: Run) -> None:
    page = run.out / "report.html"
    assert f"imgdl: report {page}" in run.fetch_stderr
    assert Page(page.read_text(encoding="utf-8")).totals["lines"] == len(run.records)


def test_manifest_has_sizes_and_times(run: Run) -> None:
    saved = [r for r in run.records if r["status"] == Status.SAVED]
    assert len(saved) == 51
    for record in saved:
        with Image.open(run.out / record["path"]) as img:
            assert (record["width"], record["height"]) == img.size, record["url"]
    assert {(r["width"], r["height"]) for r in saved if r["url"].endswith("/big")} == {(500, 300)}
    for record in run.records:
        assert run.started <= record["finished_at"] <= run.ended
        if record["status"] != Status.SAVED:
            assert record["width"] is None and record["height"] is None


def test_report_numbers_match_the_manifest(run: Run, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.html"
    result = run_cli("report", str(run.out), "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert f"imgdl: report {target}" in result.stderr
    page = Page(target.read_text(encoding="utf-8"))
    records = run.records
    by_status = Counter(r["status"] for r in records)
    saved = [r for r in records if r["status"] == Status.SAVED]

    # Totals: the manifest's counts, and the same as summary.json's.
    summary = read_summary(run.out)
    assert page.totals["lines"] == len(records) == summary["lines"] == 67
    for status in Status:
        assert page.totals[status] == by_status[status] == summary[status]
    assert page.totals["bytes"] == sum(r["bytes"] for r in saved) == summary["bytes"]
    assert page.totals["refetchable"] == summary["refetchable_failures"]
    assert page.totals["elapsed_s"] == summary["elapsed_s"]
    strip = {r["data-series"]: int(r["data-count"]) for r in page.charts["totals"]}
    assert strip == {s.value: by_status[s] for s in Status}

    # Reasons: table and chart.
    by_reason = Counter(r["reason"] for r in records if r["reason"])
    assert page.rows["reason"] == by_reason
    assert by_reason == {
        "http_error": 7,
        "truncated": 3,
        "not_an_image": 4,
        "invalid_url": 1,
        "duplicate": 1,
    }
    failed_reasons = {r: n for r, n in by_reason.items() if Reason(r).status is Status.FAILED}
    assert page.counts("reasons") == failed_reasons
    http = Counter(str(r["http_status"]) for r in records if r["reason"] == "http_error")
    assert page.rows["http"] == http == {"404": 5, "500": 2}

    # Hosts: failures the host had a part in, by host name.
    hosts = Counter(host_of(r["url"]) for r in records if r["reason"] in HOST_REASONS)
    assert hosts == {"127.0.0.1": 8, "localhost": 6}
    assert page.rows["host"] == hosts
    assert page.counts("hosts") == hosts

    # Throughput over time: every record with a time lands in exactly one bar.
    for status in Status:
        assert page.counts("timeline", status).total() == by_status[status]
    assert 1 <= len({r["label"] for r in page.charts["timeline"]}) <= MAX_BUCKETS

    # Sizes: bucket k holds [2^(k-1), 2^k) bytes; the page labels buckets by lower bound.
    sizes = page.counts("sizes")
    assert sizes.total() == len(saved)
    expected = Counter(r["bytes"].bit_length() for r in saved)
    assert sorted(n for n in sizes.values() if n) == sorted(expected.values())
    assert sizes["256 KiB"] == 1  # the spooled PNG: between 256 and 512 KiB
    assert (1 << 18) <= next(r["bytes"] for r in saved if r["url"].endswith("/big")) < (1 << 19)

    # Dimensions: every saved image has them (all are JPEG, PNG, GIF or WebP).
    for chart, key in (("widths", "width"), ("heights", "height")):
        counts = page.counts(chart)
        assert counts.total() == len(saved)
        # the label is the bucket's lower edge
        bucket = Counter(f"{max(e for e in SIDE_EDGES if e <= r[key]):,}" for r in saved)
        assert +counts == bucket
    assert page.counts("megapixels").total() == len(saved)


def test_page_is_self_contained(run: Run) -> None:
    text = (run.out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    names = {name for name, _ in page.attributes}
    assert not {"src", "href", "srcset", "action"} & names
    assert not [n for n in names if n.startswith("on")]
    assert "url(" not in text and "@import" not in text
    assert page.tags["svg"] == 8  # totals, reasons, hosts, timeline, four histograms


def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    evil_url = "http://evil.example/<script>alert(1)</script>?q=\"'&x=" + "A" * 5000
    evil_host = "http://<img src=x onerror=alert(2)>/x.jpg"
    records = [
        Outcome(
            input='list"<b>.txt',
            line=1,
            url=evil_url,
            status=Status.FAILED,
            reason=Reason.HTTP_ERROR,
            http_status=404,
            error="HTTP 404 <iframe src=javascript:alert(3)>\x00\x1b[31m",
            finished_at=1_700_000_000.5,
        ),
        Outcome(
            input="l.txt",
            line=2,
            url=evil_host,
            status=Status.FAILED,
            reason=Reason.CONNECTION_ERROR,
            error="</td></tr></table><script>alert(4)</script>",
            finished_at=1_700_000_001.0,
        ),
    ]
    (out / "manifest.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    result = run_cli("report", str(out))
    assert result.returncode == 0, result.stderr
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert set(page.tags) <= {
        *("html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p"),
        *("main", "section", "div", "table", "thead", "tbody", "tr", "th", "td", "br"),
        *("svg", "g", "rect", "line", "text", "span", "i", "footer"),
    }
    assert not [n for n, _ in page.attributes if n.startswith("on") or n in ("src", "href")]
    shown = "".join(page.text)
    assert "<script>alert(1)</script>" in shown  # as text, not as markup
    assert "<img src=x onerror=alert(2)>" in shown  # the host of the second URL
    assert "A" * 5000 not in shown  # cut to a bounded length
    assert "\x00" not in text and "\x1b" not in text
    assert page.rows["host"] == {"evil.example": 1, "<img src=x onerror=alert(2)>": 1}


def test_report_without_a_manifest_is_a_usage_error(tmp_path: Path) -> None:
    for outdir in (tmp_path / "missing", tmp_path):
        result = run_cli("report", str(outdir))
        assert result.returncode == 2
        assert result.stderr.startswith("imgdl: error: no manifest in ")
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_memory_stays_bounded_on_a_long_manifest(tmp_path: Path) -> None:
    """100,000 records, 22,500 failing hosts, two runs a week apart: the report's
    state stays small (bounded buckets, trimmed host counter), and the page with it."""
    out = tmp_path / "out"
    out.mkdir()
    start = 1_700_000_000.0

    def host(n: int) -> str:  # one host with 2,500 failures, 22,500 with one each
        return "heavy.example" if n % 40 == 0 else f"h{n // 4}.example"

    blank = Outcome(input="u.txt", line=0, url="", status=Status.SAVED).to_dict()
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for n in range(100_000):
            failed = n % 4 == 0
            record = {
                **blank,
                "line": n + 1,
                "url": f"http://{host(n) if failed else 'ok.example'}/{n}.jpg",
                "status": "failed" if failed else "saved",
                "reason": "timeout" if failed else None,
                "bytes": 0 if failed else 1000 + n,
                "width": None if failed else 100 + n % 3000,
                "height": None if failed else 80,
                "finished_at": start + (n * 3.0 if n < 50_000 else 7 * 86400 + n),
            }
            handle.write(json.dumps(record) + "\n")
    tracemalloc.start()
    try:
        path = write_report(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # the manifest itself is 44 MB
    page = Page(path.read_text(encoding="utf-8"))
    assert page.totals["lines"] == 100_000
    assert page.totals["failed"] == 25_000
    assert len(page.charts["timeline"]) <= 3 * MAX_BUCKETS
    assert len(page.rows["host"]) == 15
    assert page.rows["host"]["heavy.example"] == 2500  # never trimmed: exact
    assert "counts are lower bounds" in "".join(page.text)
    assert path.stat().st_size < 200_000


def test_timeline_widens_without_losing_counts() -> None:
    timeline = Timeline(max_buckets=10, width=1 / 16)
    for n in range(1000):
        timeline.add(1_700_000_000 + n * 0.37, Status.SAVED, 10)
    rows = timeline.rows()
    assert len(rows) <= 10
    assert sum(counts[0] for _, counts in rows) == 1000
    assert sum(counts[3] for _, counts in rows) == 10_000
    assert timeline.width >= 370 / 10


def test_bounded_counter_keeps_the_heavy_hitters() -> None:
    counter = BoundedCounter(cap=10)
    for n in range(10_000):
        counter.add("heavy" if n % 3 == 0 else f"rare-{n}")
        assert len(counter.counts) <= 20
    assert counter.trimmed > 0
    assert counter.most_common(1)[0][0] == "heavy"
    exact = BoundedCounter(cap=10)
    for n in range(100):
        exact.add(f"k{n % 20}")
    assert exact.trimmed == 0 and exact.most_common(1) == [("k0", 5)]


@pytest.fixture(scope="session")
def browser() -> str:
    """Chromium from the distribution: found, else installed (root with apt-get)."""
    found, how = install_browser(timeout=600)
    if found is None:
        pytest.skip(f"no headless browser to open the report in: {how}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first use may install Chromium
def test_report_renders_in_headless_chromium(
    run: Run, browser: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    page = run.out / "report.html"
    seen = check_page(browser, page)
    assert seen.errors == []
    assert seen.requests == [page.resolve().as_uri()]  # nothing but the file itself
    assert seen.svg_count == 8
    assert seen.title.startswith("imgdl report")
    shot = tmp_path_factory.getbasetemp() / "report-screenshot.png"
    shot.write_bytes(seen.screenshot)
    print(f"screenshot: {shot} ({len(seen.screenshot)} bytes, {seen.svg_count} svg)")
    with Image.open(io.BytesIO(seen.screenshot)) as img:
        assert img.width >= 1000 and img.height >= 1000
        colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 20  # None: more colours than that
        # Each status colour of the totals bar is on screen (the charts were painted).
        found = {c for _, c in colors} if colors else set(img.convert("RGB").getdata())
        for color in ((0x2E, 0x7D, 0x32), (0xC6, 0x28, 0x28)):
            assert color in found


def test_a_report_that_cannot_be_written_does_not_fail_the_fetch(tmp_path: Path) -> None:
    assert report_after_fetch(tmp_path / "none").startswith("imgdl: no report: no manifest in ")


def test_an_empty_manifest_and_old_records_still_give_a_page(tmp_path: Path) -> None:
    """Records of the version before width/height/finished_at: counted, not charted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text("")
    assert Page(write_report(out).read_text(encoding="utf-8")).totals["lines"] == 0
    old = {"input": "u.txt", "line": 1, "url": "http://a.example/1.jpg", "status": "saved"}
    (out / "manifest.jsonl").write_text(json.dumps({**old, "bytes": 5000}) + "\n")
    page = Page(write_report(out).read_text(encoding="utf-8"))
    assert page.totals["saved"] == 1 and page.totals["bytes"] == 5000
    assert page.counts("sizes") == {"4 KiB": 1}
    assert "widths" not in page.charts and "timeline" not in page.charts
    shown = "".join(page.text)
    assert "without known dimensions, not in the dimension charts" in shown
    assert "No data. Records without finished_at (written by a version before it): 1." in shown
