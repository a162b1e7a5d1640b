"""Settings: precedence, clear errors, the documented default file, ``config show``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from downloader import settings as settings_mod
from downloader.devserver import DevServer
from downloader.errors import ConfigError
from tests.conftest import REPO, clean_env, read_manifest, run_cli, write_list


def _show(*args: str, env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    result = run_cli("config", "show", *args, env=env)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        key, rest = line.split(None, 1)
        value, source = rest.rsplit("# ", 1)
        rows[key] = (value.strip(), source.strip())
    return rows


def test_precedence_flag_over_env_over_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("http:\n  concurrency: 11\nlimits:\n  rate: 5\nrun:\n  shard_size: 77\n")
    env = clean_env(IMGDL_HTTP_CONCURRENCY="22", IMGDL_RUN_SHARD_SIZE="88")
    rows = _show("--config", str(config), "--concurrency", "33", env=env)
    assert rows["http.concurrency"] == ("33", "flag --concurrency")
    assert rows["run.shard_size"] == ("88", "env IMGDL_RUN_SHARD_SIZE")
    assert rows["limits.rate"] == ("5.0", f"config {config}")
    assert rows["http.read_timeout"] == ("30.0", "default")
    # IMGDL_CONFIG names the file when --config is absent.
    rows = _show(env=clean_env(IMGDL_CONFIG=str(config)))
    assert rows["http.concurrency"] == ("11", f"config {config}")


def test_precedence_holds_in_a_real_run(server: DevServer, tmp_path: Path) -> None:
    """output.dir from YAML, overridden by env, overridden by the flag."""
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/0.jpg"])
    config = tmp_path / "c.yaml"
    config.write_text(f"output:\n  dir: {tmp_path / 'from-yaml'}\n")
    env = clean_env(IMGDL_OUTPUT_DIR=str(tmp_path / "from-env"))
    result = run_cli("fetch", str(listing), "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(tmp_path / "from-env")) == 1
    assert not (tmp_path / "from-yaml").exists()
    result = run_cli(
        "fetch", str(listing), "--config", str(config), "-o", str(tmp_path / "from-flag"), env=env
    )
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(tmp_path / "from-flag")) == 1


def test_unknown_config_key_names_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("http:\n  concurency: 10\n")
    result = run_cli("fetch", "-", "--config", str(config), stdin=b"")
    assert result.returncode == 2
    assert "http.concurency" in result.stderr
    assert str(config) in result.stderr
    assert "did you mean 'http.concurrency'" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nosuch:\n  a: 1\n", "bad.yaml:1: nosuch: unknown section"),
        ("http:\n  concurrency: lots\n", "http.concurrency"),
        ("http:\n  concurrency: 0\n", "greater than or equal to 1"),
        ("http: [1, 2]\n", "must be a mapping"),
        ("http:\n  concurrency: [\n", "line"),
        ("- a\n- b\n", "top level"),
        ("output:\n  name_template: '../{url_hash}'\n", "output.name_template"),
        ("output:\n  name_template: '{nope}'\n", "unknown field"),
        ("output:\n  name_template: '{url_hash!r}'\n", "conversions"),
        ("limits:\n  hosts:\n    'a.example:8080': {rate: 1}\n", "without scheme, port"),
        (
            "limits:\n  hosts:\n    a.example: {rate: 1, conections: 2}\n",
            "bad.yaml:3: limits.hosts.a.example.conections: .*did you mean 'connections'",
        ),
        ("run:\n  shard_index: 5\n  shard_count: 2\n", "shard_index 5 is not below 2"),
    ],
)
def test_bad_config_values_are_named(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        settings_mod.load(config_file=config, env={})


def test_bad_env_value_and_unknown_env_name(tmp_path: Path) -> None:
    result = run_cli("config", "show", env=clean_env(IMGDL_LIMITS_RATE="fast"))
    assert result.returncode == 2
    assert "limits.rate (from env IMGDL_LIMITS_RATE)" in result.stderr
    result = run_cli("config", "show", env=clean_env(IMGDL_HTTP_CONCURENCY="3"))
    assert result.returncode == 2
    assert "IMGDL_HTTP_CONCURENCY" in result.stderr and "IMGDL_HTTP_CONCURRENCY" in result.stderr


def test_one_network_without_brackets_is_a_list_of_one(tmp_path: Path) -> None:
    config = tmp_path / "one.yaml"
    config.write_text("network:\n  allow: 127.0.0.0/8\n")
    assert settings_mod.load(config_file=config, env={}).settings.network.allow == ["127.0.0.0/8"]


def test_list_settings_from_env_take_commas() -> None:
    rows = _show(env=clean_env(IMGDL_NETWORK_ALLOW="10.0.0.0/8, 127.0.0.0/8"))
    assert rows["network.allow"][0] == "['10.0.0.0/8', '127.0.0.0/8']"


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = run_cli("config", "show", "--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr


def test_bad_flag_is_exit_2() -> None:
    result = run_cli("fetch", "-", "--concurrency", "zero", stdin=b"")
    assert result.returncode == 2
    assert "--concurrency" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    missing = run_cli("fetch")
    assert missing.returncode == 2
    assert missing.stderr.startswith("imgdl: error: Missing argument")


def test_documented_default_file_matches_the_defaults() -> None:
    path = REPO / "config" / "imgdl.yaml"
    documented = settings_mod.load(config_file=path, env={})
    assert documented.settings == settings_mod.Settings()
    data = yaml.safe_load(path.read_text())
    keys = {f"{section}.{key}" for section, body in data.items() for key in body}
    assert keys == set(settings_mod.KEYS)
    # Every key has a comment right above it (its documentation).
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            above = lines[i - 1].strip()
            assert above.startswith("#") or (lines[i - 1].startswith("  ") and ":" in above), line


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and "imgdl, version" in version.stdout
    help_ = run_cli("fetch", "--help")
    assert help_.returncode == 0
    for code in ("0 ", "1 ", "2 ", "130", "143"):
        assert code in help_.stdout
