"""The container image, built and run for real (issue 7).

``scripts/build-image.sh`` builds the Dockerfile with podman on a local Debian base
(no registry can be pulled here); the tests run the image against a DevServer and an
OTLP receiver on this machine's loopback (``--network host``), with the YAML config
mounted at /config/imgdl.yaml and the output folder as the /data volume, locked down
as a job would be (read-only root, no capabilities, no new privileges). They are
skipped only where podman cannot run: not Linux, not root, or podman missing with no
apt-get to install it; a build that fails here is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader.devserver import DevServer
from tests.conftest import REPO, image_files, read_manifest, read_summary, wait_for, write_list
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a first build takes minutes

BUILD_SCRIPT = REPO / "scripts" / "build-image.sh"
#: The user the image runs as (the Dockerfile's USER).
UID = 10001
#: The exit code with which build-image.sh says this machine cannot build containers.
CANNOT_BUILD = 3


def _cannot_run_podman() -> str | None:
    if not sys.platform.startswith("linux"):
        return "containers need Linux"
    if os.geteuid() != 0:
        return "podman runs here as root with its default storage; the tests are not root"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "podman is not installed and there is no apt-get to install it"
    return None


def _run_flags() -> list[str]:
    """What podman needs on this kind of machine: runc (crun fails on its hybrid cgroup
    layout) and rlimits within the sandbox's hard limits (podman's defaults exceed them)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if hard == resource.RLIM_INFINITY else hard
    return [
        *("--runtime", "runc"),
        *("--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"),
    ]


def _podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def image() -> str:
    """The ID of the image built from this checkout."""
    reason = _cannot_run_podman()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=840,
        check=False,
    )
    if built.returncode == CANNOT_BUILD:
        pytest.skip(built.stderr.strip().splitlines()[-1])
    assert built.returncode == 0, built.stderr[-6000:]
    image_id = built.stdout.split()[-1]
    # shown with -rA / on failure: how long the build took (cached or not)
    print(f"image {image_id[:12]} built in {time.monotonic() - started:.1f} s")
    print("\n".join(line for line in built.stderr.splitlines() if "build-image:" in line))
    return image_id


@pytest.fixture
def container() -> Iterator[str]:
    """A unique container name, removed (killed if need be) at the end of the test."""
    name = f"imgdl-test-{uuid.uuid4().hex[:12]}"
    yield name
    _podman("rm", "--force", "--time", "0", name, timeout=60)


def _workdir(tmp_path: Path, urls: list[str], grace_period: float = 20) -> tuple[Path, Path]:
    """The /data volume (holding the URL list, writable for the image's user) and the
    YAML config to mount at /config/imgdl.yaml."""
    data = tmp_path / "data"
    data.mkdir()
    write_list(data / "urls.txt", urls)
    for path in (data, data / "urls.txt"):
        os.chown(path, UID, UID)
    config = tmp_path / "imgdl.yaml"
    config.write_text(
        "network:\n"
        "  allow: [127.0.0.0/8]\n"  # the DevServer and the receiver are on loopback
        "run:\n"
        "  processes: 2\n"
        "  shard_size: 20\n"
        f"  grace_period: {grace_period}\n"
        "http:\n"
        "  concurrency: 4\n",
        encoding="utf-8",
    )
    config.chmod(0o644)
    return data, config


def _run_args(name: str, data: Path, config: Path, receiver: OtlpReceiver) -> list[str]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "imgdl-container-test",
        # nothing leaves on a timer: what arrives came through imgdl's own flushes
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "OTEL_BLRP_SCHEDULE_DELAY": "60000",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    }
    args = ["run", "--name", name, *_run_flags(), "--network", "host"]
    args += ["--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges"]
    args += ["--volume", f"{data}:/data", "--volume", f"{config}:/config/imgdl.yaml:ro"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    return args


def _worker_pids(receiver: OtlpReceiver) -> set[object]:
    return {span.pid for span in receiver.spans() if span.role == "worker"}


def test_image_runs_a_fetch_as_a_non_root_user(
    image: str, server: DevServer, receiver: OtlpReceiver, container: str, tmp_path: Path
) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(60)]
    data, config = _workdir(tmp_path, urls)
    run = _podman(
        *_run_args(container, data, config, receiver),
        image,
        "fetch",
        "/data/urls.txt",
        "-o",
        "/data/out",
        "--log-level",
        "debug",  # the workers log each shard's start and end: their logs are exported
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = data / "out"
    records = read_manifest(out)
    assert sorted(r["line"] for r in records) == list(range(1, 61))
    assert {r["status"] for r in records} == {"saved"}
    assert read_summary(out)["exit_code"] == 0
    files = image_files(out)
    assert len(files) == 60
    # written by the image's user, not root, as the host sees it
    assert {f.stat().st_uid for f in [*files, out / "manifest.jsonl"]} == {UID}
    # the config came from the mount (IMGDL_CONFIG), not the image's default
    shown = _podman(
        "run",
        "--rm",
        *_run_flags(),
        *("--network", "none"),
        *("--volume", f"{config}:/config/imgdl.yaml:ro"),
        image,
        "config",
        "show",
    )
    assert shown.returncode == 0, shown.stderr
    allow = next(line for line in shown.stdout.splitlines() if line.startswith("network.allow"))
    assert "127.0.0.0/8" in allow and "config /config/imgdl.yaml" in allow, allow

    identity = _podman(
        "run", "--rm", *_run_flags(), "--network", "none", "--entrypoint", "id", image, "-u"
    )
    assert identity.returncode == 0, identity.stderr
    assert identity.stdout.strip() == str(UID)
    assert _podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == (
        f"{UID}:{UID}"
    )
    # the workers exported a span per URL through the collector on the host (one
    # worker may have done every shard: 60 fast URLs are over before a slow start)
    url_spans = [s for s in receiver.spans() if s.name == "GET"]
    assert len(url_spans) == 60
    assert {s.role for s in url_spans} == {"worker"}
    assert {r.role for r in receiver.logs()} == {"parent", "worker"}
    assert {p.role for p in receiver.points()} >= {"worker"}
    assert not receiver.errors, receiver.errors
    print(
        f"full run: received {len(receiver.logs())} logs, {len(receiver.spans())} spans, "
        f"{len(receiver.points())} metric points"
    )


def test_podman_stop_mid_run_exits_143_with_a_consistent_manifest(
    image: str, server: DevServer, receiver: OtlpReceiver, container: str, tmp_path: Path
) -> None:
    lines = 400
    urls = [f"{server.url}/slow/300/{n}" for n in range(lines)]  # 30 s at 2 x 4 in flight
    data, config = _workdir(tmp_path, urls, grace_period=5)
    started = _podman(
        *_run_args(container, data, config, receiver),
        "--detach",
        image,
        "fetch",
        "/data/urls.txt",
        "-o",
        "/data/out",
        "--log-level",
        "debug",
    )
    assert started.returncode == 0, started.stderr
    # both workers have finished a shard (each shard end flushes its telemetry)
    try:
        wait_for(lambda: len(_worker_pids(receiver)) == 2, timeout=60)
    except AssertionError:
        pytest.fail(f"no spans from two workers: {_podman('logs', container).stderr[-4000:]}")

    top = _podman("top", container, "pid", "user", "args")
    assert top.returncode == 0, top.stderr
    processes = [line.split(None, 2) for line in top.stdout.splitlines()[1:]]
    init = [args for pid, _, args in processes if pid == "1"]
    assert init and init[0].startswith("tini -- imgdl fetch"), top.stdout
    assert {user for _, user, _ in processes} == {"imgdl"}, top.stdout  # none is root
    assert len(processes) >= 4, top.stdout  # tini, imgdl, 2 workers (+ resource tracker)

    stopped_at = time.monotonic()
    stop = _podman("stop", "--time", "30", container, timeout=60)  # SIGTERM, SIGKILL at 30 s
    took = time.monotonic() - stopped_at
    assert stop.returncode == 0, stop.stderr
    state = _podman("inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}", container)
    logs = _podman("logs", container).stderr
    assert state.stdout.split() == ["143", "exited"], logs[-4000:]
    assert took < 20, took  # it stopped by itself (grace period 5 s), not by SIGKILL
    assert "Traceback" not in logs

    out = data / "out"
    text = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in text]  # every line one JSON object
    assert all(isinstance(r, dict) for r in records)
    assert 0 < len(records) < lines
    assert len({r["line"] for r in records}) == len(records)
    assert {r["reason"] for r in records} <= {None, "interrupted"}
    summary = read_summary(out)
    assert summary["exit_code"] == 143
    assert summary["lines"] == len(records) and summary["input_complete"] is False
    saved = [r for r in records if r["status"] == "saved"]
    assert len(image_files(out)) == len(saved) > 0
    assert not list(out.rglob("*.part"))

    # telemetry: every worker flushed its logs, spans and metrics before the exit
    assert not receiver.errors, receiver.errors
    logs_received = receiver.logs()
    worker_pids = {r.pid for r in logs_received if r.role == "worker"}
    assert len(worker_pids) == 2, worker_pids
    assert "signal received: finishing downloads in flight" in {r.body for r in logs_received}
    url_spans = [s for s in receiver.spans() if s.name == "GET"]
    assert {s.pid for s in url_spans} == worker_pids
    assert sum(1 for s in url_spans if s.attributes["imgdl.outcome.status"] == "saved") == len(
        saved
    )
    # the outcome counters (cumulative: the last point per process and attributes
    # counts) add up to the URL spans: nothing was cut off by the stop
    last = {
        (p.pid, repr(sorted(p.attributes.items()))): p.value
        for p in receiver.points()
        if p.metric == "imgdl.outcomes" and p.role == "worker"
    }
    assert {pid for pid, _ in last} == worker_pids
    assert sum(last.values()) == len(url_spans)
    print(
        f"stopped in {took:.1f} s; {len(records)} records, {len(saved)} saved; received "
        f"{len(logs_received)} logs, {len(receiver.spans())} spans, "
        f"{len(receiver.points())} metric points"
    )


def test_podman_stop_at_start_up_is_not_lost(
    image: str, server: DevServer, receiver: OtlpReceiver, container: str, tmp_path: Path
) -> None:
    """A SIGTERM before imgdl has set its handler: as PID 1 it would be dropped (the
    kernel ignores a signal that PID 1 does not handle) and the stop end in SIGKILL
    (137) after the timeout; under tini it ends imgdl at once with 143."""
    data, config = _workdir(tmp_path, [f"{server.url}/slow/300/{n}" for n in range(400)])
    started = _podman(
        *_run_args(container, data, config, receiver), "--detach", image, "fetch", "/data/urls.txt"
    )
    assert started.returncode == 0, started.stderr
    stopped_at = time.monotonic()
    stop = _podman("stop", "--time", "15", container, timeout=60)
    took = time.monotonic() - stopped_at
    assert stop.returncode == 0, stop.stderr
    state = _podman("inspect", "--format", "{{.State.ExitCode}}", container)
    assert state.stdout.strip() == "143", _podman("logs", container).stderr[-4000:]
    assert took < 10, took
