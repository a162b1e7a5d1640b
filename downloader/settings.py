"""Typed settings with explicit precedence: flags > ``IMGDL_*`` env > YAML > defaults.

We merge the layers ourselves (instead of pydantic-settings' sources) so that
every effective value remembers where it came from: ``imgdl config show``
prints that, and every error names the key and the layer that set it.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from downloader import __version__
from downloader.errors import ConfigError

ENV_PREFIX = "IMGDL_"
CONFIG_ENV = "IMGDL_CONFIG"
DEFAULT_USER_AGENT = f"imgdl/{__version__} (+https://github.com/imgdl/imgdl)"


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


class InputSettings(_Section):
    """The input lists: their format, and where in a line the URL and the name are."""

    format: Literal["auto", "txt", "csv", "tsv", "jsonl"] = Field(
        "auto",
        description="Format of the input lists: auto (from the file name, else sniffed from "
        "the first line), txt, csv, tsv or jsonl. gzip is detected from the bytes.",
    )
    url_column: str = Field(
        "url",
        min_length=1,
        description="CSV/TSV column, or JSON Lines key, that holds the URL.",
    )
    name_column: str | None = Field(
        None,
        description="CSV/TSV column, or JSON key, whose value names the saved file (a "
        "relative path without extension; the extension of the detected image type is "
        "added). null: names come from output.name_template.",
    )


class OutputSettings(_Section):
    """Where the images and the run's records go, and how the images are named."""

    dir: Path = Field(
        Path("images"),
        description="The output folder: images, manifest.jsonl, failures.txt, summary.json.",
    )
    name_template: str = Field(
        "{url_hash:.3}/{url_hash}",
        description="Name of each saved file, relative to output.dir, without extension. "
        "Fields: {url_hash} (128-bit hash of the URL, stable across runs), {host}, "
        "{basename} (last path segment of the URL, sanitised), {input} (input file name "
        "without suffixes), {line}. Python format specs apply: {url_hash:.3} is the first "
        "3 characters. The default fans files out into 4,096 folders.",
    )


class RunSettings(_Section):
    """How the work is cut into shards and spread over worker processes."""

    processes: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Worker processes. null: as many as the CPUs this process may use.",
    )
    shard_size: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="URLs per shard: the unit of work handed to a worker process.",
    )
    shards_in_flight: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Shards submitted at once; bounds the parent's memory. null: 2 x processes.",
    )
    shard_attempts: int = Field(
        2,
        ge=1,
        le=10,
        description="Attempts of a shard whose worker process died (SIGKILL, out of "
        "memory) before its unfinished URLs are recorded as worker_crashed.",
    )
    shard_linger: float = Field(
        2.0,
        gt=0,
        description="Seconds a partial shard waits for more lines before it goes out "
        "anyway, so a slow input (a pipe yielding a URL now and then) makes progress.",
    )
    revalidate: bool = Field(
        False,
        description="Ask servers again about images an earlier run saved, with the ETag / "
        "Last-Modified kept in the manifest: 304 keeps the file (not_modified), 200 "
        "replaces it. false: lines done earlier are not fetched again at all.",
    )
    grace_period: float = Field(
        20.0,
        ge=0,
        description="Seconds that downloads in flight may take to finish after SIGTERM/SIGINT.",
    )
    shard_index: int | None = Field(
        None,
        ge=0,
        description="This task's index (0..shard_count-1) when an orchestrator runs N "
        "tasks of one job: the task takes the lines whose URL hashes to its index, keeps "
        "its records in OUTDIR/tasks/task-IIIII-of-NNNNN/ (join them with imgdl merge "
        "OUTDIR), and takes 1/N of the limits. null: from JOB_COMPLETION_INDEX "
        "(Kubernetes; set IMGDL_RUN_SHARD_COUNT too), AWS_BATCH_JOB_ARRAY_INDEX or "
        "CLOUD_RUN_TASK_INDEX; none set: one task takes everything.",
    )
    shard_count: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="The number N of tasks that split the job (see shard_index). null: "
        "from AWS_BATCH_JOB_ARRAY_SIZE or CLOUD_RUN_TASK_COUNT.",
    )


class HttpSettings(_Section):
    """Requests: how many at once, how long they may take, what they say about us."""

    concurrency: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Downloads in flight per worker process (also its connection pool size).",
    )
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to open a connection.")
    read_timeout: float = Field(30.0, gt=0, description="Seconds to wait for each read.")
    total_timeout: float = Field(120.0, gt=0, description="Seconds for a whole request.")
    min_speed: int = Field(
        1024,
        ge=0,
        description="Slowest body accepted, in bytes per second, measured over each "
        "read_timeout window: a server dripping bytes cannot hold a connection for long. "
        "0: no floor.",
    )
    dns_cache_ttl: int = Field(
        300, ge=0, description="Seconds DNS answers are cached; 0 turns the cache off."
    )
    user_agent: str = Field(
        DEFAULT_USER_AGENT,
        min_length=1,
        description="User-Agent sent with every request: it names imgdl, its version and "
        "where to learn about it, so that site owners can tell who is fetching.",
    )
    max_redirects: int = Field(
        5,
        ge=0,
        le=100,
        description="Redirects followed per request; more is too_many_redirects. Every hop "
        "must be http or https and pass the network policy.",
    )


class NetworkSettings(_Section):
    """Which addresses imgdl may connect to."""

    allow: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="Networks imgdl may connect to although they are not public. By "
        "default every address that is not globally routable is refused "
        "(blocked_address): loopback, private ranges, link-local 169.254.0.0/16 where "
        "cloud metadata services hand out credentials, carrier-grade NAT, multicast, "
        "reserved; IPv4 and IPv6. A URL list is untrusted input: without this guard, one "
        "line (or one redirect) could make imgdl read a cloud account's secrets or an "
        "intranet page into the output. Example for a server on this machine: "
        '[127.0.0.0/8, "::1/128"].',
    )

    @pydantic.field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network: {network!r} ({exc})") from None
        return value


class TlsSettings(_Section):
    """Certificate checks of https URLs."""

    verify: bool = Field(
        True,
        description="Verify certificates (always, unless you set false: then imgdl warns "
        "at start).",
    )
    ca_bundle: Path | None = Field(
        None,
        description="Extra CA certificates to trust besides the system's: a PEM file or a "
        "folder prepared with c_rehash/openssl rehash. null: the system's only.",
    )


class HostLimits(_Section):
    """The limits of one host in ``limits.hosts``."""

    rate: float | None = Field(
        None, gt=0, description="Requests per second to this host. null: per_host_rate."
    )
    connections: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Connections open at once to this host. null: per_host_connections.",
    )


class LimitsSettings(_Section):
    """Every limit here holds for the whole run, across all worker processes (shared
    memory, see docs/architecture.md)."""

    rate: float | None = Field(
        None, gt=0, description="Requests per second for the whole run. null: no limit."
    )
    per_host_rate: float | None = Field(
        None, gt=0, description="Requests per second to each host. null: no limit."
    )
    per_host_connections: int = Field(
        0, ge=0, le=10_000, description="Connections open at once to each host; 0: no limit."
    )
    burst: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Requests that may go out back to back before the rates apply; "
        "1: evenly spaced.",
    )
    hosts: dict[str, HostLimits] = Field(
        default_factory=dict,
        description="Per-host overrides of per_host_rate / per_host_connections, by host "
        "name, e.g. {images.example.com: {rate: 2, connections: 4}}.",
    )

    @pydantic.field_validator("hosts")
    @classmethod
    def _bare_hosts(cls, value: dict[str, HostLimits]) -> dict[str, HostLimits]:
        for host in value:
            if "/" in host or (host.count(":") == 1) or not host.strip():
                raise ValueError(
                    f"{host!r} is not a host name: write it without scheme, port or path"
                )
        return {host.lower(): limits for host, limits in value.items()}


class RetrySettings(_Section):
    """Which failures are tried again, how often, and how long to wait in between."""

    attempts: int = Field(
        3, ge=1, le=100, description="Tries per URL, the first included; 1: never retry."
    )
    backoff_base: float = Field(
        0.5,
        ge=0,
        description="Wait before try n+1: uniform in [0, min(backoff_max, backoff_base * "
        '2^(n-1))] s ("full jitter"), raised to the server\'s Retry-After (seconds or '
        "HTTP date).",
    )
    backoff_max: float = Field(
        30.0, ge=0, description="Longest wait before a try, in seconds (see backoff_base)."
    )
    retry_after_max: float = Field(
        120.0,
        ge=0,
        description="Longest Retry-After honoured, in seconds; a longer one is cut to this.",
    )
    statuses: list[int] = Field(
        default_factory=lambda: [408, 425, 429, 500, 502, 503, 504],
        max_length=100,
        description="HTTP statuses that are retried; other 4xx/5xx fail at once. Timeouts, "
        "connection errors, truncated bodies and protocol errors are always retried.",
    )

    @pydantic.field_validator("statuses")
    @classmethod
    def _http_statuses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 100 <= s <= 599]
        if bad:
            raise ValueError(f"not HTTP status codes: {bad}")
        return value


class MannersSettings(_Section):
    """What site owners asked of robots, and our name when they ask us by name."""

    opt_out: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        max_length=100,
        description="X-Robots-Tag directives that opt an image out: an image whose "
        "response carries one (for all agents, or for robots_token) is not kept, reason "
        "opted_out. [] turns this off.",
    )
    robots_token: str = Field(
        "imgdl",
        min_length=1,
        description='Our name in agent-specific directives, e.g. "X-Robots-Tag: imgdl: noai".',
    )


class ValidateSettings(_Section):
    """What is kept: size caps, file types, and (with decode) pixel checks."""

    max_bytes: int = Field(
        50 * 1024 * 1024,
        ge=1,
        description="Largest image kept, in bytes (50 MiB); larger ones end as too_large, "
        "whether the server says so in Content-Length, sends more than it said, or sends "
        "a compressed body that inflates past it.",
    )
    allow_svg: bool = Field(
        False,
        description="Keep SVG files. Off: SVG can carry scripts, and is then not_an_image.",
    )
    decode: bool = Field(
        False,
        description="Decode every image fully with Pillow (pip install 'imgdl[decode]') "
        "before keeping it: decode_error for corrupt files. max_pixels and the width and "
        "height filters apply only with decode on.",
    )
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Most pixels (width x height) an image may have: decompression_bomb above.",
    )
    min_width: int = Field(
        0, ge=0, description="Smallest width kept, in pixels (too_small); 0: no limit."
    )
    min_height: int = Field(
        0, ge=0, description="Smallest height kept, in pixels (too_small); 0: no limit."
    )
    max_width: int = Field(
        0, ge=0, description="Largest width kept, in pixels (too_big); 0: no limit."
    )
    max_height: int = Field(
        0, ge=0, description="Largest height kept, in pixels (too_big); 0: no limit."
    )


class LogSettings(_Section):
    """The log lines on stderr, and the progress shown there."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning or error."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="auto (readable on a terminal, JSON lines otherwise), json or console.",
    )
    progress: bool = Field(
        True,
        description="Live progress on stderr (--quiet turns it off): a bar on a terminal "
        "(images/s, MB/s, failures by reason, ETA once the number of lines is known), "
        'else a JSON "progress" log line every progress_interval s.',
    )
    progress_interval: float = Field(
        10.0,
        gt=0,
        description="Seconds between two progress log lines when stderr is not a terminal.",
    )


class Settings(_Section):
    input: InputSettings = InputSettings()
    output: OutputSettings = OutputSettings()
    run: RunSettings = RunSettings()
    http: HttpSettings = HttpSettings()
    network: NetworkSettings = NetworkSettings()
    tls: TlsSettings = TlsSettings()
    limits: LimitsSettings = LimitsSettings()
    retry: RetrySettings = RetrySettings()
    manners: MannersSettings = MannersSettings()
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    log: LogSettings = LogSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def processes(self) -> int:
        if self.run.processes is not None:
            return self.run.processes
        return max(1, len(os.sched_getaffinity(0)))

    @property
    def shards_in_flight(self) -> int:
        return self.run.shards_in_flight or 2 * self.processes


def _sections() -> dict[str, type[_Section]]:
    out: dict[str, type[_Section]] = {}
    for name, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
        out[field.alias or name] = field.annotation
    return out


SECTIONS = _sections()
#: Every settable key, dotted: ``http.concurrency``.
KEYS: tuple[str, ...] = tuple(
    f"{s}.{k}" for s, model in SECTIONS.items() for k in model.model_fields
)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


_ENV_TO_KEY = {env_name(k): k for k in KEYS} | {
    ENV_PREFIX + k.replace(".", "__").upper(): k for k in KEYS
}


@dataclasses.dataclass(frozen=True)
class Effective:
    """The settings of a run and where each value came from."""

    settings: Settings
    sources: Mapping[str, str]

    def items(self) -> list[tuple[str, Any, str]]:
        dumped = self.settings.model_dump(by_alias=True, mode="json")
        return [
            (key, dumped[key.split(".")[0]][key.split(".")[1]], self.sources.get(key, "default"))
            for key in KEYS
        ]


def _suggest(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown section '{section}'{_suggest(str(section), SECTIONS)}"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config file {path}: section '{section}' must be a mapping")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if dotted not in KEYS:
                raise ConfigError(
                    f"config file {path}: unknown key '{dotted}'{_suggest(dotted, KEYS)}"
                )
            flat[dotted] = value
    return flat


def _is_plain_str(key: str) -> bool:
    section, name = key.split(".")
    annotation = SECTIONS[section].model_fields[name].annotation
    if annotation is str:
        return True
    if isinstance(annotation, types.UnionType):
        return set(typing.get_args(annotation)) == {str, type(None)}
    return False


def _is_list(key: str) -> bool:
    section, name = key.split(".")
    return typing.get_origin(SECTIONS[section].model_fields[name].annotation) is list


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = _ENV_TO_KEY.get(name)
        if key is None:
            raise ConfigError(f"unknown environment variable {name}{_suggest(name, _ENV_TO_KEY)}")
        if _is_plain_str(key):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
            if _is_list(key) and isinstance(value, str):  # a,b,c is a list too
                value = [item.strip() for item in value.split(",") if item.strip()]
        out[key] = (value, f"env {name}")
    return out


def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
) -> Effective:
    """Build the effective settings.

    ``overrides`` maps dotted keys to ``(value, source)``, e.g.
    ``{"http.concurrency": (64, "flag --concurrency")}``.
    """
    env = os.environ if env is None else env
    layers: dict[str, tuple[Any, str]] = {}
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    if config_file is not None:
        for key, value in _read_yaml(config_file).items():
            layers[key] = (value, f"config {config_file}")
    layers.update(_read_env(env))
    for key, item in (overrides or {}).items():
        if key not in KEYS:
            raise ConfigError(f"unknown setting '{key}'{_suggest(key, KEYS)}")
        layers[key] = item

    nested: dict[str, dict[str, Any]] = {}
    for key, (value, _) in layers.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    try:
        settings = Settings.model_validate(nested)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc[:2])
        source = layers.get(key, (None, "default"))[1]
        where = ".".join(loc)
        if err["type"] == "extra_forbidden" and len(loc) > 2:
            known = _nested_fields(loc)
            msg = f"unknown key '{loc[-1]}'{_suggest(loc[-1], known)}"
        else:
            msg = err["msg"]
        raise ConfigError(f"{where} (from {source}): {msg}") from None
    _check_consistency(settings, layers)
    return Effective(settings=settings, sources={k: src for k, (_, src) in layers.items()})


def _nested_fields(loc: list[str]) -> list[str]:
    """The keys allowed where a nested value (like a limits.hosts entry) had an extra one."""
    if loc[:2] == ["limits", "hosts"]:
        return list(HostLimits.model_fields)
    return []


def _check_consistency(settings: Settings, layers: Mapping[str, tuple[Any, str]]) -> None:
    # Imported here: storage depends on settings' types only through plain values.
    from downloader.storage import check_template
    from downloader.tls import ssl_context

    checks = (
        ("output.name_template", lambda: check_template(settings.output.name_template)),
        ("tls.ca_bundle", lambda: ssl_context(settings.tls)),
    )
    for key, check in checks:
        try:
            check()
        except ConfigError as exc:
            source = layers.get(key, (None, "default"))[1]
            raise ConfigError(f"{key} (from {source}): {exc}") from None
