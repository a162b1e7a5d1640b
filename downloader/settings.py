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
    format: Literal["auto", "txt", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = Field("url", min_length=1)
    name_column: str | None = None


class OutputSettings(_Section):
    dir: str = Field(
        "images",
        min_length=1,
        description="Where the images go: a local folder, or s3://BUCKET/PREFIX for an "
        "S3-compatible object store (pip install 'imgdl[s3]'; see the s3 section).",
    )
    name_template: str = "{url_hash:.3}/{url_hash}"


class S3Settings(_Section):
    """An s3:// output or input: the store's endpoint and region, where the records stay,
    how bodies go up. Credentials come from the standard AWS variables and files."""

    endpoint_url: str | None = Field(
        None,
        description="Endpoint of a non-AWS store (MinIO, Cloudflare R2, GCS interoperability, "
        "Ceph...), e.g. http://127.0.0.1:9000. null: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, "
        "else AWS itself. An http:// endpoint is allowed without TLS.",
    )
    region: str | None = Field(
        None,
        description="The bucket's region. null: AWS_REGION, AWS_DEFAULT_REGION, the AWS "
        "profile's region, else us-east-1.",
    )
    state_dir: Path | None = Field(
        None,
        description="Local folder for the records (manifest.jsonl, failures.txt, "
        "summary.json) and resume state of an s3:// output; they are uploaded to the prefix "
        "at the end of each run. null: ./imgdl-state/BUCKET/PREFIX.",
    )
    part_size: int = Field(
        8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        description="A body larger than this goes up as a multipart upload in parts of this "
        "size (the object appears only when its last part is in); a smaller one in one PUT. "
        "S3's smallest part is 5 MiB.",
    )
    no_clobber: bool = Field(
        True,
        description="Upload with If-None-Match: * so that an object already there is never "
        "replaced (two URLs given the same name: name_collision). Turn off for a store "
        "that refuses conditional writes (HTTP 501).",
    )
    retries: int = Field(
        3,
        ge=0,
        le=20,
        description="Retries of a failed request to the store (5xx, connection errors), with "
        "exponential backoff; a body whose upload still fails is upload_error.",
    )
    timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds for one request to the store, and for all the retries of one "
        "upload together.",
    )


class RunSettings(_Section):
    processes: int | None = Field(None, ge=1, le=512)
    shard_size: int = Field(1000, ge=1, le=1_000_000)
    shards_in_flight: int | None = Field(None, ge=1, le=10_000)
    shard_attempts: int = Field(2, ge=1, le=10)
    shard_linger: float = Field(2.0, gt=0)
    revalidate: bool = False
    grace_period: float = Field(20.0, ge=0)
    shard_index: int | None = Field(None, ge=0)
    shard_count: int | None = Field(None, ge=1, le=100_000)


class HttpSettings(_Section):
    concurrency: int = Field(64, ge=1, le=10_000)
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(30.0, gt=0)
    total_timeout: float = Field(120.0, gt=0)
    min_speed: int = Field(1024, ge=0)
    dns_cache_ttl: int = Field(300, ge=0)
    user_agent: str = Field(DEFAULT_USER_AGENT, min_length=1)
    max_redirects: int = Field(5, ge=0, le=100)


class NetworkSettings(_Section):
    allow: list[str] = Field(default_factory=list, max_length=1000)

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
    verify: bool = True
    ca_bundle: Path | None = None


class HostLimits(_Section):
    rate: float | None = Field(None, gt=0)
    connections: int | None = Field(None, ge=1, le=10_000)


class LimitsSettings(_Section):
    rate: float | None = Field(None, gt=0)
    per_host_rate: float | None = Field(None, gt=0)
    per_host_connections: int = Field(0, ge=0, le=10_000)
    burst: int = Field(1, ge=1, le=10_000)
    hosts: dict[str, HostLimits] = Field(default_factory=dict)

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
    attempts: int = Field(3, ge=1, le=100)
    backoff_base: float = Field(0.5, ge=0)
    backoff_max: float = Field(30.0, ge=0)
    retry_after_max: float = Field(120.0, ge=0)
    statuses: list[int] = Field(
        default_factory=lambda: [408, 425, 429, 500, 502, 503, 504], max_length=100
    )

    @pydantic.field_validator("statuses")
    @classmethod
    def _http_statuses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 100 <= s <= 599]
        if bad:
            raise ValueError(f"not HTTP status codes: {bad}")
        return value


class MannersSettings(_Section):
    opt_out: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        max_length=100,
    )
    robots_token: str = Field("imgdl", min_length=1)


class ValidateSettings(_Section):
    max_bytes: int = Field(50 * 1024 * 1024, ge=1)
    allow_svg: bool = False
    decode: bool = False
    max_pixels: int = Field(89_478_485, ge=1)
    min_width: int = Field(0, ge=0)
    min_height: int = Field(0, ge=0)
    max_width: int = Field(0, ge=0)
    max_height: int = Field(0, ge=0)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    progress: bool = True
    progress_interval: float = Field(10.0, gt=0)


class Settings(_Section):
    input: InputSettings = InputSettings()
    output: OutputSettings = OutputSettings()
    s3: S3Settings = S3Settings()
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
    from downloader.objstore import check_output
    from downloader.storage import check_template
    from downloader.tls import ssl_context

    checks = (
        ("output.dir", lambda: check_output(settings.output.dir)),
        ("output.name_template", lambda: check_template(settings.output.name_template)),
        ("tls.ca_bundle", lambda: ssl_context(settings.tls)),
    )
    for key, check in checks:
        try:
            check()
        except ConfigError as exc:
            source = layers.get(key, (None, "default"))[1]
            raise ConfigError(f"{key} (from {source}): {exc}") from None
