"""OpenTelemetry export of logs, traces and metrics from every process, against a real
OTLP/HTTP receiver (tests/otlp_receiver.py).

The requirement: every worker process exports all three signals, which proves the
flush at the end of each shard and at exit (pool workers can leave through
``os._exit``-like paths where no atexit hook runs). The schedule delays and the
metric export interval are set to a minute, so anything can only reach the
receiver through those explicit flushes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from downloader.devserver import DevServer
from tests.conftest import (
    clean_env,
    read_manifest,
    read_summary,
    run_cli,
    start_cli,
    wait_for,
    write_list,
)
from tests.otlp_receiver import OtlpReceiver, ReceivedPoint, SilentListener

URLS = 400
SHARD_SIZE = 50
SHARDS = URLS // SHARD_SIZE


@pytest.fixture
def silent_collector() -> Iterator[SilentListener]:
    listener = SilentListener().start()
    try:
        yield listener
    finally:
        listener.stop()


def _url_list(tmp_path: Path, server: DevServer) -> Path:
    return write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(URLS)])


def _assert_all_saved(outdir: Path) -> None:
    records = read_manifest(outdir)
    assert len(records) == URLS
    assert sorted(r["line"] for r in records) == list(range(1, URLS + 1))
    assert {r["status"] for r in records} == {"saved"}, {
        (r["status"], r.get("reason")) for r in records
    }
    summary = read_summary(outdir)
    assert summary["exit_code"] == 0, summary


def _otel_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """Export everything to ``receiver``; nothing leaves on a timer, only by our flushes."""
    return clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_BLRP_SCHEDULE_DELAY="60000",
        OTEL_METRIC_EXPORT_INTERVAL="60000",
        **extra,
    )


def _last_points(points: list[ReceivedPoint], metric: str) -> dict[tuple[Any, str], ReceivedPoint]:
    """The last exported point of ``metric`` per (pid, attributes): metrics are
    cumulative, so each export repeats the totals so far."""
    last: dict[tuple[Any, str], ReceivedPoint] = {}
    for point in points:
        if point.metric == metric:
            last[(point.pid, repr(sorted(point.attributes.items())))] = point
    return last


def _metric_total(points: list[ReceivedPoint], metric: str, **match: Any) -> Counter[Any]:
    """The final value of ``metric`` per pid, summed over the points whose attributes
    include ``match``."""
    totals: Counter[Any] = Counter()
    for point in _last_points(points, metric).values():
        if all(point.attributes.get(k) == v for k, v in match.items()):
            totals[point.pid] += point.value
    return totals


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_every_process_exports_logs_traces_and_metrics(
    tmp_path: Path, server: DevServer, receiver: OtlpReceiver, compression: str
) -> None:
    urls = _url_list(tmp_path, server)
    outdir = tmp_path / "out"
    env = _otel_env(receiver, OTEL_EXPORTER_OTLP_COMPRESSION=compression)
    started = time.monotonic()
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "2",
        "--shard-size",
        str(SHARD_SIZE),
        # debug: the parent logs "shard done" per shard, so it exports records too
        "--log-level",
        "debug",
        "-o",
        str(outdir),
        env=env,
        timeout=90,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_all_saved(outdir)
    # Every flush is synchronous and bounded: nothing may still be on its way.
    assert elapsed < 60, elapsed

    assert not receiver.errors, receiver.errors
    paths = {path for path, _, _ in receiver.requests}
    assert paths == {"/v1/logs", "/v1/traces", "/v1/metrics"}, paths
    encodings = {encoding for _, encoding, _ in receiver.requests}
    assert encodings == ({"gzip"} if compression == "gzip" else {None}), encodings

    # -- logs --
    logs = receiver.logs()
    # The parent (the CLI process itself) exported its own records.
    parent = [r for r in logs if r.role == "parent"]
    assert parent, "no log record from the parent process"
    parent_pids = {r.pid for r in parent}
    assert len(parent_pids) == 1, parent_pids
    (parent_pid,) = parent_pids
    assert isinstance(parent_pid, int) and parent_pid > 0
    assert "shard done" in {r.body for r in parent}

    # Each worker process exported records, from its own pid.
    workers = [r for r in logs if r.role == "worker"]
    worker_pids = {r.pid for r in workers}
    assert all(isinstance(pid, int) and pid > 0 for pid in worker_pids), worker_pids
    assert len(worker_pids) == 2, worker_pids  # --processes 2, and no worker died
    assert parent_pid not in worker_pids

    # Every shard's last record ("shard finished") arrived: the flush at shard end worked.
    assert {r.shard for r in workers} == set(range(SHARDS))
    finished = [r for r in workers if r.body == "shard finished"]
    assert sorted(r.shard for r in finished) == list(range(SHARDS))
    started_ = [r for r in workers if r.body == "shard started"]
    assert sorted(r.shard for r in started_) == list(range(SHARDS))
    for record in finished:
        assert record.severity == "DEBUG"
        assert record.resource.get("service.name") == "imgdl"
        assert record.attributes.get("pid") == record.pid
        assert "saved" in str(record.attributes.get("counts")), record.attributes
    # ... and all of each shard's per-URL records came with it.
    url_done = [r for r in workers if r.body == "url done"]
    assert len(url_done) == URLS
    for shard in range(SHARDS):
        assert sum(1 for r in url_done if r.shard == shard) == SHARD_SIZE

    # -- traces: a span per shard, a child span per URL --
    spans = receiver.spans()
    assert {s.pid for s in spans} == worker_pids
    shard_spans = {s.span_id: s for s in spans if s.name == "shard"}
    assert sorted(s.attributes["imgdl.shard.id"] for s in shard_spans.values()) == list(
        range(SHARDS)
    )
    url_spans = [s for s in spans if s.name == "GET"]
    assert len(url_spans) == URLS
    lines = set()
    for span in url_spans:
        parent_span = shard_spans[span.parent_span_id]
        assert span.trace_id == parent_span.trace_id
        assert span.pid == parent_span.pid
        assert span.kind == 3  # SPAN_KIND_CLIENT
        attributes = span.attributes
        assert attributes["http.request.method"] == "GET"
        assert attributes["http.response.status_code"] == 200
        assert attributes["url.full"].startswith(f"{server.url}/i/")
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == server.port
        assert attributes["imgdl.outcome.status"] == "saved"
        assert attributes["imgdl.bytes"] > 0
        lines.add(attributes["imgdl.input.line"])
    assert lines == set(range(1, URLS + 1))
    for shard_span in shard_spans.values():
        assert shard_span.attributes["imgdl.shard.urls"] == SHARD_SIZE
        assert shard_span.attributes["imgdl.shard.outcomes.saved"] == SHARD_SIZE

    # -- metrics: each worker's final, cumulative values --
    points = receiver.points()
    assert {p.pid for p in points} >= worker_pids
    saved = _metric_total(points, "imgdl.outcomes", **{"imgdl.outcome.status": "saved"})
    assert set(saved) == worker_pids and sum(saved.values()) == URLS, saved
    saved_bytes = _metric_total(points, "imgdl.saved.bytes")
    manifest_bytes = sum(r["bytes"] for r in read_manifest(outdir))
    assert sum(saved_bytes.values()) == manifest_bytes
    durations = _last_points(points, "http.client.request.duration").values()
    assert {p.unit for p in durations} == {"s"}
    assert sum(p.count for p in durations) == URLS
    assert all(p.attributes["http.response.status_code"] == 200 for p in durations)
    in_flight = _metric_total(points, "http.client.active_requests")
    assert set(in_flight) == worker_pids and set(in_flight.values()) == {0}, in_flight


def test_failed_urls_carry_their_reason_in_spans_and_metrics(
    tmp_path: Path, server: DevServer, receiver: OtlpReceiver
) -> None:
    urls = write_list(
        tmp_path / "urls.txt",
        [f"{server.url}/status/404/{n}" for n in range(6)]
        + [f"{server.url}/html/{n}" for n in range(4)]
        + ["not a url", f"{server.url}/html/0"],  # outcomes the parent decides itself
    )
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "1",
        "--tries",
        "1",
        "-o",
        str(tmp_path / "out"),
        env=_otel_env(receiver),
    )
    assert result.returncode == 1, result.stderr[-4000:]
    url_spans = [s for s in receiver.spans() if s.name == "GET"]
    reasons = Counter(s.attributes.get("error.type") for s in url_spans)
    assert reasons == {"http_error": 6, "not_an_image": 4}, reasons
    assert {s.status_code for s in url_spans} == {2}  # STATUS_CODE_ERROR
    not_found = [s for s in url_spans if s.attributes.get("error.type") == "http_error"]
    assert {s.attributes["http.response.status_code"] for s in not_found} == {404}
    points = receiver.points()
    failed = _metric_total(points, "imgdl.outcomes", **{"imgdl.outcome.status": "failed"})
    assert sum(failed.values()) == 12
    by_reason = _metric_total(points, "imgdl.outcomes", **{"imgdl.outcome.reason": "not_an_image"})
    assert sum(by_reason.values()) == 5
    # the parent counts the lines it decides (an invalid line; a duplicate of a failed
    # URL fails with its reason): with the workers' counts, every line is counted once
    parent = {p.pid for p in points if p.role == "parent"}
    (parent_pid,) = parent
    assert sum(_metric_total(points, "imgdl.outcomes").values()) == 12
    invalid = _metric_total(points, "imgdl.outcomes", **{"imgdl.outcome.reason": "invalid_url"})
    assert invalid == {parent_pid: 1}
    assert (
        _metric_total(points, "imgdl.outcomes", **{"imgdl.outcome.reason": "not_an_image"})[
            parent_pid
        ]
        == 1
    )


def test_standard_variables_name_the_service_and_reach_the_collector(
    tmp_path: Path, server: DevServer, receiver: OtlpReceiver
) -> None:
    # task 3 of 4 takes about a quarter of these (none: 1 in 100,000)
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(40)])
    env = _otel_env(
        receiver,
        OTEL_SERVICE_NAME="catalogue-mirror",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,team=images",
        OTEL_EXPORTER_OTLP_HEADERS="x-api-key=sesame",
        OTEL_METRICS_EXPORTER="none",
        JOB_COMPLETION_INDEX="3",
        IMGDL_RUN_SHARD_COUNT="4",
    )
    result = run_cli("fetch", str(urls), "--processes", "1", "-o", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert receiver.logs() and receiver.spans()
    assert not receiver.points(), "OTEL_METRICS_EXPORTER=none still exported metrics"
    assert "/v1/metrics" not in {path for path, _, _ in receiver.requests}
    for item in [*receiver.logs(), *receiver.spans()]:
        assert item.resource["service.name"] == "catalogue-mirror"
        assert item.resource["deployment.environment"] == "test"
        assert item.resource["team"] == "images"
        assert item.resource["imgdl.task.index"] == 3
    assert {headers.get("x-api-key") for _, _, headers in receiver.requests} == {"sesame"}


def test_sdk_disabled_sends_nothing(
    tmp_path: Path, server: DevServer, receiver: OtlpReceiver
) -> None:
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(10)])
    env = _otel_env(receiver, OTEL_SDK_DISABLED="true")
    result = run_cli("fetch", str(urls), "--processes", "1", "-o", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_summary(tmp_path / "out")["saved"] == 10
    assert receiver.requests == []


@pytest.mark.slow
def test_sigterm_mid_run_still_flushes_every_worker(
    tmp_path: Path, server: DevServer, receiver: OtlpReceiver
) -> None:
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/slow/200/{n}" for n in range(400)])
    outdir = tmp_path / "out"
    proc = start_cli(
        "fetch",
        str(urls),
        "--processes",
        "2",
        "--concurrency",
        "4",
        "--shard-size",
        "20",
        "--log-level",
        "debug",
        "-o",
        str(outdir),
        env=_otel_env(receiver, IMGDL_RUN_GRACE_PERIOD="5"),
    )
    try:
        # both workers busy: some of their URL spans are out (each shard end flushes)
        wait_for(lambda: len({s.pid for s in receiver.spans()}) == 2, timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr.decode(errors="replace")[-3000:]
    records = read_manifest(outdir)
    # stopped mid-way: the lines not read yet are left for the next run, each line
    # read has one record
    assert 0 < len(records) < 400
    assert len({r["line"] for r in records}) == len(records)
    assert not receiver.errors, receiver.errors

    logs = receiver.logs()
    worker_pids = {r.pid for r in logs if r.role == "worker"}
    assert len(worker_pids) == 2, worker_pids
    assert {r.pid for r in logs if r.role == "parent"} == {proc.pid}
    assert "signal received: finishing downloads in flight" in {r.body for r in logs}
    # every worker's signals up to its last URL were flushed: the outcome counters
    # add up to what the workers journaled (the manifest minus what the parent recorded)
    points = receiver.points()
    worker_outcomes = _metric_total(points, "imgdl.outcomes")
    worker_outcomes = {pid: n for pid, n in worker_outcomes.items() if pid in worker_pids}
    assert set(worker_outcomes) == worker_pids
    url_spans = [s for s in receiver.spans() if s.name == "GET"]
    assert {s.pid for s in url_spans} == worker_pids
    assert sum(worker_outcomes.values()) == len(url_spans)
    saved = sum(1 for r in records if r["status"] == "saved")
    assert sum(1 for s in url_spans if s.attributes["imgdl.outcome.status"] == "saved") == saved
    assert os.getpid() not in worker_pids


@pytest.mark.slow
def test_run_finishes_when_the_collector_never_answers(
    tmp_path: Path, server: DevServer, silent_collector: SilentListener
) -> None:
    urls = _url_list(tmp_path, server)
    outdir = tmp_path / "out"
    env = clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=silent_collector.endpoint,
        OTEL_EXPORTER_OTLP_TIMEOUT="2",
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_BLRP_SCHEDULE_DELAY="60000",
    )
    started = time.monotonic()
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "2",
        "--shard-size",
        str(SHARD_SIZE),
        "-o",
        str(outdir),
        env=env,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_all_saved(outdir)
    # The exporters really tried to reach the hung collector.
    assert silent_collector.accepted, "no connection to the collector was attempted"
    assert elapsed < 60, elapsed


def test_run_finishes_when_the_collector_port_is_closed(tmp_path: Path, server: DevServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound, never listened on, then released
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(40)])
    outdir = tmp_path / "out"
    env = clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        OTEL_EXPORTER_OTLP_TIMEOUT="2",
        OTEL_BLRP_SCHEDULE_DELAY="60000",
    )
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "1",
        "--shard-size",
        "20",
        "-o",
        str(outdir),
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_manifest(outdir)
    assert len(records) == 40
    assert {r["status"] for r in records} == {"saved"}
    # the exporters' complaints come as JSON log lines, like imgdl's own
    logged = [line for line in result.stderr.splitlines() if not line.startswith("imgdl: ")]
    assert any("opentelemetry" in line for line in logged), result.stderr[-2000:]
    for line in logged:
        assert json.loads(line)["level"], line


def test_nothing_of_opentelemetry_is_imported_when_nothing_is_exported(
    server: DevServer, tmp_path: Path
) -> None:
    """The SDK costs the parent and the workers' fork server 15-40 ms of start-up: a run
    with no OTEL_* variable (the parent, the modules a worker preloads) never loads it."""
    probe = (
        "import sys\n"
        "import downloader.worker, downloader.shardrun\n"
        "from downloader.cli import main\n"
        "sys.argv = ['imgdl', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print('LOADED', loaded)\n"
    )
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/1.jpg"])
    done = subprocess.run(
        [sys.executable, "-c", probe, "fetch", str(listing), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert "LOADED []" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "out" / "manifest.jsonl").exists()
