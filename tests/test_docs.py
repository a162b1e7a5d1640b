"""The documentation cannot drift from the code: the reasons, the manifest's fields,
the summary's keys, the exit codes, the telemetry names and the links are checked
against the modules they describe."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from downloader.merge import merge
from downloader.outcomes import REFETCHABLE, Outcome, Reason, Status
from downloader.report import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_SIGHUP,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    RunReport,
    Totals,
    counts_of,
)
from downloader.retry import DEFAULT_STATUSES, RETRYABLE_REASONS
from downloader.state import MANIFEST, SUMMARY, TASKS_DIR, RunState
from downloader.tasks import task_name

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

_REASON_HEADING = re.compile(r"^###\s+`([^`]+)`\s*$")


def _sections(text: str, heading: re.Pattern[str]) -> dict[str, list[str]]:
    """The body lines under each heading that matches, by the heading's first group;
    a repeated heading makes a key with a trailing '#' so that it can be seen."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = heading.match(line)
        if match:
            key = match.group(1)
            while key in found:
                key += "#"
            current = found[key] = []
        elif line.startswith("#"):
            current = None
        elif current is not None:
            current.append(line)
    return found


def _reason_entries() -> dict[str, list[str]]:
    return _sections(TROUBLESHOOTING.read_text(encoding="utf-8"), _REASON_HEADING)


def test_every_reason_has_exactly_one_troubleshooting_entry() -> None:
    documented = list(_reason_entries())
    reasons = [r.value for r in Reason]
    assert sorted(set(reasons) - set(documented)) == [], "reasons without an entry"
    assert sorted(set(documented) - set(reasons)) == [], "entries for reasons that do not exist"
    assert len(documented) == len(reasons), "a reason has more than one entry"


def _facts(reason: Reason) -> str:
    """The line each entry starts with, as the code has it."""
    failures = "in `failures.txt`" if reason in REFETCHABLE else "not in `failures.txt`"
    if reason is Reason.HTTP_ERROR:
        codes = [str(code) for code in sorted(DEFAULT_STATUSES)]
        retried = f"retried on {', '.join(codes[:-1])} and {codes[-1]}"
    else:
        retried = "retried" if reason in RETRYABLE_REASONS else "not retried"
    return f"*{reason.status.value} · {failures} · {retried}*"


def test_each_entry_states_status_failures_file_and_retries_as_the_code_does() -> None:
    for name, body in _reason_entries().items():
        reason = Reason(name)
        lines = [line for line in body if line.strip()]
        assert lines, f"{name}: empty entry"
        assert lines[0] == _facts(reason), f"{name}: first line should be {_facts(reason)!r}"
        assert len(lines) >= 3, f"{name}: say what it means and what to do"


def test_each_entry_is_in_the_contents_line() -> None:
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    for reason in Reason:
        assert f"[`{reason.value}`](#{reason.value})" in text, reason.value


# -- operations.md ---------------------------------------------------------------------

OPERATIONS = DOCS / "operations.md"
_ROW = re.compile(r"^\|\s*(`[^|]+`)\s*\|\s*([^|]+?)\s*\|")


def _table(section: str) -> dict[str, str]:
    """First two columns of the table under the ``##`` or ``###`` heading ``section`` of
    operations.md, keyed by each backticked name of the first column."""
    heading = re.compile(r"^#{2,3}\s+(.+?)\s*$")
    body = _sections(OPERATIONS.read_text(encoding="utf-8"), heading)[section]
    rows: dict[str, str] = {}
    for line in body:
        match = _ROW.match(line)
        if match:
            for name in re.findall(r"`([^`]+)`", match.group(1)):
                rows[name] = match.group(2)
    return rows


def _doc_type(annotation: object) -> str:
    names: dict[object, str] = {
        str: "string",
        int: "integer",
        float: "number",
        Status: "string",
        Reason: "string",
        dict[str, typing.Any]: "object",
    }
    args = typing.get_args(annotation)
    if args:  # X | None
        (inner,) = [a for a in args if a is not type(None)]
        return f"{names[inner]} or null"
    return names[annotation]


def test_manifest_schema_table_has_every_outcome_field_with_its_type() -> None:
    documented = _table("Manifest schema")
    hints = typing.get_type_hints(Outcome)
    fields = [f.name for f in dataclasses.fields(Outcome)]
    assert [f for f in fields if f not in documented] == [], "Outcome fields not documented"
    assert [d for d in documented if d not in fields] == [], "documented fields Outcome lacks"
    assert list(documented) == fields, "keep the table in the manifest's column order"
    for name in fields:
        assert documented[name] == _doc_type(hints[name]), name


def test_summary_table_has_every_key_a_run_writes(tmp_path: Path) -> None:
    state = RunState(tmp_path / "out")
    state.open(["-"])
    task = {"index": 0, "count": 2, "source": "run.shard_index"}  # a task of a split job
    shards = {"format": "webdataset", "shard_samples": 1, "written": 0, "shards": 0, "samples": 0}
    summary = RunReport(state).finish(None, 0, 0, True, [], task=task, shards=shards)
    state.unlock()
    keys = {k for k in summary if k != "this_run"} | {f"this_run.{k}" for k in summary["this_run"]}
    keys.add("archived")  # previous-runs/*/summary.json only
    assert set(_table("summary.json")) == keys


def test_merged_summary_table_has_every_key_a_merge_writes(tmp_path: Path) -> None:
    task = tmp_path / TASKS_DIR / task_name(0, 1)
    task.mkdir(parents=True)
    (task / MANIFEST).write_text("", encoding="utf-8")
    (task / SUMMARY).write_text(
        '{"exit_code": 0, "input_complete": true, "shards": {"format": "parquet", "shards": 1}}',
        encoding="utf-8",
    )
    summary = merge(tmp_path)
    counts = set(counts_of(Totals()))
    assert set(_table("summary.json of a split job")) | counts == set(summary)


def test_exit_code_table_matches_the_code() -> None:
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", OPERATIONS.read_text(), re.M)}
    assert documented == {
        EXIT_OK,
        EXIT_FAILURES,
        EXIT_USAGE,
        EXIT_SIGHUP,
        EXIT_SIGINT,
        EXIT_SIGTERM,
    }


def test_every_metric_and_span_name_is_documented() -> None:
    source = (REPO / "downloader" / "telemetry.py").read_text(encoding="utf-8")
    names = re.findall(r"create_(?:counter|histogram|up_down_counter)\(\s*\"([^\"]+)\"", source)
    spans = re.findall(r"start_span\(\s*\"([^\"]+)\"", source)
    assert len(names) == 4 and spans == ["shard", "GET"]
    text = OPERATIONS.read_text(encoding="utf-8")
    for name in [*names, *spans]:
        assert f"`{name}`" in text, name


# -- every document ----------------------------------------------------------------------


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s) and mailto: not checked here
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page.name}: {target}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#+\s+(.+?)\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            found.add(slug)
    return found
