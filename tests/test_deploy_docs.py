"""The deployment examples in docs/deploy/ stay valid: each parses, its imgdl command
line parses with imgdl's own CLI, its config passes ``imgdl config validate``, and the
number of tasks it tells imgdl equals the number the orchestrator starts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from downloader.cli import cli
from tests.conftest import REPO, run_cli

DEPLOY = REPO / "docs" / "deploy"
#: the Dockerfile's user: the manifests run as it
IMAGE_UID = int(re.search(r"useradd --uid (\d+)", (REPO / "Dockerfile").read_text())[1])  # type: ignore[index]


def _imgdl_args_parse(args: list[str]) -> None:
    """The arguments after the image parse as an imgdl command line (unknown flags,
    a missing value or a wrong type would fail here as they would in the container)."""
    command = cli.commands[args[0]]
    if isinstance(command, click.Group):
        command = command.commands[args[1]]
        args = args[1:]
    with command.make_context(args[0], list(args[1:])) as ctx:
        assert ctx.params


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _config_is_valid(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "imgdl.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("config", "validate", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def test_kubernetes_indexed_job(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes-indexed-job.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in documents}
    assert set(by_kind) == {"ConfigMap", "Secret", "Job"}
    job = by_kind["Job"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["backoffLimitPerIndex"] >= 1
    fail_index = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail_index[0]["onExitCodes"]["values"] == [2]  # a config error: no retry
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert int(env["IMGDL_RUN_SHARD_COUNT"]) == job["completions"]
    assert env["IMGDL_CONFIG"] == "/config/imgdl.yaml"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["envFrom"][0]["secretRef"]["name"] == by_kind["Secret"]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/config"
    assert volumes["config"]["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    config = _config_is_valid(tmp_path, by_kind["ConfigMap"]["data"]["imgdl.yaml"])
    assert pod["terminationGracePeriodSeconds"] > config["run"]["grace_period"]
    # the records' folder is a writable volume, the root file system read-only
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(config["s3"]["state_dir"].startswith(path) for path in mounts.values())
    _imgdl_args_parse(container["args"])


def test_aws_batch_array_job() -> None:
    definition = json.loads((DEPLOY / "aws-batch-job-definition.json").read_text())
    submit = json.loads((DEPLOY / "aws-batch-submit-job.json").read_text())
    assert submit["jobDefinition"] == definition["jobDefinitionName"]
    properties = definition["containerProperties"]
    env = {e["name"]: e["value"] for e in properties["environment"]}
    assert int(env["AWS_BATCH_JOB_ARRAY_SIZE"]) == submit["arrayProperties"]["size"]
    assert {r["type"] for r in properties["resourceRequirements"]} == {"VCPU", "MEMORY"}
    no_retry = {
        r["onExitCode"]
        for r in definition["retryStrategy"]["evaluateOnExit"]
        if r.get("onExitCode") and r["action"] == "EXIT"
    }
    assert "2" in no_retry
    _imgdl_args_parse(properties["command"])


def _shell_commands(markdown: str) -> list[list[str]]:
    """Each command of the ```sh blocks of a markdown text, continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_cloud_run_job() -> None:
    commands = _shell_commands((DEPLOY / "README.md").read_text())
    (create,) = [c for c in commands if c[:4] == ["gcloud", "run", "jobs", "create"]]
    options = dict(zip(create[5::2], create[6::2], strict=False))
    assert int(options["--tasks"]) >= 2
    env = dict(item.split("=", 1) for item in options["--set-env-vars"].split(","))
    assert env["AWS_ENDPOINT_URL"] == "https://storage.googleapis.com"
    args = options["--args"].split(",")
    _imgdl_args_parse(args)
    assert "--shard-count" not in args  # Cloud Run sets CLOUD_RUN_TASK_COUNT itself


@pytest.mark.parametrize("tool", ["podman"])
def test_container_run_examples_parse(tool: str) -> None:
    runs = [
        c for c in _shell_commands((DEPLOY / "README.md").read_text()) if c[:2] == [tool, "run"]
    ]
    assert len(runs) >= 3
    for words in runs:
        image = next(i for i, w in enumerate(words) if w.startswith("localhost/imgdl"))
        _imgdl_args_parse(words[image + 1 :])


def test_every_file_in_docs_deploy_is_linked_from_its_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.iterdir():
        if path.name != "README.md":
            assert f"]({path.name})" in readme, path.name
