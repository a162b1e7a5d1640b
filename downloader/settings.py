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
from typing import TYPE_CHECKING, Any, Literal

import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from downloader import __version__
from downloader.errors import ConfigError

if TYPE_CHECKING:
    import yaml

ENV_PREFIX = "IMGDL_"
CONFIG_ENV = "IMGDL_CONFIG"
DEFAULT_USER_AGENT = f"imgdl/{__version__} (+https://github.com/imgdl/imgdl)"


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False, defer_build=True
    )


class InputSettings(_Section):
    """The input lists: their format, where in a line the URL and the name are, the
    columns carried into the manifest and the expected hash of each image."""

    format: Literal["auto", "txt", "csv", "tsv", "jsonl", "parquet"] = Field(
        "auto",
        description="Format of the input lists: auto (from the file name, else sniffed from "
        "the first bytes), txt, csv, tsv, jsonl or parquet (pip install 'imgdl[dataset]'; "
        "a local file, read one row group at a time). gzip is detected from the bytes "
        "(not for parquet, which compresses itself).",
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
    extra_columns: list[str] = Field(
        [],
        max_length=100,
        description="Columns (CSV/TSV/parquet) or keys (JSON Lines) carried into each line's "
        'manifest record as "extra": {column: value}, e.g. [caption, id, license]. A '
        "CSV/TSV/parquet input without one of them stops the run at start (exit 2); a "
        "missing or empty value is null; JSON and parquet values keep their types.",
    )
    hash_column: str | None = Field(
        None,
        description="Column or key holding the expected hash of each image: sha256 or md5 "
        "as hex, optionally prefixed sha256: or md5:. The body is checked against it; a "
        "mismatch is hash_mismatch and nothing is saved. An empty value: not checked. "
        "null: no check.",
    )
    hash_algorithm: Literal["auto", "sha256", "md5"] = Field(
        "auto",
        description="Algorithm of input.hash_column values without a prefix: auto (64 hex "
        "digits are sha256, 32 are md5), sha256 or md5.",
    )

    @pydantic.field_validator("extra_columns", mode="before")
    @classmethod
    def _column_list(cls, value: Any) -> Any:
        """``extra_columns: caption,id`` (as IMGDL_INPUT_EXTRA_COLUMNS is written) as a list."""
        return (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        )

    @pydantic.field_validator("extra_columns")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("a column name cannot be empty")
        twice = sorted({v for v in value if value.count(v) > 1})
        if twice:
            raise ValueError(f"column named twice: {', '.join(twice)}")
        return value


class OutputSettings(_Section):
    """Where the images and the run's records go, and how the images are named."""

    dir: str = Field(
        "images",
        min_length=1,
        description="Where the images go: a local folder (with manifest.jsonl, failures.txt, "
        "summary.json), or s3://BUCKET/PREFIX for an S3-compatible object store (pip "
        "install 'imgdl[s3]'; see the s3 section).",
    )
    name_template: str = Field(
        "{url_hash:.3}/{url_hash}",
        description="Name of each saved file, relative to output.dir, without extension. "
        "Fields: {url_hash} (128-bit hash of the URL, stable across runs), {host}, "
        "{basename} (last path segment of the URL, sanitised), {input} (input file name "
        "without suffixes), {line}. Python format specs apply: {url_hash:.3} is the first "
        "3 characters. The default fans files out into 4,096 folders.",
    )
    format: Literal["files", "webdataset", "parquet"] = Field(
        "files",
        description="How the images are written. files: one file per image (named by "
        "name_template). webdataset: tar shards 00000.tar, 00001.tar... of shard_samples "
        "samples each (KEY.jpg/.png/... and KEY.json, the manifest record; KEY is the URL "
        "hash), each with 00000.parquet beside it holding the shard's metadata. parquet: "
        "shards 00000.parquet... holding the metadata and the image bytes (column image). "
        "A shard appears only when complete. Needs pip install 'imgdl[dataset]'; a local "
        "output folder; the default name_template and no input.name_column.",
    )
    shard_samples: int = Field(
        10000,
        ge=1,
        le=10_000_000,
        description="Samples (saved images) per shard of the webdataset and parquet formats; "
        "the last shard of a job holds the rest.",
    )


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

    @pydantic.field_validator("shard_count")
    @classmethod
    def _index_below_count(cls, count: int | None, info: pydantic.ValidationInfo) -> int | None:
        """Both set (in one file, or by flags): the index must be one of the N tasks."""
        index = info.data.get("shard_index")
        if count is not None and index is not None and index >= count:
            raise ValueError(
                f"shard_index {index} is not below {count}: the index counts from 0 to {count - 1}"
            )
        return count


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
    client: Literal["builtin", "aiohttp"] = Field(
        "builtin",
        description="The HTTP client of direct requests. builtin: imgdl's own HTTP/1.1 client "
        "(keep-alive pool, the llhttp parser), which costs less than half of aiohttp's CPU "
        "per request and keeps no cookie a server sets; aiohttp: aiohttp's ClientSession "
        "(keeps server-set cookies of host names), as for requests through a proxy, which "
        "always use it. Both give every failure the same reason.",
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
    proxy: str | None = Field(
        None,
        description="Proxy for every URL: http://[user:password@]host:port (https URLs "
        "go through it with CONNECT), or a SOCKS5 proxy, socks5:// (imgdl resolves the "
        "target) or socks5h:// (the proxy does), which needs pip install 'imgdl[socks]'. "
        "null: like curl, from http_proxy / https_proxy / "
        "all_proxy (or HTTP_PROXY, ...) in the environment; an empty string: no proxy, "
        "whatever the environment says. The proxy's own address must pass the policy "
        "above (a proxy on 10.1.2.3 needs allow: [10.1.2.3/32]); target hosts are "
        "resolved and checked here before their request goes to the proxy. The password "
        "is shown as *** everywhere.",
    )
    no_proxy: list[str] | None = Field(
        None,
        max_length=1000,
        description="Hosts reached directly, not through the proxy: * (all), a domain "
        "(and its subdomains), an IP address or a CIDR network, each optionally with "
        ":port. null: from no_proxy / NO_PROXY in the environment.",
    )

    @pydantic.field_validator("no_proxy", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """``no_proxy: "localhost,.internal"`` (as NO_PROXY is written) as a list."""
        return [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @pydantic.field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            from downloader.proxy import Proxy

            Proxy.parse(value)
        return value

    @pydantic.field_validator("allow", mode="before")
    @classmethod
    def _one_network(cls, value: Any) -> Any:
        """``allow: 127.0.0.0/8`` (one network, without brackets) as a list of one."""
        return [value] if isinstance(value, str) else value

    @pydantic.field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"not a network: {network!r} ({exc}); write an address or a network "
                    "such as 10.0.0.0/8 or ::1/128"
                ) from None
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
        "folder prepared with c_rehash/openssl rehash. null: the system's only. The "
        "system's trust store is OpenSSL's: SSL_CERT_FILE and SSL_CERT_DIR, when set, "
        "replace it, as for curl.",
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


#: Headers a rule may not set: credentials and cookies have keys of their own
#: (auth, cookies_file), so that they are read from outside the file and kept to their host.
_RESERVED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "host"})
#: Keys that would put a secret in the config file itself.
_LITERAL_SECRETS = {"token": "token_env or token_file", "password": "password_env or password_file"}


class HostAuth(_Section):
    """The credentials of a host rule: read from an environment variable or a file."""

    type: Literal["bearer", "basic"] = Field(
        description="bearer (Authorization: Bearer TOKEN) or basic (user name and password)."
    )
    token_env: str | None = Field(
        None, min_length=1, description="bearer: the environment variable that holds the token."
    )
    token_file: Path | None = Field(
        None, description="bearer: a file that holds the token (surrounding blanks dropped)."
    )
    username: str | None = Field(None, min_length=1, description="basic: the user name.")
    password_env: str | None = Field(
        None, min_length=1, description="basic: the environment variable that holds the password."
    )
    password_file: Path | None = Field(
        None, description="basic: a file that holds the password (surrounding blanks dropped)."
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_literal_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, instead in _LITERAL_SECRETS.items():
                if key in data:
                    raise ValueError(
                        f"auth.{key}: a secret is never written in the config file; use "
                        f"{instead} (the name of an environment variable, or the path of a "
                        "file that holds it)"
                    )
        return data

    @pydantic.field_validator("token_env", "password_env")
    @classmethod
    def _not_a_setting(cls, name: str | None) -> str | None:
        if name is not None and name.startswith(ENV_PREFIX):
            raise ValueError(
                f"{name}: imgdl reads every {ENV_PREFIX}* variable as a setting; give the "
                "secret's variable another name (e.g. EXAMPLE_TOKEN)"
            )
        return name

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> HostAuth:
        if self.type == "bearer":
            if (self.token_env is None) == (self.token_file is None):
                raise ValueError("auth of type bearer needs one of token_env or token_file")
            if self.username or self.password_env or self.password_file:
                raise ValueError("auth of type bearer takes token_env or token_file only")
        else:
            if not self.username:
                raise ValueError("auth of type basic needs username")
            if (self.password_env is None) == (self.password_file is None):
                raise ValueError("auth of type basic needs one of password_env or password_file")
            if self.token_env or self.token_file:
                raise ValueError("auth of type basic takes username and password_env/_file")
        return self


class HostRule(_Section):
    """One entry of ``hosts.rules``."""

    match: str = Field(
        min_length=1,
        description="The host this rule is for: a name (images.example.com) or address, "
        "or *.example.com for every host below example.com (not example.com itself).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers (not Authorization, Cookie or Host: see auth "
        "and cookies_file). config show prints their values as ***.",
    )
    referer: str | None = Field(None, description="The Referer header sent to this host.")
    cookies_file: Path | None = Field(
        None,
        description="A cookies.txt in the Netscape format that curl and browsers export; "
        "each request carries the cookies whose domain, path, secure flag and expiry fit it.",
    )
    auth: HostAuth | None = Field(
        None,
        description="Credentials: {type: bearer, token_env: NAME | token_file: PATH} or "
        "{type: basic, username: U, password_env: NAME | password_file: PATH}.",
    )

    @pydantic.field_validator("match")
    @classmethod
    def _host_pattern(cls, value: str) -> str:
        bare = value.removeprefix("*.")
        if "/" in value or "*" in bare or value.count(":") == 1 or not bare.strip():
            raise ValueError(
                f"{value!r} is not a host: write a host name without scheme, port or path, "
                "or *.example.com for every host below example.com"
            )
        return value.lower()

    @pydantic.field_validator("headers")
    @classmethod
    def _allowed_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if any(c in name + text for c in "\r\n\0"):  # the value is not quoted back
                raise ValueError(f"header {name}: a name or value may not break the line")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(
                    f"header {name} is not set in headers: credentials go in auth (from an "
                    "environment variable or a file), cookies in cookies_file"
                )
        return value


class HostsSettings(_Section):
    """Headers, cookies and credentials sent to particular hosts, and only to them."""

    rules: list[HostRule] = Field(
        default_factory=list,
        max_length=1000,
        description="Rules by host: each request (and each redirect hop) gets the headers, "
        "Referer, cookies and credentials of the one rule that matches its host best (an "
        "exact name before *.sub.example.com before *.example.com); a host no rule "
        "matches gets none. Secrets are read from environment variables or files, never "
        "written here. e.g. [{match: '*.example.com', auth: {type: bearer, token_env: "
        "EXAMPLE_TOKEN}, cookies_file: cookies.txt, referer: 'https://example.com/'}].",
    )

    @pydantic.field_validator("rules")
    @classmethod
    def _one_rule_per_host(cls, value: list[HostRule]) -> list[HostRule]:
        seen = [rule.match for rule in value]
        twice = sorted({m for m in seen if seen.count(m) > 1})
        if twice:
            raise ValueError(f"more than one rule for {', '.join(twice)}: merge them into one")
        return value


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
            raise ValueError(f"not HTTP status codes: {bad} (a status is 100 to 599)")
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


class ImageSettings(_Section):
    """Resize and re-encode each image before it is stored (off by default)."""

    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = Field(
        "no",
        description="img2dataset's modes: no (keep the pixels), keep_ratio (smaller side "
        "to image.size), center_crop (smaller side to image.size, then the middle square), "
        "border (larger side to image.size, then padded white to a square). Smaller images "
        "are enlarged too, as img2dataset does. Needs Pillow (pip install 'imgdl[dataset]').",
    )
    size: int = Field(
        256,
        ge=1,
        le=16384,
        description="Target size in pixels of image.resize_mode (no effect while it is no: "
        "a run says so).",
    )
    format: Literal["keep", "jpeg", "webp", "png"] = Field(
        "keep",
        description="Format the stored image is encoded in: keep (the original bytes when "
        "resize_mode is no; else the original's format if JPEG, WebP or PNG, otherwise "
        "JPEG), jpeg, webp or png. Anything but keep re-encodes every image.",
    )
    quality: int = Field(
        95, ge=1, le=100, description="JPEG and WebP quality of a re-encoded image (1-100)."
    )
    workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads per worker process that decode, resize, encode and hash "
        "images, off the event loop so that downloads keep flowing (Pillow releases the "
        "GIL while it works).",
    )


class DedupeSettings(_Section):
    """Content dedupe: the same image under another URL is stored once."""

    content: Literal["off", "exact", "perceptual"] = Field(
        "off",
        description="off; exact (a body whose sha256 was stored before, in this run or an "
        "earlier one in this output folder, is duplicate_content pointing at the first "
        "file); perceptual (also images whose 64-bit pHash is within dedupe.max_distance "
        "of a stored one: resized or re-encoded copies; decodes every image, needs Pillow).",
    )
    max_distance: int = Field(
        4,
        ge=0,
        le=16,
        description="perceptual: the largest Hamming distance between two pHashes that "
        "counts as the same image. Larger catches more edits, but also more distinct "
        "look-alikes, and each lookup reads more candidates.",
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
    input: InputSettings = Field(default_factory=InputSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    run: RunSettings = Field(default_factory=RunSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    hosts: HostsSettings = Field(default_factory=HostsSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    manners: MannersSettings = Field(default_factory=MannersSettings)
    validate_: ValidateSettings = Field(default_factory=ValidateSettings, alias="validate")
    image: ImageSettings = Field(default_factory=ImageSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    log: LogSettings = Field(default_factory=LogSettings)

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


_TYPE_WORDS: dict[Any, str] = {
    int: "integer",
    float: "number",
    bool: "true or false",
    str: "text",
    Path: "path",
}


def _type_words(annotation: Any) -> str:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if isinstance(annotation, types.UnionType):
        return " or ".join(_type_words(a) for a in args if a is not type(None)) + " or null"
    if origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return f"list of {{{', '.join(args[0].model_fields)}}}"
    if origin is list:
        item = _type_words(args[0])
        return f"list of {item if item == 'text' else item + 's'}"
    if origin is dict and issubclass(args[1], BaseModel):
        return f"mapping of host name to {{{', '.join(args[1].model_fields)}}}"
    return _TYPE_WORDS.get(annotation, str(annotation))


_SIDES = (("ge", ">="), ("gt", ">"), ("le", "<="))


def _bounds(metadata: list[Any]) -> str:
    found = {
        attr: getattr(item, attr)
        for item in metadata
        for attr in ("ge", "gt", "le", "min_length", "max_length")
        if getattr(item, attr, None) is not None
    }
    words = []
    if "ge" in found and "le" in found:
        words.append(f"{found['ge']} to {found['le']}")
    else:
        sides = [f"{op} {found[attr]}" for attr, op in _SIDES if attr in found]
        if sides:
            words.append(" and ".join(sides))
    if found.get("min_length") == 1:
        words.append("not empty")
    if "max_length" in found:
        words.append(f"at most {found['max_length']} items")
    return ", ".join(words)


def describe(field: FieldInfo) -> tuple[str, str]:
    """A setting's type and allowed values in words: ``("integer", "1 to 10000")``.

    Both the reference (docs/configuration.md) and the message about a bad value
    say this, read from the model's own constraints so that neither can be wrong.
    """
    return _type_words(field.annotation), _bounds(field.metadata)


def default_of(model: type[_Section], name: str) -> Any:
    """A field's default as plain data (what YAML would hold)."""
    return model().model_dump(mode="json")[name]


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML, quoted only where YAML needs it."""
    import yaml  # here, not at the top: a worker never reads YAML (15 ms of its start)

    text: str = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
    return text.removesuffix("...\n").strip()


@dataclasses.dataclass(frozen=True)
class Effective:
    """The settings of a run and where each value came from."""

    settings: Settings
    sources: Mapping[str, str]

    def items(self) -> list[tuple[str, Any, str]]:
        dumped = self.settings.model_dump(by_alias=True, mode="json")
        if dumped["network"]["proxy"]:
            from downloader.proxy import redact

            dumped["network"]["proxy"] = redact(dumped["network"]["proxy"])
        return [
            (key, dumped[key.split(".")[0]][key.split(".")[1]], self.sources.get(key, "default"))
            for key in KEYS
        ]


def _suggest(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(name: str, known: typing.Sequence[str], tail: str) -> str:
    """``unknown key (did you mean 'x'? TAIL)``: the likely fix, then where to look."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key ({hint}{tail})"


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the settings, said so that the reader knows what to change.

    Problems order by their line in the config file, so ``config validate`` lists
    them top down.
    """

    line: int  # in the config file, from 1; 0: not from a file, or no line known
    key: str  # dotted: "http.concurrency", "limits.hosts.a.example.rate"; "" for the file
    message: str  # what is wrong, then how to fix it
    source: str = dataclasses.field(default="default", compare=False)
    file: Path | None = dataclasses.field(default=None, compare=False)

    def __str__(self) -> str:
        """``FILE:LINE: KEY: message`` for a config file (the form editors jump to),
        ``KEY (from SOURCE): message`` for the environment and flags."""
        if self.file is None:
            return f"{self.key} (from {self.source}): {self.message}"
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


_MAX_DEPTH = 5  # limits.hosts.<host>.<key> is the deepest key; aliases may nest forever


def _key_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """The line of every key (and list item) of a YAML document, by its path."""
    import yaml  # here, not at the top: a worker never reads YAML (15 ms of its start)

    lines: dict[tuple[str, ...], int] = {}
    if len(prefix) >= _MAX_DEPTH:
        return lines
    if isinstance(node, yaml.MappingNode):
        items = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
        children = [((*prefix, str(k.value)), k, v) for k, v in items]
    elif isinstance(node, yaml.SequenceNode):
        children = [((*prefix, str(i)), item, item) for i, item in enumerate(node.value)]
    else:
        return lines
    for path, mark_node, value in children:  # a key given twice: YAML keeps the last
        lines[path] = mark_node.start_mark.line + 1
        lines.update(_key_lines(value, path))
    return lines


@dataclasses.dataclass
class _FileLayer:
    """What a config file sets, the line of each key, and what is wrong with it."""

    path: Path
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    lines: dict[tuple[str, ...], int] = dataclasses.field(default_factory=dict)
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def source(self) -> str:
        return f"config {self.path}"

    def problem(self, loc: typing.Sequence[str], message: str, line: int = 0) -> Problem:
        """A problem at ``loc``, on the line of its deepest key the file has."""
        for depth in range(len(loc), 0, -1):
            if line:
                break
            line = self.lines.get(tuple(loc[:depth]), 0)
        return Problem(line, ".".join(loc), message, self.source, self.path)

    def add(self, loc: typing.Sequence[str], message: str, line: int = 0) -> None:
        self.problems.append(self.problem(loc, message, line))


def _read_yaml(path: Path) -> _FileLayer:
    """Read a config file, noting every unknown section or key (not only the first)."""
    import yaml  # here, not at the top: a worker never reads YAML (15 ms of its start)

    layer = _FileLayer(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        why = exc.strerror or exc
        layer.add(
            (), f"cannot read config file: {why} (check the path given to --config or IMGDL_CONFIG)"
        )
        return layer
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        layer.add((), "config file is not UTF-8 text (save it as UTF-8)", line)
        return layer
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file: nothing set
            return layer
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        layer.add((), *_yaml_error(exc))
        return layer
    finally:
        loader.dispose()
    if data is None:
        return layer
    if not isinstance(data, dict):
        layer.add(
            (),
            "the top level must be a mapping of sections (write 'http:' and below it, "
            "indented, 'concurrency: 8'; see config/imgdl.yaml)",
            1,
        )
        return layer
    layer.lines = _key_lines(node)
    for section, body in data.items():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            layer.add(
                (str(section),),
                f"unknown section{_suggest(str(section), SECTIONS)}; the sections are {known}",
            )
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            layer.add(
                (section,),
                f"section '{section}' must be a mapping of keys (indent them below "
                f"'{section}:', one 'key: value' a line)",
            )
            continue
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if dotted not in KEYS:
                layer.add(
                    (section, str(key)),
                    _unknown_key(dotted, KEYS, "`imgdl config show` lists every key"),
                )
                continue
            layer.values[dotted] = value
    return layer


def _yaml_error(exc: yaml.YAMLError) -> tuple[str, int]:
    """The message and line of a YAML syntax error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f", {context} at line {context_mark.line + 1}"
    if "'\\t'" in problem:
        fix = "indent with spaces: YAML does not allow tabs"
    else:
        fix = "check the indentation and the quoting of this line and the ones above"
    message = f"invalid YAML: {problem} ({fix})"
    return message, mark.line + 1 if mark is not None else 0


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
    import yaml  # here, not at the top: a worker never reads YAML (15 ms of its start)

    out: dict[str, tuple[Any, str]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = _ENV_TO_KEY.get(name)
        if key is None:
            raise ConfigError(
                f"unknown environment variable {name}{_suggest(name, _ENV_TO_KEY)}; the names "
                "are IMGDL_<SECTION>_<KEY> of the keys `imgdl config show` lists"
            )
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


class _Layers:
    """Every key's value and where it came from: a file (with lines), env, flags."""

    def __init__(self, file: _FileLayer | None = None) -> None:
        self.file = file
        self.values: dict[str, tuple[Any, str]] = {}
        if file is not None:
            self.values.update({k: (v, file.source) for k, v in file.values.items()})

    def problem(self, loc: typing.Sequence[str], message: str) -> Problem:
        """A problem with the value at ``loc``, said where that value was set."""
        source = self.values.get(".".join(loc[:2]), (None, "default"))[1]
        if self.file is not None and source == self.file.source:
            return self.file.problem(loc, message)
        return Problem(0, ".".join(loc), message, source)


def _validate(layers: _Layers) -> tuple[Settings | None, list[Problem]]:
    """Validate the layers; every problem, not only the first.

    A key with a problem is set back to its default and the rest validated again,
    so that the consistency checks (which need a whole model) still see the
    other keys. ``load`` and ``validate_file`` both come here: they cannot drift.
    """
    problems: list[Problem] = []
    values = dict(layers.values)
    for _ in range(3):  # the second pass has only valid values (or defaults) left
        nested: dict[str, dict[str, Any]] = {}
        for key, (value, _source) in values.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        try:
            settings = Settings.model_validate(nested)
        except pydantic.ValidationError as exc:
            for err in exc.errors():
                loc = tuple(str(p) for p in err["loc"])
                problems.append(layers.problem(loc, _explain(err, loc)))
                bad = ".".join(loc[:2])
                values = {k: v for k, v in values.items() if k != bad and k.split(".")[0] != bad}
            continue
        return settings, problems + _check_consistency(settings, layers)
    return None, problems


def _explain(err: pydantic_core.ErrorDetails, loc: tuple[str, ...]) -> str:
    """pydantic's message, the value it got, and what would be accepted instead."""
    if err["type"] == "extra_forbidden":
        known = _nested_fields(list(loc))
        return _unknown_key(loc[-1], known, f"the keys here are {', '.join(known) or 'none'}")
    if err["type"] == "value_error":  # our validators say what is wrong and what to write
        return err["msg"].removeprefix("Value error, ")
    got = repr(err["input"])
    if loc[0] == "hosts":  # a header's value may be a secret: never echo it
        got = type(err["input"]).__name__
    message = f"{err['msg']}, got {got if len(got) <= 60 else got[:57] + '...'}"
    field = _field_at(loc)
    if field is None:
        return message
    model, name = field
    kind, allowed = describe(model.model_fields[name])
    expected = f"{kind}, {allowed}" if allowed else kind
    return f"{message} (expected {expected}; default {yaml_value(default_of(model, name))})"


def _field_at(loc: tuple[str, ...]) -> tuple[type[_Section], str] | None:
    """The model and field name that a pydantic error location points into."""
    if len(loc) < 2 or loc[0] not in SECTIONS:
        return None
    if loc[:2] == ("limits", "hosts") and len(loc) >= 4 and loc[3] in HostLimits.model_fields:
        return HostLimits, loc[3]
    if loc[1] in SECTIONS[loc[0]].model_fields:
        return SECTIONS[loc[0]], loc[1]
    return None


def _one_line(problems: list[Problem], file: _FileLayer | None) -> str:
    """The first problem, and how to see the others: the CLI prints one line."""
    more = len(problems) - 1
    if not more:
        return str(problems[0])
    how = f"; `imgdl config validate {file.path}` lists a file's problems" if file else ""
    return f"{problems[0]} (and {more} more problem{'s' if more > 1 else ''}{how})"


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
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    file = _read_yaml(config_file) if config_file is not None else None
    layers = _Layers(file)
    layers.values.update(_read_env(env))
    for key, item in (overrides or {}).items():
        if key not in KEYS:
            raise ConfigError(f"unknown setting '{key}'{_suggest(key, KEYS)}")
        layers.values[key] = item
    settings, problems = _validate(layers)
    problems = (file.problems if file else []) + problems + _proxy_env_problems(settings, env)
    if problems or settings is None:
        raise ConfigError(_one_line(problems, file))
    return Effective(settings=settings, sources={k: src for k, (_, src) in layers.values.items()})


def _proxy_env_problems(settings: Settings | None, env: Mapping[str, str]) -> list[Problem]:
    """With ``network.proxy: null``, a proxy variable imgdl cannot use stops the run."""
    if settings is None or settings.network.proxy is not None:
        return []
    from downloader.proxy import ProxyRules

    try:
        ProxyRules.from_settings(None, settings.network.no_proxy, env)
    except ValueError as exc:
        message = f"{exc}; set network.proxy to override the environment"
        return [Problem(0, "network.proxy", message, "the proxy variables of the environment")]
    return []


def validate_file(path: Path) -> list[Problem]:
    """Every problem of one config file on its own (no env, no flags), by line."""
    file = _read_yaml(path)
    _, problems = _validate(_Layers(file))
    return sorted(file.problems + problems)


def _nested_fields(loc: list[str]) -> list[str]:
    """The keys allowed where a nested value (like a limits.hosts entry) had an extra one."""
    if loc[:2] == ["limits", "hosts"]:
        return list(HostLimits.model_fields)
    if loc[:2] == ["hosts", "rules"]:
        return list((HostAuth if "auth" in loc[3:-1] else HostRule).model_fields)
    return []


def _check_consistency(settings: Settings, layers: _Layers) -> list[Problem]:
    # Imported here: storage depends on settings' types only through plain values.
    from downloader.hostrules import HostRules
    from downloader.objstore import check_output
    from downloader.storage import check_template
    from downloader.tls import ssl_context

    checks = (
        ("output.dir", lambda: check_output(settings.output.dir)),
        ("output.name_template", lambda: check_template(settings.output.name_template)),
        ("tls.ca_bundle", lambda: ssl_context(settings.tls)),
        ("hosts.rules", lambda: HostRules.load(settings.hosts)),
    )
    problems: list[Problem] = []
    for key, check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(layers.problem(key.split("."), str(exc)))
    return problems
