"""The command line itself: ``config validate``."""

from __future__ import annotations

from pathlib import Path

import pytest

from downloader import settings as settings_mod
from downloader.errors import ConfigError
from tests.conftest import REPO, clean_env, run_cli


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
