"""The command line itself: help with examples, ``config validate``, ``fetch --dry-run``."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from downloader import launch
from downloader import settings as settings_mod
from downloader.cli import cli
from downloader.devserver import DevServer
from downloader.errors import ConfigError
from tests.conftest import REPO, clean_env, read_manifest, read_summary, run_cli, write_list


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _command_paths(sub, (*path, name))


def _examples(help_text: str) -> list[str]:
    """The lines of the "Examples:" block of a help text."""
    assert "Examples:\n" in help_text
    block = help_text.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()]


def test_every_command_has_examples_in_its_help() -> None:
    """Walks the click tree, so that a command added without examples fails here."""
    paths = list(_command_paths(cli))
    assert {("fetch",), ("config", "show"), ("config", "validate")} <= set(paths)
    for path in paths:
        result = run_cli(*path, "--help")
        assert result.returncode == 0, result.stderr
        examples = _examples(result.stdout)
        assert len(examples) >= 2, (path, result.stdout)  # not rewrapped into one line
        for example in examples:
            words = example.split("imgdl ", 1)[1].split()  # the command the example runs
            command: click.Command = cli
            while isinstance(command, click.Group) and words and words[0] in command.commands:
                command = command.commands[words.pop(0)]
            assert not isinstance(command, click.Group) or words[:1] == ["--help"], example


def test_config_validate_lists_every_problem_with_line_key_and_fix(tmp_path: Path) -> None:
    config = tmp_path / "my.yaml"
    config.write_text(
        "http:\n"
        "  concurency: 10\n"  # unknown key
        "  read_timeout: soon\n"  # wrong type
        "limits:\n"
        "  rate: 5\n"
        "  per_host_connections: -1\n"  # out of range
    )
    result = run_cli("config", "validate", str(config))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{config}:2", "http.concurency"],
        [f"{config}:3", "http.read_timeout"],
        [f"{config}:6", "limits.per_host_connections"],
    ]
    assert "did you mean 'http.concurrency'?" in lines[0]
    assert "got 'soon'" in lines[1] and "default 30.0" in lines[1]
    assert "expected integer, 0 to 10000; default 0" in lines[2]
    assert result.stderr == f"imgdl: error: {config}: 3 problems\n"


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("http:\n  concurrency: 8\n  read_timeout: [1\nlog:\n  level: info\n", 4, "at line 3"),
        ("http:\n  concurrency: 8\n\tread_timeout: 3\n", 3, "not allow tabs"),
        ("- http\n", 1, "top level must be a mapping"),
        ("run:\n  shard_size: 5\nhttps:\n  concurrency: 1\n", 3, "did you mean 'http'?"),
    ],
)
def test_config_validate_gives_the_line_of_file_level_problems(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    config = tmp_path / "my.yaml"
    config.write_text(text)
    result = run_cli("config", "validate", str(config))
    assert result.returncode == 2
    assert result.stdout.startswith(f"{config}:{line}: ")
    assert expected in result.stdout


def test_config_validate_ok_checks_the_file_alone(tmp_path: Path) -> None:
    default = REPO / "config" / "imgdl.yaml"
    bad_env = clean_env(IMGDL_HTTP_CONCURRENCY="0", IMGDL_CONFIG=str(tmp_path / "none.yaml"))
    result = run_cli("config", "validate", str(default), env=bad_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"{default}: OK\n"
    missing = run_cli("config", "validate", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2
    assert "cannot read config file" in missing.stdout


@pytest.mark.parametrize(
    "text",
    [
        "http:\n  concurency: 1\n  concurrency: 0\n",
        "log:\n  level: loud\noutput:\n  name_template: '{nope}'\n",
        "limits:\n  hosts:\n    a.example: {rate: 0, connections: 0}\n",
        "http: 3\nnosuch: {}\n",
    ],
)
def test_load_stops_at_a_problem_that_validate_lists(tmp_path: Path, text: str) -> None:
    """Both go through the same checks: whatever stops a run, validate reports too."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    listed = [str(problem) for problem in settings_mod.validate_file(config)]
    with pytest.raises(ConfigError) as caught:
        settings_mod.load(config_file=config, env={})
    assert any(str(caught.value).startswith(problem) for problem in listed), listed
    assert len(listed) == 2
    assert "and 1 more problem; `imgdl config validate" in str(caught.value)


def test_a_run_with_a_bad_config_says_how_to_see_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("http:\n  concurrency: 0\n  max_redirects: -1\n")
    result = run_cli("fetch", "-", "--config", str(config), stdin=b"")
    assert result.returncode == 2
    assert result.stderr.startswith(f"imgdl: error: {config}:2: http.concurrency: ")
    assert f"`imgdl config validate {config}`" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def _report(stdout: str) -> dict[str, str]:
    """The ``name: value`` lines of a dry run's report."""
    rows = {}
    for line in stdout.splitlines():
        if not line.startswith(" ") and ": " in line:
            name, value = line.split(":", 1)
            rows[name] = value.strip()
    return rows


def test_dry_run_counts_as_the_run_would_without_a_request(
    server: DevServer, tmp_path: Path
) -> None:
    good = [f"{server.url}/i/{n}.jpg" for n in range(5)]
    odd = ["ftp://example.com/a.jpg", good[0], "# a comment", "", "not a url", good[1], good[0]]
    listing = write_list(tmp_path / "u.txt", [*good, *odd])
    out = tmp_path / "out"
    temp = tmp_path / "temp"
    temp.mkdir()
    result = run_cli(
        "fetch", "--dry-run", str(listing), "-o", str(out), env=clean_env(TMPDIR=str(temp))
    )
    assert result.returncode == 1, result.stderr
    assert server.requests == [] and server.hits == {}
    assert not out.exists()
    assert os.listdir(temp) == []  # its SQLite file was in a temporary folder, now gone
    rows = _report(result.stdout)
    assert rows["lines"] == "10"
    assert rows["to fetch"] == "5"
    assert rows["duplicates"].startswith("3 ")
    assert rows["invalid lines"] == "2"
    assert rows["hosts"] == "1 (most URLs: 127.0.0.1 5)"
    assert f"{listing}:6: invalid_url: scheme must be http or https" in result.stdout
    assert f"{listing}:10: invalid_url: URL contains whitespace" in result.stdout

    real = run_cli("fetch", str(listing), "-o", str(out))
    assert real.returncode == 1
    summary = read_summary(out)
    assert summary["lines"] == 10 and summary["saved"] == 5
    assert summary["by_reason"] == {"duplicate": 3, "invalid_url": 2}


def test_dry_run_counts_literal_addresses_the_policy_refuses(
    server: DevServer, tmp_path: Path
) -> None:
    """A URL on 127.0.0.1 without network.allow fails before any request: the dry run
    says so, as the run would (a new user's trial found it counted as to fetch)."""
    urls = [f"{server.url}/i/{n}.jpg" for n in range(4)] + ["http://10.1.2.3/x.jpg"]
    listing = write_list(tmp_path / "u.txt", urls)
    env = {k: v for k, v in clean_env().items() if k != "IMGDL_NETWORK_ALLOW"}
    dry = run_cli("fetch", "--dry-run", str(listing), "-o", str(tmp_path / "d"), env=env)
    assert dry.returncode == 1, dry.stderr
    rows = _report(dry.stdout)
    assert rows["to fetch"] == "0" and rows["blocked addresses"].startswith("5 ")
    assert f"{listing}:5: blocked_address: 10.1.2.3 is private" in dry.stdout
    real = run_cli("fetch", str(listing), "-o", str(tmp_path / "r"), env=env)
    assert read_summary(tmp_path / "r")["by_reason"] == {"blocked_address": 5}
    assert real.returncode == 1 and server.requests == []


def test_dry_run_checks_names_as_the_run_would(server: DevServer, tmp_path: Path) -> None:
    listing = tmp_path / "named.csv"
    listing.write_text(
        "url,name\n"
        f"{server.url}/i/0.jpg,one\n"
        f"{server.url}/i/1.jpg,../up\n"  # invalid_name
        f"{server.url}/i/2.jpg,one\n"  # name_collision
        f"{server.url}/i/3.jpg,three\n"
        f"{server.url}/i/3.jpg,three\n"  # duplicate
    )
    out = tmp_path / "out"
    args = ("fetch", str(listing), "-o", str(out), "--name-column", "name")
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 1
    rows = _report(result.stdout)
    assert (rows["to fetch"], rows["invalid names"], rows["name collisions"]) == ("2", "1", "1")
    assert rows["duplicates"].startswith("1 ")
    assert f"{listing}:3: invalid_name: " in result.stdout
    assert f"{listing}:4: name_collision: the name 'one' is taken by {listing}:2" in result.stdout
    assert server.requests == [] and not out.exists()

    assert run_cli(*args).returncode == 1
    reasons = sorted(str(r["reason"]) for r in read_manifest(out))
    assert reasons == ["None", "None", "duplicate", "invalid_name", "name_collision"]


def test_dry_run_of_a_clean_list_exits_0_and_keeps_usage_errors_at_2(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", ["http://example.com/a.jpg"] * 3)
    result = run_cli("fetch", "--dry-run", str(listing), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert _report(result.stdout)["to fetch"] == "1"
    missing = run_cli("fetch", "--dry-run", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and "cannot open input" in missing.stderr


def test_input_errors_say_how_to_fix_them(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.csv", ["link", "http://example.com/a.jpg"])
    out = str(tmp_path / "out")
    cases = [
        ((str(tmp_path / "none.txt"),), "check the path"),
        ((str(listing),), "name the right ones with --url-column"),
        ((str(listing), str(tmp_path / ".." / tmp_path.name / "u.csv")), f"input {tmp_path}/.."),
    ]
    for inputs, fix in cases:
        result = run_cli("fetch", *inputs, "-o", out, "--dry-run")
        assert result.returncode == 2
        assert fix in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_dry_run_of_one_task_counts_that_task_lines(server: DevServer, tmp_path: Path) -> None:
    """A split job's task reads every line but takes its slice: the dry run does too."""
    urls = [f"{server.url}/i/{n}.jpg" for n in range(12)] + ["ftp://example.com/x.jpg"]
    listing = write_list(tmp_path / "u.txt", [*urls, urls[0], urls[5]])
    out = tmp_path / "out"
    counted = []
    for index in (0, 1):
        split = ("--shard-index", str(index), "--shard-count", "2")
        before = sorted(out.rglob("*"))
        dry = run_cli("fetch", str(listing), "-o", str(out), *split, "--dry-run")
        assert dry.returncode in (0, 1), dry.stderr
        rows = _report(dry.stdout)
        assert rows["task"].startswith(f"task-0000{index}-of-00002 (from run.shard_index); ")
        assert server.requests == [] and sorted(out.rglob("*")) == before
        real = run_cli("fetch", str(listing), "-o", str(out), *split)
        summary = read_summary(out / "tasks" / f"task-0000{index}-of-00002")
        assert rows["lines"] == str(summary["lines"])
        assert rows["to fetch"] == str(summary["saved"]), real.stderr
        assert rows["duplicates"].startswith(f"{summary['by_reason'].get('duplicate', 0)} ")
        counted.append(summary["lines"])
        server.requests.clear()
    assert sum(counted) == 15


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        (["fetch", "urls.txt", "-o", "out"], True),
        (["fetch", "--dry-run", "urls.txt"], False),
        (["fetch", "--help"], False),
        (["fetch", "-h"], False),
        (["config", "show", "fetch"], False),
        (["report", "out"], False),
        ([], False),
    ],
)
def test_only_a_fetch_that_downloads_starts_the_fork_server(args: list[str], starts: bool) -> None:
    assert launch.wants_workers(args) is starts


def test_a_finished_fetch_leaves_with_its_output_and_exit_code(
    server: DevServer, tmp_path: Path
) -> None:
    """The exit after a fetch skips the interpreter's teardown (launch.leave_now): the
    summary still reaches a pipe whole, the exit code is the run's, and the exit hooks
    ran (multiprocessing's resource tracker finds no semaphore left behind)."""
    urls = [f"{server.url}/i/1.jpg", f"{server.url}/status/404/1"]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--log-level", "warning")
    assert result.returncode == 1, result.stderr
    assert result.stderr.rstrip().endswith("(1 to retry); exit 1"), result.stderr
    assert "leaked" not in result.stderr and "Traceback" not in result.stderr
    assert read_summary(out)["saved"] == 1
    assert len(read_manifest(out)) == 2


def test_leave_now_waits_for_a_thread_that_is_not_a_daemon() -> None:
    """Such a thread would be killed by os._exit: the normal exit (which waits) is kept."""
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        launch.leave_now(3)  # returns instead of ending this process
    finally:
        release.set()
        worker.join()
