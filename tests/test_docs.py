"""The documentation cannot drift from the code: the reasons, the manifest's fields,
the summary's keys, the exit codes, the telemetry names and the links are checked
against the modules they describe."""

from __future__ import annotations

import re
from pathlib import Path

from downloader.outcomes import REFETCHABLE, Reason
from downloader.retry import DEFAULT_STATUSES, RETRYABLE_REASONS

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
