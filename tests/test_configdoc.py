"""docs/configuration.md and config/imgdl.yaml are what the settings model renders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from downloader import configdoc
from downloader import settings as settings_mod
from tests.conftest import REPO, clean_env


@pytest.mark.parametrize(
    ("path", "render"),
    [(configdoc.MARKDOWN_PATH, configdoc.markdown), (configdoc.YAML_PATH, configdoc.default_yaml)],
)
def test_committed_file_is_what_the_model_renders(path: Path, render: Callable[[], str]) -> None:
    committed = (REPO / path).read_text(encoding="utf-8")
    assert committed == render(), (
        f"{path} is out of date with downloader/settings.py: run {configdoc.REGENERATE} "
        "and commit the result"
    )


def test_every_key_and_section_is_described() -> None:
    """A key added without a description would leave a hole in both files."""
    models = [*settings_mod.SECTIONS.values(), settings_mod.HostLimits]
    for model in models:
        assert model.__doc__, model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    page = configdoc.markdown()
    for key in settings_mod.KEYS:
        assert f"### `{key}`" in page
        assert f"`{settings_mod.env_name(key)}`" in page


def test_every_flag_is_in_the_reference() -> None:
    flags = configdoc.flags()
    assert flags["output.dir"] == "-o, --output"
    assert flags["limits.rate"] == "--rate"
    page = configdoc.markdown()
    for key, flag in flags.items():
        assert f"### `{key}`" in page and f"- flag: `{flag}`" in page


def test_the_precedence_example_runs_as_shown(tmp_path: Path) -> None:
    """The page's example, run by a shell: it prints the lines the page says it does."""
    page = configdoc.markdown()
    script = re.search(r"```sh\n(.*?)```", page, re.S)
    shown = re.search(r"among them:\n\n```\n(.*?)```", page, re.S)
    assert script and shown
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-e", "-c", script.group(1)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = {" ".join(line.split()) for line in done.stdout.splitlines()}
    for line in shown.group(1).splitlines():
        assert " ".join(line.split()) in printed, line
