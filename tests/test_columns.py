"""Extra input columns carried into the manifest, parquet input lists, and expected
hashes checked against the body (issue 9, parts 3 and 4), through the real CLI."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from downloader.columns import Columns, InvalidHash, parse_hash
from downloader.devserver import DevServer
from downloader.outcomes import Job
from downloader.parquetinput import ParquetRows
from downloader.settings import InputSettings
from downloader.sources import InputList
from tests.conftest import (
    clean_env,
    image_files,
    kill_after_requests,
    read_manifest,
    read_summary,
    run_cli,
    start_cli,
)

EXTRA = ["caption", "id", "license"]
_EXTRA_FLAGS = [arg for column in EXTRA for arg in ("--extra-column", column)]


def _rows(server: DevServer) -> list[dict[str, Any]]:
    """Five lines: saved, a duplicate of it, a 404, a bad URL, one with values missing."""
    return [
        {"url": f"{server.url}/i/1.jpg", "caption": "a cat", "id": 1, "license": "cc-by"},
        {"url": f"{server.url}/i/1.jpg", "caption": "same again", "id": 2, "license": "cc0"},
        {"url": f"{server.url}/status/404/3", "caption": "gone", "id": 3, "license": "cc0"},
        {"url": "ftp://example.com/4.jpg", "caption": "bad url", "id": 4, "license": "cc0"},
        {"url": f"{server.url}/i/5.jpg", "caption": None, "id": 5},
    ]


def _write_list(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` in the format of ``path``'s suffix; the first row's keys are the columns."""
    columns = list(rows[0])
    if path.suffix == ".parquet":
        table = pa.Table.from_pylist(rows, schema=pa.schema([(c, _arrow(c)) for c in columns]))
        pq.write_table(table, path, row_group_size=2)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        sep = "\t" if path.suffix == ".tsv" else ","

        def cell(value: Any) -> str:
            text = "" if value is None else str(value)
            return f'"{text}"' if sep in text else text

        lines = [sep.join(columns)] + [sep.join(cell(r.get(c)) for c in columns) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _arrow(column: str) -> pa.DataType:
    return pa.int64() if column == "id" else pa.string()


def _expected_extra(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """What the record's ``extra`` holds: CSV/TSV values are strings, an empty cell is
    null; JSON Lines and parquet values keep their types; a missing one is null."""
    values = {c: row.get(c) for c in EXTRA}
    if fmt in ("csv", "tsv"):
        values = {c: None if v is None else str(v) for c, v in values.items()}
    return values


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_extra_columns_reach_every_record(server: DevServer, tmp_path: Path, fmt: str) -> None:
    rows = _rows(server)
    listing = _write_list(tmp_path / f"list.{fmt}", rows)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--processes", "1", *_EXTRA_FLAGS)
    assert result.returncode == 1, result.stderr  # the 404 and the bad URL
    first_line = 2 if fmt in ("csv", "tsv") else 1  # a header is line 1
    records = {r["line"] - first_line: r for r in read_manifest(out)}
    assert sorted(records) == [0, 1, 2, 3, 4]
    outcomes = [(records[i]["status"], records[i]["reason"]) for i in range(5)]
    assert outcomes == [
        ("saved", None),
        ("skipped", "duplicate"),
        ("failed", "http_error"),
        ("failed", "invalid_url"),
        ("saved", None),
    ]
    for i, row in enumerate(rows):
        assert records[i]["extra"] == _expected_extra(row, fmt), i
    # the duplicate carries its own line's columns, and points at the first line's file
    assert records[1]["path"] == records[0]["path"]
    # failures.txt stays a plain URL list (re-feedable): the columns are in the manifest
    assert (out / "failures.txt").read_text() == f"{server.url}/status/404/3\n"


def test_json_and_parquet_values_keep_their_types(server: DevServer, tmp_path: Path) -> None:
    url = f"{server.url}/i/7.jpg"
    jsonl = tmp_path / "typed.jsonl"
    jsonl.write_text(
        json.dumps({"url": url, "meta": {"w": 3, "tags": ["a", "b"]}, "ok": True, "score": 0.5})
        + "\n",
        encoding="utf-8",
    )
    table = pa.table(
        {
            "url": [f"{server.url}/i/8.jpg"],
            "meta": [[1, 2, 3]],
            "ok": [False],
            "score": [1.25],
            "when": [datetime.datetime(2024, 5, 1, 12, 30)],
            "raw": [b"\x00\x01"],
        }
    )
    parquet = tmp_path / "typed.parquet"
    pq.write_table(table, parquet)
    out = tmp_path / "out"
    columns = ["meta", "ok", "score"]
    env = clean_env(IMGDL_INPUT_EXTRA_COLUMNS=",".join(columns))  # the settings' env form
    result = run_cli("fetch", str(jsonl), "-o", str(out), env=env)
    assert result.returncode == 0, result.stderr
    (record,) = read_manifest(out)
    assert record["extra"] == {"meta": {"w": 3, "tags": ["a", "b"]}, "ok": True, "score": 0.5}

    more = ["--extra-column", "when", "--extra-column", "raw"]
    result = run_cli("fetch", str(parquet), "-o", str(tmp_path / "out2"), *more, env=env)
    assert result.returncode == 0, result.stderr
    (record,) = read_manifest(tmp_path / "out2")
    # the flags replace the environment's list, as every flag does
    assert record["extra"] == {
        "when": "2024-05-01T12:30:00",
        "raw": base64.b64encode(b"\x00\x01").decode(),
    }


def test_parquet_with_several_row_groups_every_row_once(server: DevServer, tmp_path: Path) -> None:
    rows = [
        {"url": f"{server.url}/i/{n}.jpg" if n != 7 else None, "caption": f"c{n}"}
        for n in range(23)
    ]
    listing = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows), listing, row_group_size=5)
    assert pq.ParquetFile(listing).num_row_groups == 5
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--extra-column", "caption", "--shard-size", "4"
    )
    assert result.returncode == 1, result.stderr  # row 8 has no URL
    records = {r["line"]: r for r in read_manifest(out)}
    assert sorted(records) == list(range(1, 24))  # a row's line is its number, from 1
    for n, row in enumerate(rows):
        record = records[n + 1]
        assert record["extra"] == {"caption": f"c{n}"}
        if n == 7:
            assert record["reason"] == "invalid_url"
            assert "no string 'url' value" in record["error"]
        else:
            assert (record["status"], record["url"]) == ("saved", row["url"])
    assert len(image_files(out)) == 22


def test_parquet_is_read_a_row_group_at_a_time(tmp_path: Path) -> None:
    """Memory holds about one row group of the columns used, not the file: 16 MB of
    captions in 20 row groups, and an 8 MB column nobody asked for."""
    rows = 4000
    table = pa.table(
        {
            "url": [f"http://127.0.0.1:9/{n}.jpg" for n in range(rows)],
            "caption": [os.urandom(2048).hex() for _ in range(rows)],
            "blob": [os.urandom(2048) for _ in range(rows)],
        }
    )
    listing = tmp_path / "wide.parquet"
    pq.write_table(table, listing, row_group_size=200, compression="none")
    del table
    settings = InputSettings(extra_columns=["caption"])
    reader = ParquetRows(str(listing), Columns(settings))
    assert reader.row_groups == 20
    base = pa.total_allocated_bytes()
    peak = 0
    count = 0
    for count, row, problem in reader:  # noqa: B007
        assert problem is None
        assert set(row) == {"url", "caption"}
        peak = max(peak, pa.total_allocated_bytes() - base)
    reader.close()
    assert count == rows
    # measured: 2.5 MB, the same with 10 or 40 row groups; the whole file's captions: 16 MB
    assert 0 < peak < 5 * 1024 * 1024, peak


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_configured_column_the_file_lacks_stops_the_run(tmp_path: Path, fmt: str) -> None:
    rows = [{"url": "http://127.0.0.1:9/a.jpg", "caption": "x", "id": 1}]
    listing = _write_list(tmp_path / f"nolicense.{fmt}", rows)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), *_EXTRA_FLAGS)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(listing) in result.stderr
    assert "no column 'license'" in result.stderr
    assert "(columns: url, caption, id)" in result.stderr
    assert not out.exists()
    result = run_cli("fetch", str(listing), "-o", str(out), "--hash-column", "sha256")
    assert result.returncode == 2
    assert "no column 'sha256'" in result.stderr


def test_parquet_is_known_by_its_magic_bytes_without_the_suffix(tmp_path: Path) -> None:
    listing = tmp_path / "export.data"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "id": [7]}), listing)
    source = InputList(str(listing), InputSettings(extra_columns=["id"]))
    assert source.format == "parquet"
    (job,) = list(source)
    assert isinstance(job, Job)
    assert (job.url, job.line, job.extra) == ("http://127.0.0.1:9/a.jpg", 1, '{"id":7}')


def test_parquet_from_standard_input_is_refused(tmp_path: Path) -> None:
    result = run_cli("fetch", "-", "--input-format", "parquet", "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "must be a local file" in result.stderr


# -- expected hashes -------------------------------------------------------------------


def _digest(body: bytes, algorithm: str) -> str:
    return hashlib.new(algorithm, body).hexdigest()


def test_hashes_are_checked_and_a_mismatch_saves_nothing(tmp_path: Path) -> None:
    big = DevServer().image(3)[0] + bytes(400_000)  # larger than a body held in memory
    with DevServer(bodies={"big.png": (big, "image/png")}) as server:
        img = {n: server.image(n)[0] for n in range(1, 7)}
        u = f"{server.url}/i"
        lines = [
            (f"{u}/1.jpg", _digest(img[1], "sha256")),  # bare sha256: saved
            (f"{u}/2.jpg", "SHA256:" + _digest(img[2], "sha256").upper()),  # prefixed, upper
            (f"{u}/3.jpg", _digest(img[3], "md5")),  # bare md5: saved
            (f"{u}/4.jpg", "md5:" + _digest(img[5], "md5")),  # another image's md5
            (f"{u}/5.jpg", _digest(img[6], "sha256")),  # another image's sha256
            (f"{server.url}/body/big.png", _digest(big[:-1], "sha256")),  # streamed, wrong
            (f"{u}/6.jpg", ""),  # no hash: not checked
        ]
        listing = tmp_path / "hashed.csv"
        listing.write_text(
            "url,checksum\n" + "".join(f"{url},{h}\n" for url, h in lines), encoding="utf-8"
        )
        out = tmp_path / "out"
        result = run_cli(
            "fetch", str(listing), "-o", str(out), "--hash-column", "checksum", "--tries", "3"
        )
        requests = [path for _, _, path in server.requests]
    assert result.returncode == 1, result.stderr
    records = {r["line"] - 2: r for r in read_manifest(out)}  # the header is line 1
    assert [records[i]["status"] for i in range(7)] == [
        "saved", "saved", "saved", "failed", "failed", "failed", "saved",
    ]  # fmt: skip
    for i in (3, 4, 5):
        record = records[i]
        assert record["reason"] == "hash_mismatch"
        assert record["path"] is None and record["bytes"] == 0
        assert record["attempts"] == 1  # not retried: the same bytes would come again
    assert records[3]["error"] == (
        f"md5 mismatch: expected {_digest(img[5], 'md5')}, got {_digest(img[4], 'md5')}"
    )
    assert records[5]["error"] == (
        f"sha256 mismatch: expected {_digest(big[:-1], 'sha256')}, got {_digest(big, 'sha256')}"
    )
    assert requests.count("/body/big.png") == 1
    saved = {records[i]["path"] for i in (0, 1, 2, 6)}
    assert {str(p.relative_to(out)) for p in image_files(out)} == saved
    assert not any((out / ".imgdl" / "parts").rglob("*.part"))
    # fed back in, failures.txt has no hashes: a mismatch stays out of it
    assert (out / "failures.txt").read_text() == ""
    assert read_summary(out)["by_reason"] == {"hash_mismatch": 3}


def test_malformed_hash_values_are_invalid_lines(server: DevServer, tmp_path: Path) -> None:
    url = f"{server.url}/i/1.jpg"
    values = ["sha1:" + "a" * 40, "not-a-hash", "a" * 40, "sha256:" + "g" * 64, "md5:abc"]
    rows = [{"url": url, "h": v, "caption": f"c{i}"} for i, v in enumerate(values)]
    rows.append({"url": url, "h": 12345, "caption": "a number"})  # JSON: not a string
    listing = _write_list(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--hash-column", "h", "--extra-column", "caption"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    records = {r["line"]: r for r in read_manifest(out)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for line, record in records.items():
        assert (record["status"], record["reason"]) == ("failed", "invalid_url")
        assert record["url"] == url  # the URL was fine; the line was not
        assert record["error"].startswith("column 'h': ") or "column 'h' holds" in record["error"]
        assert record["extra"] == {"caption": rows[line - 1]["caption"]}
    assert "unknown hash algorithm 'sha1'" in records[1]["error"]
    assert "neither 64 hex digits (sha256) nor 32 (md5)" in records[3]["error"]
    assert "not a sha256 hash" in records[4]["error"]
    assert "holds a number, not a hex string" in records[6]["error"]
    assert server.requests == []


def test_hash_algorithm_setting_reads_bare_values(server: DevServer, tmp_path: Path) -> None:
    body = server.image(2)[0]
    listing = tmp_path / "md5.tsv"
    listing.write_text(
        f"url\tmd5\n{server.url}/i/2.jpg\t{_digest(body, 'md5')}\n"
        f"{server.url}/i/3.jpg\t{_digest(body, 'sha256')}\n",
        encoding="utf-8",
    )
    config = tmp_path / "imgdl.yaml"
    config.write_text("input:\n  hash_column: md5\n  hash_algorithm: md5\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--config", str(config))
    assert result.returncode == 1, result.stderr
    records = {r["line"]: r for r in read_manifest(out)}
    assert records[2]["status"] == "saved"
    assert records[3]["reason"] == "invalid_url"
    assert "not a md5 hash (32 hex digits)" in records[3]["error"]


def test_parse_hash_forms() -> None:
    sha = "ab" * 32
    assert parse_hash(sha) == f"sha256:{sha}"
    assert parse_hash(f" SHA256:{sha.upper()} ") == f"sha256:{sha}"
    assert parse_hash("cd" * 16) == "md5:" + "cd" * 16
    assert parse_hash(bytes(32)) == "sha256:" + "00" * 32  # a parquet binary digest
    assert parse_hash(bytes(16), "md5") == "md5:" + "00" * 16
    assert parse_hash(None) is None and parse_hash("  ") is None
    for bad in ("sha512:" + sha, sha[:-1], bytes(20), 3.5):
        with pytest.raises(InvalidHash):
            parse_hash(bad)
    with pytest.raises(InvalidHash):
        parse_hash(sha, "md5")


# -- resume ----------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_parquet_run_with_columns_and_hashes_finishes(
    server: DevServer, tmp_path: Path
) -> None:
    n = 300
    rows = [
        {
            "url": f"{server.url}/slow/30/{i}",
            "caption": f"image {i}",
            "sha": _digest(server.image(i)[0], "sha256"),
        }
        for i in range(n)
    ]
    listing = tmp_path / "job.parquet"
    pq.write_table(pa.Table.from_pylist(rows), listing, row_group_size=64)
    out = tmp_path / "out"
    command = [
        "fetch", str(listing), "-o", str(out), "--processes", "2", "--shard-size", "25",
        "--concurrency", "8", "--extra-column", "caption", "--hash-column", "sha",
    ]  # fmt: skip
    first = kill_after_requests(start_cli(*command), server, 100)
    assert 100 <= first < n
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    records = read_manifest(out)
    assert sorted(r["line"] for r in records) == list(range(1, n + 1))
    for record in records:
        assert record["status"] == "saved"
        assert record["extra"] == {"caption": f"image {record['line'] - 1}"}
        assert record["sha256"] == rows[record["line"] - 1]["sha"]
    summary = read_summary(out)
    assert summary["this_run"]["resumed_lines"] > 0
    # lines saved before the kill were not fetched again
    assert len(server.requests) - first <= n - summary["this_run"]["resumed_lines"]


def test_a_piped_or_gzipped_parquet_list_is_named_not_read_as_text(tmp_path: Path) -> None:
    """Found by a new user: parquet through stdin or in a .gz went through the text
    reader, and every "line" became an invalid_url."""
    import gzip

    listing = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/i/1.jpg"]}), listing)
    packed = tmp_path / "l.parquet.gz"
    packed.write_bytes(gzip.compress(listing.read_bytes()))
    out = tmp_path / "out"
    for args, stdin, fix in [
        ((str(packed),), None, "gunzip it first"),
        (("-",), listing.read_bytes(), "save it to a file first"),
        (("-",), packed.read_bytes(), "gunzip it first"),
    ]:
        done = run_cli("fetch", *args, "-o", str(out), stdin=stdin)
        assert done.returncode == 2, done.stderr
        assert "this is a parquet file" in done.stderr and fix in done.stderr
        assert "Traceback" not in done.stderr
    assert not (out / "manifest.jsonl").exists()


# -- values too large or unconvertible (found by review: one row could sink the run) ----

_RSS_CHILD = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run([sys.executable, '-m', 'downloader', *sys.argv[1:]])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def test_huge_extra_values_are_invalid_lines_in_bounded_memory(
    server: DevServer, tmp_path: Path
) -> None:
    """A 20 MB caption in 20 rows (a few KB of zstd, the size of the report's file) and
    three distinct 3 MB ones: those lines are invalid_url naming the column and its
    size; the rest are saved; the run's largest process stays small (before the fix:
    every huge value as Arrow, Python and JSON text, and a manifest of 400 MB)."""
    huge = "x" * (20 << 20)
    captions = (
        [f"caption {n}" for n in range(10)] + [huge] + [str(n) * (3 << 20) for n in (7, 8, 9)]
    )
    index = [n if n < 10 else 10 for n in range(30)]  # rows 10..29: the 20 MB value
    index[3], index[5], index[8] = 11, 12, 13  # three more rows: a 3 MB value each
    big = {n for n in range(30) if index[n] >= 10}
    table = pa.table(
        {
            "url": [f"{server.url}/i/{n}.jpg" for n in range(30)],
            "caption": pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), captions),
            "id": list(range(30)),
        }
    )
    listing = tmp_path / "huge.parquet"
    pq.write_table(table, listing, compression="zstd", row_group_size=15)
    assert listing.stat().st_size < 200_000
    del table, captions, huge
    out = tmp_path / "out"
    args = ["fetch", str(listing), "-o", str(out), "--processes", "1", *_EXTRA_FLAGS[:4]]
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, *args],
        capture_output=True, text=True, env=clean_env(), timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "broke off" not in done.stderr and "Traceback" not in done.stderr
    peak_mb = int(done.stdout.split()[-1]) // 1024
    assert peak_mb < 400, peak_mb  # measured: 294, as for a 3-row list (295); before: 2361
    assert (out / "manifest.jsonl").stat().st_size < 100_000
    records = {r["line"]: r for r in read_manifest(out)}
    assert sorted(records) == list(range(1, 31))
    for n in range(30):
        record = records[n + 1]
        if n in big:
            size = (20 << 20) if n >= 10 else 3 << 20
            assert (record["status"], record["reason"]) == ("failed", "invalid_url"), n
            assert record["url"] == f"{server.url}/i/{n}.jpg"
            assert record["error"].startswith(f"column 'caption' holds {size} bytes: "), n
            assert "at most 65536 bytes" in record["error"]
            assert record["extra"] == {"caption": None, "id": None}
        else:
            assert record["status"] == "saved", n
            assert record["extra"] == {"caption": f"caption {n}", "id": n}
    assert len(image_files(out)) == 30 - len(big)


def test_a_json_line_with_a_huge_extra_value_is_invalid(server: DevServer, tmp_path: Path) -> None:
    """Under the 1 MiB line cap, over the 64 KiB extra cap: the same outcome as parquet's."""
    listing = tmp_path / "big.jsonl"
    rows = [
        {"url": f"{server.url}/i/1.jpg", "caption": "fine", "tags": ["a"]},
        {"url": f"{server.url}/i/2.jpg", "caption": "ok", "tags": ["t"] * 40_000},
        {"url": "ftp://x/3.jpg", "caption": "é" * 40_000, "tags": []},
    ]
    _write_list(listing, rows)
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--extra-column", "caption", "--extra-column", "tags"
    )
    assert result.returncode == 1, result.stderr
    records = {r["line"]: r for r in read_manifest(out)}
    assert records[1]["status"] == "saved"
    assert records[2]["reason"] == "invalid_url"
    assert records[2]["error"].startswith("column 'tags' holds 160001 bytes: ")
    assert records[2]["extra"] == {"caption": None, "tags": None}
    # a bad URL and too much text: both said
    assert records[3]["error"].startswith("scheme must be http or https")
    assert "column 'caption' holds 80002 bytes" in records[3]["error"]


def test_a_value_python_cannot_hold_spoils_only_its_own_row(
    server: DevServer, tmp_path: Path
) -> None:
    """A date past year 9999 and a timestamp with nanoseconds used to stop the whole
    input at its first batch ("input broke off after 0 lines"), on every re-run."""
    day = datetime.date(2024, 5, 1)
    days = (day - datetime.date(1970, 1, 1)).days
    table = pa.table(
        {
            "url": [f"{server.url}/i/{n}.jpg" for n in range(4)],
            "day": pa.array([days, 3_000_000, days, days], pa.date32()),
            "at": pa.array([0, 1_000, 1_000_000_007, 2_000], pa.timestamp("ns")),
        }
    )
    listing = tmp_path / "dates.parquet"
    pq.write_table(table, listing)
    out = tmp_path / "out"
    args = ["fetch", str(listing), "-o", str(out), "--extra-column", "day", "--extra-column", "at"]
    for _ in range(2):  # the same on a re-run
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        assert "broke off" not in result.stderr and "Traceback" not in result.stderr
    records = {r["line"]: r for r in read_manifest(out)}
    assert sorted(records) == [1, 2, 3, 4]
    assert records[1]["extra"] == {"day": "2024-05-01", "at": "1970-01-01T00:00:00"}
    assert records[4]["extra"] == {"day": "2024-05-01", "at": "1970-01-01T00:00:00.000002"}
    assert records[1]["status"] == records[4]["status"] == "saved"
    assert (records[2]["reason"], records[3]["reason"]) == ("invalid_url", "invalid_url")
    assert records[2]["error"] == (
        "column 'day' holds a date32[day] value Python cannot hold: date value out of range"
    )
    assert records[2]["extra"] == {"day": None, "at": "1970-01-01T00:00:00.000001"}
    assert records[3]["error"].startswith("column 'at' holds a timestamp[ns] value Python")
    assert records[3]["extra"] == {"day": "2024-05-01", "at": None}
