"""Every input format, end to end through the real CLI, and malformed lines."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from downloader.devserver import DevServer
from downloader.errors import InputError
from downloader.outcomes import Job, Outcome, Reason
from downloader.settings import InputSettings
from downloader.sharding import TICK
from downloader.sources import InputList, InvalidUrl, check_url, open_inputs, read_in_background
from tests.conftest import image_files, read_manifest, run_cli


def _urls(server: DevServer, start: int, n: int) -> list[str]:
    return [f"{server.url}/i/{i}.jpg" for i in range(start, start + n)]


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _inputs(server: DevServer, tmp: Path) -> dict[str, Path]:
    """Five URLs in each format, each on a distinct range of images."""
    txt = "# a comment\n\n" + "\n".join(_urls(server, 0, 5)) + "\n"
    csv = "id,url,caption\n" + "".join(
        f"{i},{u},cat {i}\n" for i, u in enumerate(_urls(server, 10, 5))
    )
    tsv = "url\tname\n" + "".join(f"{u}\tn{i}\n" for i, u in enumerate(_urls(server, 20, 5)))
    jsonl = "".join(
        json.dumps({"url": u, "n": i}) + "\n" for i, u in enumerate(_urls(server, 30, 5))
    )
    return {
        "txt": _write(tmp / "a.txt", txt),
        "csv": _write(tmp / "b.csv", csv),
        "tsv": _write(tmp / "c.tsv", tsv),
        "jsonl": _write(tmp / "d.jsonl", jsonl),
        "txt.gz": _write(tmp / "e.txt.gz", txt.replace("/i/", "/i/10")),
        "csv.gz": _write(tmp / "f.csv.gz", csv.replace("/i/", "/i/10")),
        "jsonl.gz": _write(tmp / "g.jsonl.gz", jsonl.replace("/i/", "/i/10")),
    }


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "txt.gz", "csv.gz", "jsonl.gz"])
def test_each_format_downloads_every_url(server: DevServer, tmp_path: Path, fmt: str) -> None:
    path = _inputs(server, tmp_path)[fmt]
    out = tmp_path / "out"
    result = run_cli("fetch", str(path), "-o", str(out), "--processes", "2")
    assert result.returncode == 0, result.stderr
    records = read_manifest(out)
    assert len(records) == 5
    assert {r["status"] for r in records} == {"saved"}
    assert {r["input"] for r in records} == {str(path)}
    assert len(image_files(out)) == 5
    for record in records:
        assert (out / record["path"]).read_bytes()[:2] in (b"\xff\xd8", b"\x89P", b"RI", b"GI")


def test_several_inputs_in_one_run(server: DevServer, tmp_path: Path) -> None:
    paths = _inputs(server, tmp_path)
    out = tmp_path / "out"
    result = run_cli("fetch", *map(str, paths.values()), "-o", str(out), "--processes", "2")
    assert result.returncode == 0, result.stderr
    records = read_manifest(out)
    assert len(records) == 35
    assert {r["input"] for r in records} == {str(p) for p in paths.values()}
    assert len(image_files(out)) == 35


def test_stdin_gzip_jsonl(server: DevServer, tmp_path: Path) -> None:
    body = "".join(json.dumps({"url": u}) + "\n" for u in _urls(server, 0, 7))
    out = tmp_path / "out"
    result = run_cli("fetch", "-", "-o", str(out), stdin=gzip.compress(body.encode()))
    assert result.returncode == 0, result.stderr
    records = read_manifest(out)
    assert [r["line"] for r in sorted(records, key=lambda r: r["line"])] == list(range(1, 8))
    assert {r["input"] for r in records} == {"-"}
    assert {r["status"] for r in records} == {"saved"}


def test_stdin_plain_text(server: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    body = "\n".join(_urls(server, 0, 3)) + "\n"
    result = run_cli("fetch", "-", "-o", str(out), stdin=body.encode())
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(out)) == 3


def test_name_column_names_the_file(server: DevServer, tmp_path: Path) -> None:
    listing = _write(
        tmp_path / "named.csv",
        f"url,name\n{server.url}/i/0.jpg,cats/tom\n{server.url}/i/1.jpg,dogs/rex.jpg\n",
    )
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--name-column", "name")
    assert result.returncode == 0, result.stderr
    paths = sorted(r["path"] for r in read_manifest(out))
    # image 0 is a JPEG, image 1 a PNG: the extension follows the bytes, not the name.
    assert paths == ["cats/tom.jpg", "dogs/rex.png"]
    assert (out / "cats" / "tom.jpg").is_file()


def test_malformed_lines_become_invalid_url_outcomes(server: DevServer, tmp_path: Path) -> None:
    good = f"{server.url}/i/0.jpg"
    raw = (
        good.encode() + b"\n"
        b"ftp://example.com/a.jpg\n"
        b"http:///nohost.jpg\n"
        b"\xff\xfe not utf-8\n"
        b"just words\n"
        b"http://127.0.0.1:99999/x.jpg\n"
        b"http://exa mple.com/a b.jpg\n"
    )
    listing = tmp_path / "bad.txt"
    listing.write_bytes(raw)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    records = {r["line"]: r for r in read_manifest(out)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6, 7]
    assert records[1]["status"] == "saved"
    for line in range(2, 8):
        assert records[line]["status"] == "failed"
        assert records[line]["reason"] == "invalid_url"
        assert records[line]["input"] == str(listing)
        assert records[line]["error"]
    assert "scheme" in records[2]["error"]
    assert "UTF-8" in records[4]["error"]
    # Broken lines are not re-feedable: failures.txt leaves them out.
    assert (out / "failures.txt").read_text() == ""


def test_malformed_csv_and_json_lines(server: DevServer, tmp_path: Path) -> None:
    csv = _write(tmp_path / "x.csv", f"url,name\n{server.url}/i/0.jpg,a\nonly-one-column\n\n")
    jsonl = _write(
        tmp_path / "x.jsonl",
        f'{{"url": "{server.url}/i/1.jpg"}}\n{{not json\n[1, 2]\n{{"link": "x"}}\n',
    )
    out = tmp_path / "out"
    result = run_cli("fetch", str(csv), str(jsonl), "-o", str(out))
    assert result.returncode == 1
    records = {(Path(r["input"]).name, r["line"]): r for r in read_manifest(out)}
    assert records[("x.csv", 2)]["status"] == "saved"
    assert records[("x.csv", 3)]["reason"] == "invalid_url"
    assert "columns" in records[("x.csv", 3)]["error"]
    assert records[("x.jsonl", 1)]["status"] == "saved"
    assert "JSON" in records[("x.jsonl", 2)]["error"]
    assert "object" in records[("x.jsonl", 3)]["error"]
    assert "'url'" in records[("x.jsonl", 4)]["error"]
    assert len(records) == 6


def test_missing_input_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("fetch", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "cannot open input" in result.stderr
    assert "Traceback" not in result.stderr


def test_csv_without_the_url_column_is_a_usage_error(tmp_path: Path) -> None:
    listing = _write(tmp_path / "x.csv", "link,name\nhttp://a/b,c\n")
    result = run_cli("fetch", str(listing), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no column 'url'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_input_is_streamed_not_loaded(tmp_path: Path) -> None:
    """Reading the first line of a big list must not read the whole file."""
    listing = tmp_path / "big.txt"
    with open(listing, "w") as handle:
        for i in range(200_000):
            handle.write(f"http://127.0.0.1:9/i/{i}.jpg\n")
    source = InputList(str(listing), InputSettings())
    items = iter(source)
    first = next(items)
    assert isinstance(first, Job) and first.line == 1
    (fd,) = [
        fd
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(listing.resolve())
    ]
    position = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split()[1])
    assert 0 < position < listing.stat().st_size // 10
    source.close()


def test_format_sniffed_from_content_for_unknown_suffix(tmp_path: Path) -> None:
    listing = _write(tmp_path / "list.data", '{"url": "http://127.0.0.1:9/a.jpg"}\n')
    (item,) = list(open_inputs([str(listing)], InputSettings())[0])
    assert isinstance(item, Job) and item.url == "http://127.0.0.1:9/a.jpg"


def test_stdin_only_once() -> None:
    with pytest.raises(InputError):
        open_inputs(["-", "-"], InputSettings())


@pytest.mark.parametrize(
    "url",
    ["http://a.example/x.jpg", "HTTPS://A.example:8443/x?y=1", "  http://a.example/x.jpg  "],
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url) == url.strip()


def test_outcome_round_trips_through_json() -> None:
    job = Job(url="http://a/b", input="x.txt", line=3)
    outcome = Outcome.not_saved(job, Reason.TIMEOUT)
    assert Outcome.from_json(outcome.to_json()) == outcome


@pytest.mark.parametrize(
    "char", [" ", "\t", "\x00", "\x1c", "\x7f", "\x85", "\xa0", "\u2028", "\u3000"]
)
def test_check_url_rejects_spaces_and_control_characters(char: str) -> None:
    with pytest.raises(InvalidUrl, match="whitespace or control characters"):
        check_url(f"http://a.example/x{char}y.jpg")
    assert check_url("http://a.example/\u00e9\u200b.jpg")  # other non-ASCII: the server's call


def _background(*sources: Iterator[Any], buffered: int = 4, poll: float = 0.05) -> Iterator[Any]:
    """read_in_background over stand-ins for InputList (each is iterated the same way)."""
    return read_in_background(cast(list[InputList], list(sources)), buffered, poll)


def test_the_background_reader_hands_over_a_slow_inputs_line_at_once() -> None:
    """A line is never held back to fill a batch: while the input blocks, the caller
    has what came before and gets TICKs; the rest comes once it is read."""
    go_on = threading.Event()
    job = Job(url="http://a.example/1.jpg", input="p", line=1)

    def slow() -> Iterator[Job]:
        yield job
        go_on.wait(10)
        yield Job(url="http://a.example/2.jpg", input="p", line=2)

    items = _background(slow())
    assert next(items) is job
    assert [next(items) for _ in range(3)] == [TICK] * 3  # nothing new for 3 polls
    go_on.set()
    assert [i.line for i in items if i is not TICK] == [2]


def test_the_background_reader_reads_at_most_its_buffer_ahead() -> None:
    produced = 0

    def endless() -> Iterator[Job]:
        nonlocal produced
        while True:
            produced += 1
            yield Job(url="http://a.example/x.jpg", input="e", line=produced)

    items = _background(endless(), buffered=8)
    assert next(items).line == 1
    time.sleep(0.3)  # the reader fills its buffer, then waits for room
    assert produced <= 1 + 8 + 1
    lines = [next(items).line for _ in range(1000)]
    assert lines == list(range(2, 1002))  # in order, none lost while it waited
    time.sleep(0.3)
    assert produced <= 1001 + 8 + 1


def test_the_background_reader_raises_in_the_callers_thread() -> None:
    def broken() -> Iterator[Job]:
        yield Job(url="http://a.example/1.jpg", input="b", line=1)
        raise OSError("the disk went away")

    items = _background(broken())
    assert next(items).line == 1
    with pytest.raises(OSError, match="the disk went away"):
        next(i for i in items if i is not TICK)


def test_a_job_pickles_with_every_field() -> None:
    """A shard's jobs reach the worker pickled (Job.__reduce__): nothing may be lost."""
    import dataclasses
    import pickle

    values: dict[str, Any] = {
        f.name: (7 if f.type in ("int", int) else f"{f.name}-value")
        for f in dataclasses.fields(Job)
    }
    job = Job(**values)
    again = pickle.loads(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(again) is Job and dataclasses.asdict(again) == values
