"""Manners: an honest User-Agent, and the X-Robots-Tag opt-outs honoured."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from downloader import __version__
from downloader.devserver import DevServer
from downloader.manners import opted_out
from tests.conftest import clean_env, image_files, read_manifest, run_cli, write_list

DEFAULT = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["noai"], "noai"),
        (["noindex, nofollow"], "noindex"),
        (["NoImageAI"], "noimageai"),
        (["imgdl: noai"], "imgdl: noai"),
        (["otherbot: noai"], None),
        (["otherbot: noai", "imgdl: noimageindex"], "imgdl: noimageindex"),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["none"], "none"),
        (["imgdl: none"], "imgdl: none"),
        (["nofollow", "max-image-preview: large"], None),
        ([], None),
    ],
)
def test_directives(headers: list[str], expected: str | None) -> None:
    assert opted_out(headers, DEFAULT, "imgdl") == expected


def test_nothing_is_refused_with_an_empty_list() -> None:
    assert opted_out(["noai"], frozenset(), "imgdl") is None


def test_opted_out_images_are_not_kept(server: DevServer, tmp_path: Path) -> None:
    urls = {
        "all": f"{server.url}/tagged/1?tag=noai",
        "ours": f"{server.url}/tagged/2?tag={quote('imgdl: noimageai')}",
        "theirs": f"{server.url}/tagged/4?tag={quote('otherbot: noai')}",
        "plain": f"{server.url}/tagged/5?tag=nofollow",
    }
    listing = write_list(tmp_path / "u.txt", list(urls.values()))
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out))
    assert result.returncode == 0, result.stderr  # opted out is a skip, not a failure
    by_url = {r["url"]: r for r in read_manifest(out)}
    assert (by_url[urls["all"]]["status"], by_url[urls["all"]]["reason"]) == (
        "skipped",
        "opted_out",
    )
    assert by_url[urls["ours"]]["reason"] == "opted_out"
    assert "imgdl: noimageai" in by_url[urls["ours"]]["error"]
    assert by_url[urls["theirs"]]["status"] == "saved"
    assert by_url[urls["plain"]]["status"] == "saved"
    assert len(image_files(out)) == 2
    assert (out / "failures.txt").read_text() == ""


def test_opt_out_list_is_configurable(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/tagged/1?tag=noai"])
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), env=clean_env(IMGDL_MANNERS_OPT_OUT="[]")
    )
    assert result.returncode == 0
    assert read_manifest(out)[0]["status"] == "saved"


def test_default_user_agent_is_honest(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/1.jpg"])
    assert run_cli("fetch", str(listing), "-o", str(tmp_path / "o")).returncode == 0
    (agent,) = server.user_agents
    assert agent.startswith(f"imgdl/{__version__} (+http")
    custom = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(tmp_path / "o2"),
        env=clean_env(IMGDL_HTTP_USER_AGENT="mybot/1 (+mailto:me@example.org)"),
    )
    assert custom.returncode == 0
    assert "mybot/1 (+mailto:me@example.org)" in server.user_agents
