"""A run can be killed at any moment and finished by running the same command again."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import time
from pathlib import Path

import pytest

from downloader.devserver import DevServer
from downloader.outcomes import Job, Outcome, Reason
from downloader.report import RunTally, Totals, counts_of, write_records
from downloader.state import RunState, read_raw
from tests.conftest import (
    crash,
    image_files,
    kill_after_requests,
    read_manifest,
    read_summary,
    run_cli,
    semaphores,
    start_cli,
    wait_for,
    write_list,
)


@pytest.mark.slow
def test_kill_9_then_same_command_finishes_exactly_once(server: DevServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/slow/30/{n}" for n in range(600)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    command = [
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--shard-size",
        "50",
        "--concurrency",
        "8",
    ]
    before = semaphores()
    first_requests = kill_after_requests(start_cli(*command), server, 250)
    assert 250 <= first_requests < 600
    saved_by_first = {p.relative_to(out) for p in image_files(out)}
    assert saved_by_first

    again = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--shard-size",
        "50",
        "--concurrency",
        "8",
    )
    assert again.returncode == 0, again.stderr
    # the crashed run's semaphores do not outlive it (its resource tracker removes them)
    wait_for(lambda: not semaphores() - before, timeout=10)
    records = read_manifest(out)
    assert len(records) == 600
    assert sorted(r["line"] for r in records) == list(range(1, 601))
    # The first run's records survived. Only an image whose worker was killed between
    # its rename and its journal line (at most one per download in flight) is
    # found on disk instead: skipped_exists, still exactly one record.
    skipped = [r for r in records if r["status"] != "saved"]
    assert {(r["status"], r["reason"]) for r in skipped} <= {("skipped", "skipped_exists")}
    assert len(skipped) <= 16
    files = image_files(out)
    assert len(files) == 600  # every image exactly once
    by_path = {r["path"]: r for r in records}
    for path in files:
        record = by_path[path.relative_to(out).as_posix()]
        n = int(record["url"].rsplit("/", 1)[1])
        assert path.read_bytes() == server.image(n)[0]
        if record["status"] == "saved":
            assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert not list(out.rglob("*.part"))
    # the second run did not fetch again what the first had saved
    refetched = len(server.requests) - first_requests
    assert refetched <= 600 - len(saved_by_first)
    summary = read_summary(out)
    assert summary["this_run"]["resumed_lines"] >= len(saved_by_first) - 20


def test_failures_file_fed_back_into_the_same_folder(server: DevServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/status/404/{n}" for n in range(1500)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    first = run_cli("fetch", str(listing), "-o", str(out), "--processes", "2")
    assert first.returncode == 1
    assert len((out / "failures.txt").read_text().split()) == 1500
    again = run_cli("fetch", str(out / "failures.txt"), "-o", str(out), "--processes", "2")
    assert again.returncode == 1
    records = read_manifest(out)
    assert len(records) == 1500
    assert {r["input"] for r in records} == {str(out / "failures.txt")}
    assert len((out / "failures.txt").read_text().split()) == 1500
    # the first run's records were moved aside, not lost
    (archive,) = (out / "previous-runs").iterdir()
    assert len(read_manifest(archive)) == 1500


def test_same_list_again_retries_only_what_failed(tmp_path: Path) -> None:
    with DevServer() as probe:
        port = probe.port
    good = [f"http://127.0.0.1:{port}/i/{n}.jpg" for n in range(10)]
    listing = write_list(tmp_path / "u.txt", good)
    out = tmp_path / "out"
    with DevServer(port=port) as srv:
        first = run_cli("fetch", str(listing), "-o", str(out))
        assert first.returncode == 0
    assert len(srv.requests) == 10
    listing.write_text(listing.read_text() + f"http://127.0.0.1:{port}/i/99.jpg\n")  # appended
    down = run_cli("fetch", str(listing), "-o", str(out))  # server down: line 11 fails
    assert down.returncode == 1
    assert read_summary(out)["this_run"]["resumed_lines"] == 10
    with DevServer(port=port) as srv:
        last = run_cli("fetch", str(listing), "-o", str(out))
    assert last.returncode == 0, last.stderr
    assert [p for _, _, p in srv.requests] == ["/i/99.jpg"]
    assert len(read_manifest(out)) == 11
    assert not (out / "previous-runs").exists()


def test_a_changed_list_starts_a_new_manifest(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(5)])
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out), "--report").returncode == 0
    write_list(listing, [f"{server.url}/i/{n}.jpg" for n in range(100, 103)])  # edited
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    records = read_manifest(out)
    assert sorted(r["url"].rsplit("/", 1)[1] for r in records) == ["100.jpg", "101.jpg", "102.jpg"]
    (archive,) = (out / "previous-runs").iterdir()
    assert len(read_manifest(archive)) == 5
    # the page about the old records went with them: none stands beside the new ones
    assert (archive / "report.html").is_file() and not (out / "report.html").exists()


def test_a_manifest_of_the_version_before_sizes_and_times_resumes(
    server: DevServer, tmp_path: Path
) -> None:
    """Records without width, height and finished_at (written before they were added)
    still mark their lines done; they gain the new columns as null, the rest as data."""
    urls = [f"{server.url}/i/{n}.jpg" for n in range(4)] + [f"{server.url}/status/404/1"]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 1
    new_keys = ("width", "height", "finished_at")
    before = read_manifest(out)
    assert all(r["finished_at"] is not None for r in before)
    old = [{k: v for k, v in r.items() if k not in new_keys} for r in before]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    requests = len(server.requests)
    again = run_cli("fetch", str(listing), "-o", str(out))
    assert again.returncode == 1, again.stderr
    assert [p for _, _, p in server.requests[requests:]] == ["/status/404/1"]  # only the failure
    after = {r["line"]: r for r in read_manifest(out)}
    assert all(r.keys() == before[0].keys() for r in after.values())
    assert [after[n]["width"] for n in range(1, 5)] == [None] * 4
    assert [after[n]["finished_at"] for n in range(1, 5)] == [None] * 4
    assert after[5]["finished_at"] is not None  # fetched again by this version


def test_deleted_image_is_fetched_again(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(4)])
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    victim = image_files(out)[0]
    victim.unlink()
    before = len(server.requests)
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    assert len(server.requests) == before + 1
    assert victim.is_file()


def test_cut_gzip_input_keeps_what_was_read(server: DevServer, tmp_path: Path) -> None:
    text = "".join(f"{server.url}/i/{n}.jpg\n" for n in range(3000))
    listing = tmp_path / "u.txt.gz"
    listing.write_bytes(gzip.compress(text.encode())[:6000])
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--processes", "2")
    assert result.returncode == 1, result.stderr
    assert "input error" in result.stderr and "Traceback" not in result.stderr
    summary = read_summary(out)
    assert summary["input_errors"] and summary["lines"] == summary["lines_read"] > 100
    assert len(read_manifest(out)) == summary["lines"]


def test_a_name_taken_earlier_in_the_run_is_a_collision(server: DevServer, tmp_path: Path) -> None:
    listing = tmp_path / "n.csv"
    listing.write_text(f"url,name\n{server.url}/i/0.jpg,cat\n{server.url}/i/24.jpg,cat\n")
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--name-column", "name", "--concurrency", "1"
    )
    assert result.returncode == 1
    records = {r["line"]: r for r in read_manifest(out)}
    assert records[2]["status"] == "saved"
    assert records[3]["reason"] == "name_collision"
    assert [p for _, _, p in server.requests] == ["/i/0.jpg"]  # no request for the loser


def test_two_lines_with_one_name_never_overwrite(server: DevServer, tmp_path: Path) -> None:
    listing = tmp_path / "n.csv"
    listing.write_text(
        "url,name\n"
        + "".join(f"{server.url}/slow/100/{n},same\n" for n in (0, 4, 8))
        + f"{server.url}/i/0.jpg,.imgdl/parts/zz\n"
    )
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--name-column", "name")
    assert result.returncode == 1
    records = {r["line"]: r for r in read_manifest(out)}
    same = [records[line] for line in (2, 3, 4)]
    assert sorted(r["status"] for r in same) == ["failed", "failed", "saved"]
    assert {r["reason"] for r in same if r["status"] == "failed"} == {"name_collision"}
    winner = next(r for r in same if r["status"] == "saved")
    assert hashlib.sha256((out / "same.jpg").read_bytes()).hexdigest() == winner["sha256"]
    assert records[5]["reason"] == "invalid_name"
    assert [p.name for p in image_files(out)] == ["same.jpg"]


def test_stopped_retry_of_failures_keeps_what_it_did_not_reach(tmp_path: Path) -> None:
    with DevServer() as probe:
        port = probe.port
    urls = [f"http://127.0.0.1:{port}/slow/100/{n}" for n in range(200)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 1  # server down
    failures = out / "failures.txt"
    assert len(failures.read_text().split()) == 200
    with DevServer(port=port) as server:
        proc = start_cli(
            "fetch",
            str(failures),
            "-o",
            str(out),
            "--processes",
            "1",
            "--shard-size",
            "10",
            "--concurrency",
            "2",
        )
        deadline = time.monotonic() + 30
        while len(server.requests) < 15 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        saved = read_summary(out)["saved"]
        assert 0 < saved < 200
        # what was saved is out of the list; everything else, read or not, is still in it
        assert sorted(failures.read_text().split()) == sorted(
            set(urls) - {r["url"] for r in read_manifest(out) if r["status"] == "saved"}
        )
        again = run_cli("fetch", str(failures), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert len(image_files(out)) == 200


@pytest.mark.slow
def test_retry_of_failures_killed_then_the_same_command(tmp_path: Path) -> None:
    with DevServer() as probe:
        port = probe.port
    urls = [f"http://127.0.0.1:{port}/slow/50/{n}" for n in range(300)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 1  # server down
    failures = out / "failures.txt"
    command = ["fetch", str(failures), "-o", str(out), "--shard-size", "20", "--concurrency", "4"]
    with DevServer(port=port) as server:
        proc = start_cli(*command)
        deadline = time.monotonic() + 30
        while len(server.requests) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        crash(proc.pid)
        proc.wait(10)
        assert failures.exists()  # the input of the killed run is still where it was
        again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    records = read_manifest(out)
    assert len(records) == 300
    assert {r["status"] for r in records} <= {"saved", "skipped"}
    assert len(image_files(out)) == 300


def test_archives_never_overwrite_each_other(server: DevServer, tmp_path: Path) -> None:
    a = write_list(tmp_path / "a.txt", [f"{server.url}/i/{n}.jpg" for n in range(3)])
    b = write_list(tmp_path / "b.txt", [f"{server.url}/i/{n}.jpg" for n in range(5, 7)])
    out = tmp_path / "out"
    for listing in (a, b, a, b):
        assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    archives = sorted((out / "previous-runs").iterdir())
    assert [len(read_manifest(p)) for p in archives] == [3, 2, 3]


def test_an_empty_file_is_not_an_image_already_saved(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/4.jpg"])
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    (image,) = image_files(out)
    image.write_bytes(b"")
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 1  # name taken
    image.unlink()
    image.parent.joinpath(image.stem + ".png").write_bytes(b"")  # an empty file by that stem
    (out / "manifest.jsonl").unlink()
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 1
    assert read_manifest(out)[0]["reason"] == "name_collision"


def test_revalidate_asks_again_and_keeps_or_replaces(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/etag/{n}" for n in range(4)])
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    first = {r["line"]: r for r in read_manifest(out)}
    assert all(r["etag"] == f'"v0-{r["line"] - 1}"' for r in first.values())
    before = {p: p.stat().st_mtime_ns for p in image_files(out)}

    plain = run_cli("fetch", str(listing), "-o", str(out))  # no revalidation: no request
    assert plain.returncode == 0 and len(server.requests) == 4

    same = run_cli("fetch", str(listing), "-o", str(out), "--revalidate")
    assert same.returncode == 0, same.stderr
    assert len(server.requests) == 8
    records = read_manifest(out)
    assert {(r["status"], r["reason"], r["http_status"]) for r in records} == {
        ("skipped", "not_modified", 304)
    }
    assert {r["path"] for r in records} == {r["path"] for r in first.values()}
    assert {p: p.stat().st_mtime_ns for p in image_files(out)} == before  # nothing rewritten
    # a kept image keeps its record: size, hash, type, dimensions (a trial found them
    # emptied, and the summary then said 0 bytes saved in all)
    for record in records:
        was = first[record["line"]]
        for field in ("bytes", "sha256", "content_type", "width", "height"):
            assert record[field] == was[field], field
    assert read_summary(out)["bytes"] == sum(r["bytes"] for r in first.values())

    server.etag_version = 4  # the server has new images under the same URLs
    changed = run_cli("fetch", str(listing), "-o", str(out), "--revalidate")
    assert changed.returncode == 0, changed.stderr
    records = {r["line"]: r for r in read_manifest(out)}
    assert {r["status"] for r in records.values()} == {"saved"}
    for line, record in records.items():
        assert (out / record["path"]).read_bytes() == server.image(line - 1 + 4)[0]
        assert record["etag"] == f'"v4-{line - 1}"'
    assert len(image_files(out)) == 4


def test_a_file_put_in_place_meanwhile_is_accepted_only_if_identical(
    server: DevServer, tmp_path: Path
) -> None:
    """What a killed attempt renamed in place just before dying: same bytes, same image."""
    from downloader.storage import url_hash

    urls = [f"{server.url}/slow/1500/4", f"{server.url}/slow/1500/8"]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    proc = start_cli("fetch", str(listing), "-o", str(out))
    try:
        wait_for(lambda: len(server.requests) == 2)
        for url, body in ((urls[0], server.image(4)[0]), (urls[1], b"\xff\xd8\xff other")):
            digest = url_hash(url)
            ext = ".jpg" if url == urls[0] else ".png"  # image 8 is a PNG
            target = out / digest[:3] / (digest + ext)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        assert proc.wait(30) == 1
    finally:
        proc.kill()
    by_url = {r["url"]: r for r in read_manifest(out)}
    assert by_url[urls[0]]["status"] == "saved"
    assert by_url[urls[1]]["reason"] == "name_collision"


def test_a_first_run_writes_what_the_merge_would(server: DevServer, tmp_path: Path) -> None:
    """Into a folder with no records, the run's segment becomes the manifest as it is
    (report.RunTally): the same bytes, failures file and counts as the merge of it."""
    urls = [f"{server.url}/i/{n}.jpg" for n in range(6)]
    urls += [f"{server.url}/status/404/1", "not a url", urls[0], f"{server.url}/status/503/2"]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--tries", "1")
    assert result.returncode == 1, result.stderr
    manifest = (out / "manifest.jsonl").read_text()
    failures = (out / "failures.txt").read_text()
    assert sorted(r["line"] for r in read_manifest(out)) == list(range(1, 11))
    assert failures.splitlines() == [urls[6], urls[9]]
    assert not list((out / ".imgdl" / "segments").iterdir())
    merged = tmp_path / "merged"
    merged.mkdir()
    totals = write_records(merged, read_raw(out / "manifest.jsonl"))
    assert (merged / "manifest.jsonl").read_text() == manifest
    assert (merged / "failures.txt").read_text() == failures
    summary = read_summary(out)
    assert {k: summary[k] for k in counts_of(totals)} == json.loads(json.dumps(counts_of(totals)))
    assert summary["by_reason"] == {"duplicate": 1, "http_error": 2, "invalid_url": 1}


def _tally_run(out: Path, lines: list[int]) -> tuple[RunTally, Totals | None]:
    """A run that records one outcome per line (a 404 for odd lines), then lets its
    tally publish the records; the state folder is left as a run leaves it."""
    listing = write_list(out.parent / "list.txt", ["http://127.0.0.1:1/x"] * 3)
    state = RunState(out)
    state.open([str(listing)])
    tally = RunTally(state.failures_part)
    for line in lines:
        job = Job(url=f"http://127.0.0.1:1/{line}", input=str(listing), line=line)
        if line % 2:
            outcome = Outcome.not_saved(job, Reason.HTTP_ERROR, http_status=404)
        else:
            outcome = Outcome.saved(job, bytes=10)
        state.append(outcome)
        tally.add(outcome)
    state.close()
    totals = tally.publish(state, unread=["http://127.0.0.1:1/unread"])
    state.unlock()
    return tally, totals


def test_the_tally_publishes_only_the_records_of_a_first_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, totals = _tally_run(out, [1, 2, 3])  # no records before: the segment is the manifest
    assert totals is not None
    assert [r["line"] for r in read_manifest(out)] == [1, 2, 3]
    assert (out / "failures.txt").read_text().splitlines() == [
        "http://127.0.0.1:1/1",
        "http://127.0.0.1:1/3",
        "http://127.0.0.1:1/unread",
    ]
    assert dict(totals.by_reason) == {"http_error": 2}
    assert (totals.lines, totals.bytes, totals.refetchable) == (3, 10, 3)
    assert not (out / ".imgdl" / "failures.part").exists()
    # a manifest is there now: the next run's records must be merged with it
    _, again = _tally_run(out, [1])
    assert again is None
    # a line recorded twice in one run: the merge decides which record stands
    (tmp_path / "b").mkdir()
    tally, twice = _tally_run(tmp_path / "b" / "out", [1, 1])
    assert twice is None and tally.repeated
