"""The same URL twice in a run is fetched once; the later lines point at the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from downloader.devserver import DevServer
from tests.conftest import image_files, read_manifest, read_summary, run_cli, write_list


def test_duplicates_across_inputs_fetched_once(server: DevServer, tmp_path: Path) -> None:
    a = write_list(tmp_path / "a.txt", [f"{server.url}/i/{n}.jpg" for n in range(20)])
    b = write_list(
        tmp_path / "b.txt",
        [f"{server.url}/i/{n}.jpg" for n in range(10, 30)] + [f"{server.url}/i/3.jpg"] * 5,
    )
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(a), str(b), "-o", str(out), "--processes", "2", "--shard-size", "7"
    )
    assert result.returncode == 0, result.stderr
    paths = [p for _, _, p in server.requests]
    assert sorted(paths) == sorted({f"/i/{n}.jpg" for n in range(30)})  # each URL once
    records = read_manifest(out)
    assert len(records) == 45
    dups = [r for r in records if r["reason"] == "duplicate"]
    assert len(dups) == 15
    firsts = {(r["input"], r["line"]): r for r in records if r["status"] == "saved"}
    for dup in dups:
        label, line = dup["duplicate_of"].rsplit(":", 1)
        first = firsts[(label, int(line))]
        assert first["url"] == dup["url"] and first["path"] == dup["path"]
        assert dup["status"] == "skipped"
    assert len(image_files(out)) == 30
    assert read_summary(out)["by_reason"] == {"duplicate": 15}
    assert "45 lines: 30 saved, 15 skipped (duplicate 15), 0 failed" in result.stderr


def test_duplicate_of_a_failed_url_fails_the_same_way(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/status/404/1"] * 3)
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 1
    records = sorted(read_manifest(out), key=lambda r: r["line"])
    assert [r["reason"] for r in records] == ["http_error"] * 3
    assert [r["duplicate_of"] for r in records] == [None, f"{listing}:1", f"{listing}:1"]
    assert len(server.requests) == 1
    assert (tmp_path / "out" / "failures.txt").read_text().split() == [records[0]["url"]]


def test_names_differing_only_in_case_collide_on_a_case_blind_disk(tmp_path: Path) -> None:
    from downloader.dedupe import Duplicates
    from downloader.outcomes import Job, Outcome
    from downloader.storage import stem_for

    recorded: list[Outcome] = []
    for fold, expected in ((True, ["name_collision"]), (False, [])):
        recorded.clear()
        dedupe = Duplicates(
            tmp_path / f"d{fold}.sqlite",
            recorded.append,
            lambda job: stem_for(job, "{url_hash}"),
            fold_case=fold,
        )
        first = Job(url="http://a.example/1.jpg", input="x.csv", line=2, name="Cat")
        second = Job(url="http://a.example/2.jpg", input="x.csv", line=3, name="cat")
        assert dedupe.admit(first)
        assert dedupe.admit(second) is (not fold)
        dedupe.close()
        assert [str(o.reason) for o in recorded] == expected


def test_a_url_whose_first_line_collided_is_fetched_under_its_next_name(
    server: DevServer, tmp_path: Path
) -> None:
    listing = tmp_path / "n.csv"
    listing.write_text(
        f"url,name\n{server.url}/i/0.jpg,x\n{server.url}/i/4.jpg,x\n{server.url}/i/4.jpg,y\n"
    )
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--name-column", "name")
    assert result.returncode == 1
    records = {r["line"]: (r["status"], r["reason"], r["path"]) for r in read_manifest(out)}
    assert records[2] == ("saved", None, "x.jpg")
    assert records[3][1] == "name_collision"
    assert records[4] == ("saved", None, "y.jpg")
    again = run_cli("fetch", str(listing), "-o", str(out), "--name-column", "name")
    assert again.returncode == 1  # line 3 still collides; it is not "skipped_exists x.jpg"
    assert {r["line"]: r["reason"] for r in read_manifest(out)}[3] == "name_collision"


def test_duplicate_records_from_the_compact_first_line(tmp_path: Path) -> None:
    """The table keeps only what a duplicate needs of its first line's record (not the
    whole record): each kind of duplicate gets every field it got from the whole one."""
    import dataclasses

    from downloader.dedupe import Duplicates
    from downloader.outcomes import Job, Outcome, Reason, Status

    recorded: list[Outcome] = []
    dedupe = Duplicates(tmp_path / "d.sqlite", recorded.append)
    url_ok, url_404, url_lost = (f"http://a.example/{n}.jpg" for n in range(3))

    label = "l\udcff.csv"  # a file name that is not UTF-8, as Python gives it

    def job(url: str, line: int) -> Job:
        return Job(url=url, input=label, line=line, extra=json.dumps({"tag": f"t{line}"}))

    assert dedupe.admit(job(url_ok, 1)) and dedupe.admit(job(url_404, 2))
    assert dedupe.admit(job(url_lost, 3))
    assert not dedupe.admit(job(url_ok, 4))  # waits: the first line is in flight
    saved = Outcome.saved(job(url_ok, 1), path="ab/\udcfe.jpg", bytes=5, http_status=200)
    failed = Outcome.not_saved(
        job(url_404, 2), Reason.HTTP_ERROR, http_status=404, error="Non trouv\udce9"
    )
    dedupe.finished([saved.to_dict(), failed.to_dict()])
    assert not dedupe.admit(job(url_404, 5))  # known at once
    assert not dedupe.admit(job(url_ok, 6))
    assert not dedupe.admit(job(url_lost, 7))  # its first line never gets an outcome
    dedupe.close()
    got = {o.line: dataclasses.replace(o, finished_at=None) for o in recorded}

    def want(line: int, url: str, status: Status, reason: Reason, **fields: Any) -> Outcome:
        extra = {"tag": f"t{line}"}
        return Outcome(label, line, url, status, reason, extra=extra, **fields)

    same_as_1 = {"path": "ab/\udcfe.jpg", "duplicate_of": f"{label}:1"}
    assert got == {
        4: want(4, url_ok, Status.SKIPPED, Reason.DUPLICATE, **same_as_1),
        6: want(6, url_ok, Status.SKIPPED, Reason.DUPLICATE, **same_as_1),
        5: want(
            *(5, url_404, Status.FAILED, Reason.HTTP_ERROR),
            http_status=404,
            error=f"same URL as {label}:2, which failed: Non trouv\udce9",
            duplicate_of=f"{label}:2",
        ),
        7: want(7, url_lost, Status.FAILED, Reason.INTERRUPTED, error="first line not done"),
    }
    assert [type(o.reason) for o in recorded] == [Reason] * 4  # enums, as the worker's
