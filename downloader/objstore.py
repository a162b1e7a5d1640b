"""S3-compatible object stores: locations, the client, what a prefix already holds.

An ``s3://BUCKET/PREFIX`` output keeps imgdl's layout under the prefix: each image
at ``PREFIX/<the name the local store would use>``, and at the end of a run the
records (``manifest.jsonl``, ``failures.txt``, ``summary.json``, ``.imgdl/run.json``)
beside them. The journals, segments and SQLite files a run writes as it goes stay
in a local state folder (``s3.state_dir``): an object store has no append.

The client is obstore (Rust's ``object_store`` crate): one wheel of 15 MiB with no
dependencies, about a quarter of aiobotocore's CPU per PUT (``bench/s3_clients.py``,
``docs/architecture.md``). It is the ``[s3]`` extra, imported only when an s3://
location is used, so that imgdl without it works as before and says what to
install when one is asked for. This module is the parent's side (and the input
reader's); ``s3store`` is the workers'.
"""

from __future__ import annotations

import configparser
import dataclasses
import io
import os
import re
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

from downloader.errors import ConfigError, ImgdlError, InputError
from downloader.settings import DEFAULT_USER_AGENT, S3Settings
from downloader.validate import EXTENSIONS

if TYPE_CHECKING:
    from obstore.store import S3Store

SCHEME = "s3://"
#: Where the records of a run go when ``s3.state_dir`` is not set.
DEFAULT_STATE_ROOT = Path("imgdl-state")
#: The prefix's own objects: never images (``storage.safe_relpath`` refuses the
#: folders, and no image name ends in these suffixes).
OWN_NAMES = frozenset({"manifest.jsonl", "failures.txt", "summary.json", "report.html"})
OWN_FOLDERS = frozenset({".imgdl", "previous-runs", "tasks"})
#: The resume state that is uploaded with the records: the inputs' fingerprints.
RUN_JSON = ".imgdl/run.json"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_INSTALL = "pip install 'imgdl[s3]'"


@dataclasses.dataclass(frozen=True)
class S3Location:
    """A bucket and a prefix inside it (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, relpath: str) -> str:
        """The object key of a name relative to the prefix."""
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def below(self, relpath: str) -> S3Location:
        """The location of a folder below this one (a task's records)."""
        return dataclasses.replace(self, prefix=self.key(relpath.strip("/")))


def is_s3(text: str | os.PathLike[str]) -> bool:
    return str(text)[: len(SCHEME)].lower() == SCHEME


def parse(text: str) -> S3Location:
    """``s3://bucket/prefix`` → S3Location; ConfigError saying what is wrong otherwise."""
    if not is_s3(text):
        raise ConfigError(f"{text!r} is not an s3://BUCKET/PREFIX location")
    bucket, _, prefix = text[len(SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"{text!r}: {bucket!r} is not a bucket name (3-63 characters: lower-case letters, "
            "digits, dots and hyphens)"
        )
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts) or any(ord(c) < 32 for c in prefix):
        raise ConfigError(f"{text!r}: the prefix may not hold '.', '..' or control characters")
    return S3Location(bucket, "/".join(parts))


def check_output(text: str) -> None:
    """Settings check of ``output.dir``: an s3:// location must parse."""
    if is_s3(text):
        parse(text)


def default_state_dir(location: S3Location) -> Path:
    return DEFAULT_STATE_ROOT / location.bucket / location.prefix


def require_obstore() -> ModuleType:
    """The obstore module, or an error that says how to install it."""
    try:
        import obstore
    except ImportError:
        raise ConfigError(
            f"s3:// locations need the S3 client, which is not installed: {_INSTALL}"
        ) from None
    return obstore


def _endpoint(s3: S3Settings, env: os._Environ[str] | dict[str, str]) -> str | None:
    return s3.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")


def _profile_section(parser: configparser.ConfigParser, profile: str, config: bool) -> str | None:
    names = [profile] if not config or profile == "default" else [f"profile {profile}", profile]
    return next((n for n in names if parser.has_section(n)), None)


def shared_profile(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """Static keys and the region of the AWS profile (``AWS_PROFILE``, else ``default``)
    from ``~/.aws/credentials`` and ``~/.aws/config``, the part of the AWS chain that
    obstore does not read itself. Only where the chain would reach the files: not
    when keys, a web identity or container credentials come from the environment.
    SSO and assume-role profiles are not read: export their keys instead
    (``aws configure export-credentials --format env``)."""
    found: dict[str, str] = {}
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path(env.get("HOME") or Path.home())
    files = (
        (env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials", False),
        (env.get("AWS_CONFIG_FILE") or home / ".aws" / "config", True),
    )
    from_env = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE")
    container = ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    keys_elsewhere = any(env.get(name) for name in (*from_env, *container))
    for path, is_config in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue  # a file the AWS CLI could not read either; the rest of the chain
        section = _profile_section(parser, profile, is_config)
        if section is None:
            continue
        values = parser[section]
        static = values.get("aws_access_key_id") and values.get("aws_secret_access_key")
        if static and not keys_elsewhere and "access_key_id" not in found:
            found["access_key_id"] = values["aws_access_key_id"]
            found["secret_access_key"] = values["aws_secret_access_key"]
            if values.get("aws_session_token"):
                found["session_token"] = values["aws_session_token"]
        if is_config and values.get("region"):
            found.setdefault("region", values["region"])
    return found


def open_store(
    bucket: str, s3: S3Settings, env: os._Environ[str] | dict[str, str] = os.environ
) -> S3Store:
    """A client for ``bucket``: obstore reads the AWS variables (keys, session token,
    region, AWS_ENDPOINT_URL, web identity, ECS and EC2 instance credentials);
    ``s3.*`` settings and the shared AWS files fill in around them. This client has
    its own connections: the download side's network policy does not apply to it
    (the store is where the user sends the images, not a URL from a list)."""
    require_obstore()
    from obstore.store import S3Store

    config: dict[str, Any] = {}
    profile = shared_profile(env)
    if not env.get("AWS_REGION") and not env.get("AWS_DEFAULT_REGION") and "region" in profile:
        config["region"] = profile.pop("region")
    profile.pop("region", None)
    config.update(profile)
    if s3.region:
        config["region"] = s3.region
    endpoint = _endpoint(s3, env)
    if s3.endpoint_url:
        config["endpoint"] = s3.endpoint_url
    timeout = timedelta(seconds=s3.timeout)
    client: dict[str, Any] = {
        "timeout": timeout,
        "connect_timeout": timedelta(seconds=min(10.0, s3.timeout)),
        "user_agent": DEFAULT_USER_AGENT,
    }
    if endpoint and endpoint.lower().startswith("http://"):
        client["allow_http"] = True
    retry: dict[str, Any] = {
        "max_retries": s3.retries,
        "retry_timeout": timeout,
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
        },
    }
    try:
        return S3Store(bucket, config=config, client_options=client, retry_config=retry)  # type: ignore[arg-type]
    except Exception as exc:  # obstore's configuration errors
        raise ConfigError(f"cannot set up the S3 client for bucket {bucket}: {exc}") from None


#: What to do about the store's errors users meet first, by a piece of the message.
_HINTS = (
    ("NoSuchBucket", "the bucket does not exist: create it, or check its name and region"),
    (
        "169.254.169.254",
        "no AWS credentials were found (the client fell back to the instance metadata "
        "service): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run "
        "with a role",
    ),
    (
        "error sending request",
        "the store cannot be reached: check AWS_ENDPOINT_URL and the network",
    ),
    ("AccessDenied", "the credentials may not do this: check the bucket policy and the role"),
    ("SignatureDoesNotMatch", "the secret key is wrong for this access key"),
    ("InvalidAccessKeyId", "the access key is unknown to this store: check AWS_ACCESS_KEY_ID"),
)


def describe(exc: BaseException) -> str:
    """obstore's messages end with the whole XML error body: keep the first line, the
    S3 error code from the body, and what to do about it when we know."""
    whole = str(exc).strip()
    text = whole.splitlines()
    first = re.sub(r":?\s*<\?xml[^>]*\?>", "", text[0] if text else type(exc).__name__)[:500]
    code = re.search(r"<Code>([^<]{1,100})</Code>", whole)
    if code and code[1] not in first:
        first += f" ({code[1]})"
    hints = [hint for needle, hint in _HINTS if needle in whole]
    return f"{first}: {hints[0]}" if hints else first


# -- what the prefix holds ------------------------------------------------------------


class ObjectIndex:
    """The keys under the output prefix when the run began, in SQLite on disk.

    One LIST pass (1,000 keys a request) at the start of a run answers two
    questions without a request per line: which lines done by an earlier run
    still have their object (resume), and whether an image is already there
    under a name (``skipped_exists``, read by the workers). Memory stays bounded
    however many objects the prefix holds; the time is a LIST request per 1,000.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.images = 0

    def build(self, store: S3Store, location: S3Location) -> ObjectIndex:
        """List ``location`` into a new index file; raises ImgdlError if the listing fails."""
        obstore = require_obstore()
        self.path.unlink(missing_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.executescript(
                "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
                "CREATE TABLE k (key TEXT PRIMARY KEY) WITHOUT ROWID; BEGIN;"
            )
            cut = len(location.prefix) + 1 if location.prefix else 0
            for batch in obstore.list(store, location.prefix or None, chunk_size=1000):
                keys = [meta["path"][cut:] for meta in batch if meta["size"] > 0]
                images = [k for k in keys if not _own(k)]
                self.images += len(images)
                db.executemany("INSERT OR IGNORE INTO k VALUES (?)", ((k,) for k in images))
            db.execute("COMMIT")
        except Exception as exc:
            db.close()
            self.path.unlink(missing_ok=True)
            raise ImgdlError(f"cannot list {location.url}: {describe(exc)}") from None
        db.close()
        return self


def _own(relpath: str) -> bool:
    top = relpath.split("/", 1)[0]
    return top in OWN_FOLDERS or relpath in OWN_NAMES


class IndexReader:
    """Read-only look-ups in an ObjectIndex file (one connection per process)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def __contains__(self, relpath: object) -> bool:
        row = self._db.execute("SELECT 1 FROM k WHERE key = ?", (relpath,)).fetchone()
        return row is not None

    def existing(self, stem: str) -> str | None:
        """The name of an image under ``stem`` (any image extension), if the prefix held one."""
        names = [stem + ext for ext in EXTENSIONS]
        marks = ",".join("?" * len(names))
        row = self._db.execute(f"SELECT key FROM k WHERE key IN ({marks})", names).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self._db.close()


# -- the records ----------------------------------------------------------------------


def upload_records(
    store: S3Store, location: S3Location, records: Path, names: tuple[str, ...] | None = None
) -> list[str]:
    """Put the run's records (``names``, else all; those that exist) under ``location``;
    returns their URLs. Each goes up whole (multipart for a large manifest): a reader
    sees the old one or the new one, never a part."""
    obstore = require_obstore()
    sent = []
    for name in names or (*sorted(OWN_NAMES), RUN_JSON):
        path = records / name
        if not path.is_file():
            continue
        content_type = "application/json" if name.endswith("json") else "text/plain"
        if name.endswith(".html"):
            content_type = "text/html; charset=utf-8"
        try:
            obstore.put(store, location.key(name), path, attributes={"Content-Type": content_type})
        except Exception as exc:
            raise ImgdlError(
                f"cannot upload {name} to {location.url}: {describe(exc)}; the records are "
                f"in {records}, and the same command uploads them at its end"
            ) from None
        sent.append(f"{location.url}/{name}")
    return sent


def restore_records(store: S3Store, location: S3Location, records: Path) -> list[str]:
    """A local state folder that is gone (a new machine, a new container) gets the
    bucket's manifest and run.json back, so that the run resumes like one with its
    state: lines done earlier are carried over, not fetched or recorded again."""
    if (records / "manifest.jsonl").exists() or (records / RUN_JSON).exists():
        return []
    return [
        name for name in ("manifest.jsonl", RUN_JSON) if download(store, location, name, records)
    ]


def download(store: S3Store, location: S3Location, name: str, folder: Path) -> bool:
    """Copy the object ``name`` below ``location`` to ``folder/name``, streamed, whole or
    not at all; False if there is no such object."""
    obstore = require_obstore()
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".download")
    try:
        result = obstore.get(store, location.key(name))
        with open(tmp, "wb") as handle:
            for chunk in result.stream(min_chunk_size=1 << 20):
                handle.write(chunk)
    except FileNotFoundError:  # obstore's NotFoundError: nothing there
        tmp.unlink(missing_ok=True)
        return False
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ImgdlError(f"cannot read {location.url}/{name}: {describe(exc)}") from None
    tmp.replace(target)
    return True


def folders_below(store: S3Store, location: S3Location) -> list[str]:
    """The names of the "folders" right below ``location`` (common prefixes)."""
    obstore = require_obstore()
    prefix = location.key("")
    try:
        listed = obstore.list_with_delimiter(store, prefix or None)
    except Exception as exc:
        raise ImgdlError(f"cannot list {location.url}: {describe(exc)}") from None
    return [str(p)[len(prefix) :].strip("/") for p in listed["common_prefixes"]]


# -- inputs ---------------------------------------------------------------------------


class ObjectStream(io.RawIOBase):
    """A raw, read-only byte stream over one GET of an object: constant memory (obstore
    hands over chunks of about 1 MiB), whatever the object's size."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._chunks = iter(())
        super().close()


def open_input(url: str, s3: S3Settings) -> tuple[IO[bytes], dict[str, Any]]:
    """An input list at ``s3://bucket/key``, streamed, and its fingerprint (size and
    ETag, for a resumed run to tell it is the same list); InputError if it cannot be had."""
    try:
        location = parse(url)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    if not location.prefix:
        raise InputError(f"{url}: name an object, s3://BUCKET/KEY")
    obstore = require_obstore()
    store = open_store(location.bucket, s3)
    try:
        result = obstore.get(store, location.prefix)
        meta = result.meta
        stream = ObjectStream(iter(result.stream(min_chunk_size=1 << 20)))
    except FileNotFoundError:
        raise InputError(f"cannot open input {url}: no such object (or no such bucket)") from None
    except Exception as exc:
        raise InputError(f"cannot open input {url}: {describe(exc)}") from None
    mark = {"input": url, "size": meta["size"], "sha256": f"etag:{meta['e_tag']}"}
    return io.BufferedReader(stream, buffer_size=1 << 20), mark
