"""Downloads end to end against a real server: every outcome, exact counts, exit codes."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from downloader.devserver import DevServer
from tests.conftest import (
    LOOPBACK_ALLOWED,
    image_files,
    read_manifest,
    read_summary,
    run_cli,
    write_list,
)


def test_each_kind_of_failure_gets_its_reason(server: DevServer, tmp_path: Path) -> None:
    urls = {
        "ok": f"{server.url}/i/4.jpg",
        "404": f"{server.url}/status/404/1",
        "500": f"{server.url}/status/500/1",
        "slow": f"{server.url}/slow/5000/1",
        "cut": f"{server.url}/truncated/1",
        "html": f"{server.url}/html/1",
        "refused": "http://127.0.0.1:9/i/1.jpg",
    }
    listing = write_list(tmp_path / "urls.txt", list(urls.values()))
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--timeout", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    by_url = {r["url"]: r for r in read_manifest(out)}
    got = {key: (by_url[url]["status"], by_url[url]["reason"]) for key, url in urls.items()}
    assert got == {
        "ok": ("saved", None),
        "404": ("failed", "http_error"),
        "500": ("failed", "http_error"),
        "slow": ("failed", "timeout"),
        "cut": ("failed", "truncated"),
        "html": ("failed", "not_an_image"),
        "refused": ("failed", "connection_error"),
    }
    assert by_url[urls["404"]]["http_status"] == 404
    assert by_url[urls["500"]]["http_status"] == 500
    # Only the good image is on disk: no partial body at a final path, no .part left over.
    files = image_files(out)
    assert [p.suffix for p in files] == [".jpg"]
    saved = by_url[urls["ok"]]
    body = (out / saved["path"]).read_bytes()
    assert body == server.image(4)[0]
    assert saved["sha256"] == hashlib.sha256(body).hexdigest()
    assert saved["bytes"] == len(body)
    assert saved["content_type"] == "image/jpeg"
    # Everything but the good one can be fed back in.
    assert sorted((out / "failures.txt").read_text().split()) == sorted(
        u for k, u in urls.items() if k != "ok"
    )


def test_truncated_body_leaves_no_file(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/truncated/{n}" for n in range(20)])
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out))
    assert result.returncode == 1
    assert {r["reason"] for r in read_manifest(out)} == {"truncated"}
    assert image_files(out) == []


def test_two_thousand_urls_with_twenty_percent_failures_add_up(
    server: DevServer, tmp_path: Path
) -> None:
    rng = random.Random(7)
    urls = []
    expected = {"saved": 0, "http_error": 0, "not_an_image": 0, "truncated": 0}
    for n in range(2000):
        roll = rng.random()
        if roll < 0.10:
            urls.append(f"{server.url}/status/{rng.choice([403, 404, 500, 503])}/{n}")
            expected["http_error"] += 1
        elif roll < 0.15:
            urls.append(f"{server.url}/html/{n}")
            expected["not_an_image"] += 1
        elif roll < 0.20:
            urls.append(f"{server.url}/truncated/{n}")
            expected["truncated"] += 1
        else:
            urls.append(f"{server.url}/i/{n}.jpg")
            expected["saved"] += 1
    listing = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    result = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--shard-size",
        "150",
        "--concurrency",
        "16",
    )
    assert result.returncode == 1, result.stderr
    records = read_manifest(out)
    assert len(records) == 2000
    assert sorted(r["line"] for r in records) == list(range(1, 2001))
    summary = read_summary(out)
    assert summary["lines"] == 2000
    assert summary["saved"] == expected["saved"]
    assert summary["saved"] + summary["skipped"] + summary["failed"] == 2000
    assert summary["by_reason"] == {k: v for k, v in expected.items() if k != "saved"}
    assert len(image_files(out)) == expected["saved"]
    failures = (out / "failures.txt").read_text().split()
    assert len(failures) == 2000 - expected["saved"]
    assert f"2000 lines: {expected['saved']} saved" in result.stderr


def test_exit_code_zero_and_rerun_skips_what_is_there(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(30)])
    out = tmp_path / "out"
    first = run_cli("fetch", str(listing), "-o", str(out), "--processes", "2", "--shard-size", "8")
    assert first.returncode == 0, first.stderr
    mtimes = {p: p.stat().st_mtime_ns for p in image_files(out)}
    before = len(server.requests)
    second = run_cli("fetch", str(listing), "-o", str(out), "--processes", "2")
    assert second.returncode == 0, second.stderr
    assert len(server.requests) == before  # not one GET for an image already saved
    records = read_manifest(out)
    assert len(records) == 30
    # the first run's records stand: the second run had nothing left to do
    assert {r["status"] for r in records} == {"saved"}
    assert all(r["sha256"] for r in records)
    assert read_summary(out)["this_run"]["resumed_lines"] == 30
    assert {p: p.stat().st_mtime_ns for p in image_files(out)} == mtimes
    # with the manifest gone (another tool's folder), files on disk are still found by name
    (out / "manifest.jsonl").unlink()
    third = run_cli("fetch", str(listing), "-o", str(out), "--processes", "2")
    assert third.returncode == 0, third.stderr
    assert len(server.requests) == before
    records = read_manifest(out)
    assert {(r["status"], r["reason"]) for r in records} == {("skipped", "skipped_exists")}
    assert all(r["path"] for r in records)


def test_failures_file_feeds_back_in(tmp_path: Path) -> None:
    """Fail while the server is down, then re-run failures.txt once it is up."""
    with DevServer() as probe:
        port = probe.port
    listing = write_list(
        tmp_path / "u.txt", [f"http://127.0.0.1:{port}/i/{n}.jpg" for n in range(12)]
    )
    out = tmp_path / "out"
    down = run_cli("fetch", str(listing), "-o", str(out))
    assert down.returncode == 1
    assert read_summary(out)["by_reason"] == {"connection_error": 12}
    failures = tmp_path / "failures.txt"
    failures.write_text((out / "failures.txt").read_text())
    with DevServer(port=port):
        again = run_cli("fetch", str(failures), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert read_summary(out)["saved"] == 12
    assert len(image_files(out)) == 12


def test_name_template(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(3)])
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--name-template", "{host}/{line}-{basename}"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(r["path"].rsplit(".", 1)[0] for r in read_manifest(out)) == [
        "127.0.0.1/1-0",
        "127.0.0.1/2-1",
        "127.0.0.1/3-2",
    ]


def test_name_column_cannot_escape_outdir(server: DevServer, tmp_path: Path) -> None:
    listing = tmp_path / "n.csv"
    listing.write_text(
        "url,name\n"
        f"{server.url}/i/0.jpg,../../evil\n"
        f"{server.url}/i/1.jpg,/etc/evil\n"
        f"{server.url}/i/2.jpg,ok/fine\n"
    )
    out = tmp_path / "sub" / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--name-column", "name")
    assert result.returncode == 1
    records = {r["line"]: r for r in read_manifest(out)}
    assert records[2]["reason"] == "invalid_name"
    assert records[3]["reason"] == "invalid_name"
    assert records[4]["status"] == "saved"
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*evil*")] == []


def test_unwritable_output_folder_is_exit_2(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/0.jpg"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("fetch", str(listing), "-o", str(blocker / "out"))
    assert result.returncode == 2
    assert "cannot write to the output folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_in_process_run_with_the_real_pool(server: DevServer, tmp_path: Path) -> None:
    """The same path through click's runner inside this process (pool still spawns 2 workers)."""
    from click.testing import CliRunner

    from downloader.cli import cli

    listing = write_list(
        tmp_path / "u.txt",
        [f"{server.url}/i/{n}.jpg" for n in range(40)] + [f"{server.url}/status/410/1"],
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["fetch", str(listing), "-o", str(out), "--processes", "2", "--shard-size", "10"],
        env=LOOPBACK_ALLOWED,
    )
    # CliRunner reports an exception as exit code 1 too: only sys.exit counts here
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    summary = read_summary(out)
    assert (summary["saved"], summary["failed"], summary["http_errors"]) == (40, 1, {"410": 1})
    assert len(image_files(out)) == 40


def test_small_bodies_in_memory_and_large_ones_streamed_are_saved_whole(tmp_path: Path) -> None:
    """Bodies up to SPOOL_BYTES are written at once, larger ones stream through aiofiles:
    both come out byte for byte, with their digest, and leave no part file."""
    from downloader.fetch import SPOOL_BYTES

    rng = random.Random(5)
    magic = b"\xff\xd8\xff\xe0"
    sizes = {"tiny": 40, "edge": SPOOL_BYTES, "over": SPOOL_BYTES + 1, "big": 3 * SPOOL_BYTES}
    bodies = {name: (magic + rng.randbytes(size - 4), "image/jpeg") for name, size in sizes.items()}
    with DevServer(bodies=bodies) as server:
        listing = write_list(tmp_path / "urls.txt", [f"{server.url}/body/{n}" for n in sizes])
        out = tmp_path / "out"
        result = run_cli("fetch", str(listing), "-o", str(out))
    assert result.returncode == 0, result.stderr
    by_name = {r["url"].rsplit("/", 1)[1]: r for r in read_manifest(out)}
    for name, (body, _) in bodies.items():
        record = by_name[name]
        assert record["status"] == "saved", record
        assert (out / record["path"]).read_bytes() == body, name
        assert record["sha256"] == hashlib.sha256(body).hexdigest()
        assert record["bytes"] == len(body)
    assert len(image_files(out)) == len(sizes)
    assert not list((out / ".imgdl").rglob("*.part"))


def test_bodies_held_in_memory_stay_within_a_budget_per_worker() -> None:
    """With many downloads in flight, each holds less before spilling to a part file, so
    that one worker's bodies in memory stay within SPOOL_BUDGET (invariant 3)."""
    from downloader.body import CHUNK_BYTES
    from downloader.fetch import SPOOL_BUDGET, SPOOL_BYTES, spool_bytes

    assert spool_bytes(64) == SPOOL_BYTES
    for concurrency in (1, 64, 65, 1000, 10_000):
        held = spool_bytes(concurrency)
        assert CHUNK_BYTES <= held <= SPOOL_BYTES
        assert held * concurrency <= max(SPOOL_BUDGET, CHUNK_BYTES * concurrency)
    assert spool_bytes(1000) < SPOOL_BYTES
