"""Output formats (issue 9 part 2): webdataset and parquet shards, read back with the
webdataset package and pyarrow, through the real CLI, pool and servers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from downloader.devserver import DevServer
from downloader.state import read_raw
from downloader.storage import url_hash
from tests.conftest import (
    clean_env,
    kill_9_when,
    quiet_count,
    read_manifest,
    read_summary,
    run_cli,
    start_cli,
    wait_for,
    write_list,
)

#: the manifest's columns every shard's parquet has, besides key (and image)
MANIFEST_COLUMNS = {"url", "status", "path", "bytes", "sha256", "width", "height", "line"}


def _fetch(listing: Path, out: Path, *extra: str) -> Any:
    return run_cli("fetch", str(listing), "-o", str(out), "--processes", "2", *extra)


def _read_tars(out: Path) -> list[dict[str, Any]]:
    """Every sample of OUTDIR's tar shards, read by the webdataset package."""
    shards = sorted(str(p) for p in out.glob("*.tar"))
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    return list(dataset)


def _image(sample: dict[str, Any]) -> tuple[str, bytes]:
    """The one image of a sample: (extension, bytes)."""
    (found,) = [(k, v) for k, v in sample.items() if k != "json" and not k.startswith("__")]
    return found


def _urls(server: DevServer, count: int) -> list[str]:
    return [f"{server.url}/i/{n}.{'png' if n % 3 == 0 else 'jpg'}" for n in range(count)]


def _number(url: str) -> int:
    return int(url.rsplit("/", 1)[1].split(".")[0])


def test_webdataset_shards_read_back_with_the_webdataset_package(
    server: DevServer, tmp_path: Path
) -> None:
    urls = _urls(server, 25) + [f"{server.url}/status/404/{n}" for n in range(3)]
    out = tmp_path / "out"
    result = _fetch(
        write_list(tmp_path / "u.txt", urls),
        out,
        "--output-format",
        "webdataset",
        "--shard-samples",
        "10",
    )
    assert result.returncode == 1, result.stderr  # the three 404s
    records = read_manifest(out)
    saved = {r["url"]: r for r in records if r["status"] == "saved"}
    assert len(saved) == 25 and len(records) == 28
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    samples = _read_tars(out)
    assert len(samples) == 25  # sample count equals saved count
    by_line = {r["line"]: r for r in records}
    for sample in samples:
        record = json.loads(sample["json"])
        assert record == by_line[record["line"]]  # the .json is the manifest record
        assert record["status"] == "saved"
        assert sample["__key__"] == url_hash(record["url"])
        ext, image = _image(sample)
        assert image == server.image(_number(record["url"]))[0]  # the served bytes
        assert record["path"].endswith(f".{ext}")
        assert hashlib.sha256(image).hexdigest() == record["sha256"]
    assert {json.loads(s["json"])["url"] for s in samples} == set(saved)  # no failure
    # beside each tar, its metadata: the manifest's columns, one row per sample
    for tar in sorted(out.glob("*.tar")):
        table = pq.read_table(tar.with_suffix(".parquet"))
        with tarfile.open(tar) as handle:
            members = handle.getnames()
        assert table.num_rows == len(members) // 2
        assert {"key", *MANIFEST_COLUMNS} <= set(table.column_names)
        for row in table.to_pylist():
            assert row["key"] == url_hash(row["url"]) and f"{row['key']}.json" in members
            assert row["width"] > 0 and row["height"] > 0
            assert row == {"key": row["key"], **by_line[row["line"]]}
    assert [pq.read_metadata(p).num_rows for p in sorted(out.glob("*.parquet"))] == [10, 10, 5]
    assert not list(out.rglob("*.part"))
    assert not [p for p in (out / ".imgdl" / "staging").rglob("*") if p.is_file()]
    summary = read_summary(out)
    assert summary["shards"] == {
        "format": "webdataset",
        "shard_samples": 10,
        "written": 3,
        "shards": 3,
        "samples": 25,
    }
    assert "webdataset shards: 3 written this run; 3 in" in result.stderr


def test_parquet_shards_hold_the_images_and_the_manifest_columns(
    server: DevServer, tmp_path: Path
) -> None:
    urls = [*_urls(server, 12), f"{server.url}/status/500/x", _urls(server, 1)[0]]
    out = tmp_path / "out"
    listing = write_list(tmp_path / "u.txt", urls)
    result = _fetch(
        listing, out, "--output-format", "parquet", "--shard-samples", "5", "--tries", "1"
    )
    assert result.returncode == 1, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".parquet") == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    assert not list(out.glob("*.tar"))
    by_line = {r["line"]: r for r in read_manifest(out)}
    rows = [row for p in sorted(out.glob("*.parquet")) for row in pq.read_table(p).to_pylist()]
    assert len(rows) == 12 == sum(r["status"] == "saved" for r in by_line.values())
    assert by_line[14]["reason"] == "duplicate"  # the same URL again: one sample
    for row in rows:
        image = row.pop("image")
        assert image == server.image(_number(row["url"]))[0]
        assert row == {"key": url_hash(row["url"]), **by_line[row["line"]]}
    assert read_summary(out)["shards"]["samples"] == 12


@pytest.mark.parametrize(
    ("count", "per_shard", "fmt"),
    [(20, 10, "webdataset"), (21, 10, "parquet"), (4, 1, "webdataset"), (7, 100, "parquet")],
)
def test_n_samples_make_ceil_n_over_k_shards(
    server: DevServer, tmp_path: Path, count: int, per_shard: int, fmt: str
) -> None:
    out = tmp_path / "out"
    listing = write_list(tmp_path / "u.txt", _urls(server, count))
    result = _fetch(listing, out, "--output-format", fmt, "--shard-samples", str(per_shard))
    assert result.returncode == 0, result.stderr
    commit = "tar" if fmt == "webdataset" else "parquet"
    shards = sorted(out.glob(f"*.{commit}"))
    expected = math.ceil(count / per_shard)
    assert [p.name for p in shards] == [f"{n:05d}.{commit}" for n in range(expected)]
    sizes = [pq.read_metadata(p.with_suffix(".parquet")).num_rows for p in shards]
    assert sizes == [per_shard] * (expected - 1) + [count - per_shard * (expected - 1)]


def _shard_files(out: Path) -> dict[str, tuple[int, int, str]]:
    """Each complete shard file: inode, mtime (ns), sha256."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(out.iterdir())
        if p.suffix in (".tar", ".parquet")
    }


@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_command_packs_every_sample_once(
    server: DevServer, tmp_path: Path
) -> None:
    urls = [f"{server.url}/slow/60/{n}" for n in range(600)]  # slow enough to kill mid-way
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    options = "--processes 2 --shard-size 50 --concurrency 8 --shard-samples 40"
    command = ["fetch", str(listing), "-o", str(out), "--output-format", "webdataset"]
    command += options.split()
    staging = out / ".imgdl" / "staging"

    def staged_files() -> list[Path]:  # os.walk: a fan-out folder pruned meanwhile is no error
        return [Path(d, f) for d, _, files in os.walk(staging) for f in files]

    def mid_shard() -> bool:  # three shards packed and the next one's samples staged
        # Fewer files staged than half a shard: no pack (of 40 samples) can take them
        # all between this check and the kill, unless the check saw a pack's unlinks
        # half done (CI): that kill, or one that missed the window on a loaded machine
        # (the run finished first), is tried again on a fresh folder.
        tars = len(list(out.glob("*.tar")))
        return tars >= 3 and 1 <= len(staged_files()) <= 20

    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        asked_before = len(server.requests)
        kill_9_when(start_cli(*command), mid_shard)
        first_requests = quiet_count(lambda: len(server.requests)) - asked_before
        staged = staged_files()
        if first_requests < 600 and staged:
            break
    assert first_requests < 600
    complete = sorted(p.stem for p in out.glob("*.tar"))
    assert len(complete) >= 3
    # a .parquet without its .tar (killed between the renames) is not a shard
    before = {n: v for n, v in _shard_files(out).items() if n.split(".")[0] in complete}
    assert staged  # samples of the shard that was open: not lost, waiting
    # what the killed run recorded (a staged image whose record the kill cut off is
    # removed and fetched again by design: its line is not done)
    state = out / ".imgdl"
    recorded = {
        Path(record["path"]).stem
        for journal in [*state.glob("segments/*.jsonl"), *state.glob("journal/*.jsonl")]
        for record, _ in read_raw(journal)
        if record.get("path")
    }
    packed_before = {s["__key__"] for s in _read_tars(out)}
    assert len(packed_before) == 40 * len(complete)

    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    records = read_manifest(out)
    assert sorted(r["line"] for r in records) == list(range(1, 601))
    after = _shard_files(out)
    for name, identity in before.items():  # complete shards are not rewritten
        assert after[name] == identity
    samples = _read_tars(out)
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 600  # every sample exactly once
    assert set(keys) == {url_hash(u) for u in urls}
    by_line = {r["line"]: r for r in records}
    for sample in samples:
        record = json.loads(sample["json"])
        assert record == by_line[record["line"]]
        assert _image(sample)[1] == server.image(_number(record["url"]))[0]
    tables = [pq.read_table(p) for p in sorted(out.glob("*.parquet"))]
    assert sum(t.num_rows for t in tables) == 600
    assert not list(out.rglob("*.part"))
    assert not [p for p in (out / ".imgdl" / "staging").rglob("*") if p.is_file()]
    # nothing packed, or staged with its record, was fetched again
    # (a kill after a shard's index commit can leave its staged files: packed already)
    waiting = ({p.stem for p in staged} & recorded) - packed_before
    fetched_again = len(server.requests) - asked_before - first_requests
    assert fetched_again <= 600 - len(packed_before) - len(waiting)
    shards = read_summary(out)["shards"]
    assert shards["samples"] == 600 and shards["shards"] == len(list(out.glob("*.tar")))


def test_resume_repairs_what_a_kill_between_the_steps_of_a_commit_leaves(
    server: DevServer, tmp_path: Path
) -> None:
    """A kill after a shard's rename but before its index commit (the index lacks it), and
    one between the parquet's rename and the tar's (a parquet without tar), plus a part
    file: the same command indexes the first, removes the others, fetches nothing again
    and packs nothing twice."""
    out = tmp_path / "out"
    listing = write_list(tmp_path / "u.txt", _urls(server, 10))
    command = ("--output-format", "webdataset", "--shard-samples", "4")
    assert _fetch(listing, out, *command).returncode == 0
    requests = len(server.requests)
    (out / ".imgdl" / "shards.sqlite").unlink()
    (out / "00003.parquet").write_bytes(b"torn")
    (out / "00004.tar.part").write_bytes(b"torn")
    before = _shard_files(out)
    del before["00003.parquet"]
    again = _fetch(listing, out, *command)
    assert again.returncode == 0, again.stderr
    assert len(server.requests) == requests
    assert _shard_files(out) == before
    assert not (out / "00004.tar.part").exists()
    assert len([s["__key__"] for s in _read_tars(out)]) == 10
    assert read_summary(out)["shards"] == {
        "format": "webdataset",
        "shard_samples": 4,
        "written": 0,
        "shards": 3,
        "samples": 10,
    }


def test_a_split_job_keeps_each_tasks_shards_and_merge_counts_them(
    server: DevServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    listing = write_list(tmp_path / "u.txt", _urls(server, 30))
    for index in (0, 1):
        result = _fetch(
            listing,
            out,
            "--output-format",
            "parquet",
            "--shard-samples",
            "4",
            "--shard-index",
            str(index),
            "--shard-count",
            "2",
        )
        assert result.returncode == 0, result.stderr
    merged = run_cli("merge", str(out))
    assert merged.returncode == 0, merged.stderr
    summary = read_summary(out)
    assert summary["shards"]["samples"] == 30
    files = sorted(out.glob("tasks/task-*/*.parquet"))
    assert summary["shards"]["shards"] == len(files)
    keys = [k for p in files for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]
    assert sorted(keys) == sorted(url_hash(u) for u in _urls(server, 30))
    assert "parquet shards holding 30 samples" in merged.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("-o", "s3://bucket/prefix"), "an s3:// output takes the files format only"),
        (("--name-template", "{host}/{basename}"), "output.name_template applies to the files"),
        (("--revalidate",), "cannot revalidate"),
    ],
)
def test_what_a_dataset_format_cannot_do_is_refused_at_start(
    tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    listing = write_list(tmp_path / "u.txt", ["http://127.0.0.1:9/x.jpg"])
    result = run_cli(
        "fetch", str(listing), "-o", str(tmp_path / "out"), "--output-format", "webdataset", *extra
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_without_pyarrow_the_error_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['pyarrow'] = None\n", encoding="utf-8"
    )
    listing = write_list(tmp_path / "u.txt", ["http://127.0.0.1:9/x.jpg"])
    result = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(tmp_path / "out"),
        env=clean_env(PYTHONPATH=str(tmp_path), IMGDL_OUTPUT_FORMAT="parquet"),
    )
    assert result.returncode == 2
    assert "pip install 'imgdl[dataset]'" in result.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_files_stays_the_default_and_unchanged(server: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _fetch(write_list(tmp_path / "u.txt", _urls(server, 5)), out)
    assert result.returncode == 0, result.stderr
    records = read_manifest(out)
    for record in records:
        assert (out / record["path"]).read_bytes() == server.image(_number(record["url"]))[0]
    assert "shards" not in read_summary(out)
    assert not (out / ".imgdl" / "staging").exists()
    assert not list(out.glob("*.tar")) and not list(out.glob("*.parquet"))


def test_a_stopped_run_leaves_no_small_shard_and_the_same_command_finishes(
    server: DevServer, tmp_path: Path
) -> None:
    """SIGTERM: the run finishes what is in flight and exits 143; the open shard is not
    written (its samples wait, staged), so an interrupted job gets no trail of small
    shards; the same command packs them and finishes."""
    urls = [f"{server.url}/slow/40/{n}" for n in range(300)]
    out = tmp_path / "out"
    command = ["fetch", str(write_list(tmp_path / "u.txt", urls)), "-o", str(out)]
    options = "--processes 2 --concurrency 4 --shard-size 20 --shard-samples 25"
    command += ["--output-format", "parquet", *options.split()]
    proc = start_cli(*command)
    try:
        wait_for(lambda: bool(list(out.glob("*.parquet"))))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    finally:
        proc.kill()
    shards = sorted(out.glob("*.parquet"))
    assert shards and all(pq.read_metadata(p).num_rows == 25 for p in shards)
    assert not list(out.glob("*.part"))
    summary = read_summary(out)
    assert summary["shards"]["written"] == len(shards) and summary["saved"] < 300
    staged = [p for p in (out / ".imgdl" / "staging").rglob("*") if p.is_file()]
    assert len(staged) == summary["saved"] - 25 * len(shards)

    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    keys = [k for p in sorted(out.glob("*.parquet")) for k in pq.read_table(p)["key"].to_pylist()]
    assert sorted(keys) == sorted(url_hash(u) for u in urls)
    assert [pq.read_metadata(p).num_rows for p in sorted(out.glob("*.parquet"))] == [25] * 12


def test_a_folder_holds_the_shards_of_one_format(server: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    listing = write_list(tmp_path / "u.txt", _urls(server, 3))
    assert _fetch(listing, out, "--output-format", "webdataset").returncode == 0
    other = _fetch(listing, out, "--output-format", "parquet")
    assert other.returncode == 2
    assert "holds webdataset shards" in other.stderr and "Traceback" not in other.stderr
    assert sorted(p.name for p in out.glob("0*")) == ["00000.parquet", "00000.tar"]
    # found by a new user: loose files beside shards, either way round
    loose = _fetch(listing, out)
    assert loose.returncode == 2, loose.stderr
    assert "holds dataset shards (00000.parquet)" in loose.stderr
    files_first = tmp_path / "files"
    assert _fetch(listing, files_first).returncode == 0
    shards = _fetch(listing, files_first, "--output-format", "webdataset")
    assert shards.returncode == 2, shards.stderr
    assert "holds other files" in shards.stderr and "a folder of their own" in shards.stderr
    assert not list(files_first.glob("0*.tar")) and "Traceback" not in shards.stderr


def test_extra_record_fields_are_carried_generically(tmp_path: Path) -> None:
    """Fields the manifest record gains (extra input columns such as a caption) reach
    the .json as written and the parquet as columns, typed by their first value, with
    no field named in the packer."""
    from downloader.outcomes import Outcome
    from downloader.shardfiles import OpenShard

    shard = OpenShard("webdataset", tmp_path, 7)
    records = []
    for n, (caption, ident) in enumerate([("a cat", 7), ("un chat \udcff", "x")]):
        staged = tmp_path / f"{n:032x}.png"
        staged.write_bytes(b"\x89PNG" + bytes([n]) * 10)
        base = Outcome.from_dict(
            {"input": "u.csv", "line": n + 2, "url": f"http://h/{n}", "status": "saved"}
        ).to_dict()
        record = {**base, "caption": caption, "id": ident, "meta": {"license": "cc-by"}}
        text = json.dumps(record, ensure_ascii=True)
        shard.add(staged.stem, staged, record, text)
        records.append((staged, text))
    shard.commit()
    assert sorted(p.name for p in tmp_path.glob("00007.*")) == ["00007.parquet", "00007.tar"]
    samples = _read_tars(tmp_path)
    assert [s["json"].decode() for s in samples] == [text for _, text in records]
    assert [s["png"] for s in samples] == [staged.read_bytes() for staged, _ in records]
    rows = pq.read_table(tmp_path / "00007.parquet").to_pylist()
    assert [r["caption"] for r in rows] == ["a cat", "un chat ?"]  # a lone surrogate: '?'
    assert [r["id"] for r in rows] == [7, None]  # typed by its first value; "x" is no int
    assert [json.loads(r["meta"]) for r in rows] == [{"license": "cc-by"}] * 2
    assert [r["line"] for r in rows] == [2, 3] and [r["key"] for r in rows] == [
        f"{n:032x}" for n in range(2)
    ]


def test_content_dedupe_sees_copies_whose_first_is_packed_already(
    server: DevServer, tmp_path: Path
) -> None:
    """dedupe.content with a dataset format: the first copy of an image leaves the
    staging folder once its shard is written; a copy that comes later (in the same run
    or the next) is still a duplicate_content, not a second sample."""
    out = tmp_path / "out"
    flags = ["--output-format", "webdataset", "--shard-samples", "4", "--shard-size", "8"]
    flags += ["--dedupe-content", "exact", "--concurrency", "4"]
    # the dev server has 24 distinct images: /i/N and /i/N+24 serve the same bytes
    first = _fetch(write_list(tmp_path / "a.txt", _urls(server, 72)), out, *flags)
    assert first.returncode == 0, first.stderr
    records = read_manifest(out)
    counts = {r["reason"] or r["status"]: 0 for r in records}
    for r in records:
        counts[r["reason"] or r["status"]] += 1
    assert counts == {"saved": 24, "duplicate_content": 48}
    samples = _read_tars(out)
    assert len(samples) == 24
    assert len({hashlib.sha256(_image(s)[1]).digest() for s in samples}) == 24
    assert not (out / ".imgdl" / "staging" / ".imgdl").exists()  # no table among samples

    later = [f"{server.url}/i/{n}.jpg" for n in range(100, 112)]
    again = _fetch(write_list(tmp_path / "b.txt", later), out, *flags)
    assert again.returncode == 0, again.stderr
    assert {r["reason"] for r in read_manifest(out)} == {"duplicate_content"}
    assert len(_read_tars(out)) == 24


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_odd_extra_values_are_packed_exactly(server: DevServer, tmp_path: Path, fmt: str) -> None:
    """Found in review: a lone surrogate or a 30-digit id in an extra column stopped the
    packer with a traceback, in every later run too; the id lost its digits on the way."""
    big = 123456789012345678901234567890
    nines = "9" * 401
    lines = [
        f'{{"url": "{server.url}/i/1.jpg", "caption": "bad \\udc80 cap", "id": {big}}}',
        f'{{"url": "{server.url}/i/2.jpg", "caption": "fine", "id": 7}}',
        f'{{"url": "{server.url}/i/3.jpg", "caption": "x", "id": {nines}}}',
    ]
    listing = tmp_path / "l.jsonl"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    flags = ["--output-format", fmt, "--shard-samples", "2"]
    flags += ["--extra-column", "caption", "--extra-column", "id"]
    done = _fetch(listing, out, *flags)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    by_line = {r["line"]: r for r in read_manifest(out)}
    assert by_line[1]["extra"]["id"] == big and by_line[3]["extra"]["id"] == int("9" * 401)
    cells = [
        json.loads(c)
        for p in sorted(out.glob("*.parquet"))
        for c in pq.read_table(p).column("extra").to_pylist()
    ]
    assert sorted(c["id"] for c in cells) == sorted([big, 7, int("9" * 401)])
    assert read_summary(out)["shards"]["samples"] == 3


def test_staged_images_of_a_list_moved_aside_are_not_copies_in_no_shard(
    server: DevServer, tmp_path: Path
) -> None:
    """Found in review: a stopped run's staged image, whose record a run over another
    list moved to previous-runs/, was never packed, yet with content dedupe a copy of it
    in the new list was recorded as its duplicate: an image in no shard."""
    out = tmp_path / "out"
    flags = ["--output-format", "webdataset", "--dedupe-content", "exact"]
    first = write_list(tmp_path / "a.txt", [f"{server.url}/i/0.jpg", f"{server.url}/hang/1"])
    proc = start_cli(
        "fetch", str(first), "-o", str(out), *flags, env=clean_env(IMGDL_RUN_GRACE_PERIOD="1")
    )
    try:
        staging = out / ".imgdl" / "staging"
        wait_for(lambda: any(p.is_file() for p in staging.rglob("*.*")))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    finally:
        proc.kill()
    copy = write_list(tmp_path / "b.txt", [f"{server.url}/i/24.jpg"])  # i/0's bytes
    again = _fetch(copy, out, *flags)
    assert again.returncode == 0, again.stderr
    (record,) = read_manifest(out)
    assert record["status"] == "saved", record
    assert len(_read_tars(out)) == 1
