"""The outcome of one input line: the record every component reports into.

The sets of statuses and reasons are closed: scripts that read the manifest can
rely on seeing nothing else. Invariant 1 of the design rests on this module:
every input line produces exactly one :class:`Outcome`.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import json
import operator
import time
from typing import Any

import orjson


class Status(enum.StrEnum):
    SAVED = "saved"
    SKIPPED = "skipped"
    FAILED = "failed"


class Reason(enum.StrEnum):
    """Why a line was not simply saved. The value is what the manifest holds."""

    # skipped
    SKIPPED_EXISTS = "skipped_exists"
    DUPLICATE = "duplicate"
    #: the same image (dedupe.content) was stored for an earlier URL: not stored again
    DUPLICATE_CONTENT = "duplicate_content"
    OPTED_OUT = "opted_out"
    NOT_MODIFIED = "not_modified"
    # failed: the input itself
    INVALID_URL = "invalid_url"
    INVALID_NAME = "invalid_name"
    NAME_COLLISION = "name_collision"
    # failed: the server or the network
    HTTP_ERROR = "http_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TLS_ERROR = "tls_error"
    PROTOCOL_ERROR = "protocol_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    BLOCKED_ADDRESS = "blocked_address"
    # failed: the body
    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    DECODE_ERROR = "decode_error"
    TOO_SMALL = "too_small"
    TOO_BIG = "too_big"
    #: the body's hash is not the one input.hash_column gave; nothing saved
    HASH_MISMATCH = "hash_mismatch"
    # failed: on our side
    WRITE_ERROR = "write_error"
    #: the object store did not take the image (s3:// output), after its retries
    UPLOAD_ERROR = "upload_error"
    WORKER_CRASHED = "worker_crashed"
    INTERNAL_ERROR = "internal_error"
    INTERRUPTED = "interrupted"

    @property
    def status(self) -> Status:
        return Status.SKIPPED if self in _SKIP_REASONS else Status.FAILED


_SKIP_REASONS = frozenset(
    {
        Reason.SKIPPED_EXISTS,
        Reason.DUPLICATE,
        Reason.DUPLICATE_CONTENT,
        Reason.OPTED_OUT,
        Reason.NOT_MODIFIED,
    }
)

#: Reasons whose URL is worth feeding back in: everything but a broken input line.
REFETCHABLE = frozenset(r for r in Reason if r.status is Status.FAILED) - {
    Reason.INVALID_URL,
    Reason.INVALID_NAME,
    Reason.NAME_COLLISION,
    Reason.DECOMPRESSION_BOMB,
    Reason.DECODE_ERROR,
    Reason.TOO_SMALL,
    Reason.TOO_BIG,
    # failures.txt holds URLs only: fed back in, the image would be saved unchecked
    Reason.HASH_MISMATCH,
}


@dataclasses.dataclass(slots=True)
class Job:
    """One valid input line on its way to a worker.

    Not frozen, though nothing changes one once made (``dataclasses.replace`` makes
    another): the parent makes one per line and each worker makes it again when it
    unpickles its shard, and a frozen class sets every field through
    ``object.__setattr__`` (1.27 against 0.42 us a job, timeit, issue 5)."""

    url: str
    input: str
    line: int
    name: str | None = None
    #: With run.revalidate, what an earlier run kept of this line's image.
    etag: str | None = None
    last_modified: str | None = None
    previous_path: str | None = None
    #: Tries made in earlier shards: a retry waits in the parent, not in a shard.
    tries: int = 0
    #: input.extra_columns of this line as the JSON text of one object (compact to
    #: hold and to pickle; decoded only into the outcome's ``extra``).
    extra: str | None = None
    #: input.hash_column's value, checked: "sha256:<hex>" or "md5:<hex>", lower case.
    expected_hash: str | None = None

    @property
    def revalidating(self) -> bool:
        return self.previous_path is not None

    def __reduce__(self) -> tuple[type[Job], tuple[Any, ...]]:
        """Pickled as the class and its fields' values, in order: every job of a shard
        is pickled by the parent and unpickled by a worker, and the state functions
        that dataclasses gives a slots class (fields() called per object) took 2.2 µs
        to pickle a job and 2.6 µs to unpickle it; this takes 0.5 and 1.3 (issue 5)."""
        return (Job, _job_values(self))


@dataclasses.dataclass
class Outcome:
    """One manifest record. Field names are the manifest's public column names.

    Neither frozen nor slotted, though nothing changes one once made
    (``dataclasses.replace`` makes another): a worker makes and encodes one per URL.
    A frozen class sets each of its 26 fields through ``object.__setattr__`` (34,000
    of 965,000 CPU instructions a 20 KB download, cachegrind, issue 5); orjson
    encodes an instance with a ``__dict__`` from that dict, a slotted one field by
    field (0.6 against 1.8 us, and the instance is made in 1.1 us against 2.0)."""

    input: str
    line: int
    url: str
    status: Status
    reason: Reason | None = None
    http_status: int | None = None
    path: str | None = None
    bytes: int = 0
    sha256: str | None = None
    content_type: str | None = None
    attempts: int = 0
    elapsed_ms: int = 0
    error: str | None = None
    duplicate_of: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    final_url: str | None = None
    #: Pixels, read from the image's header (imagesize.py); None when not known.
    width: int | None = None
    height: int | None = None
    #: When the line's outcome was decided: Unix time in seconds (UTC), to the
    #: millisecond. None in records of versions before it (and in hand-made ones).
    finished_at: float | None = None
    #: The downloaded image, when what was stored is a re-encoded version of it
    #: (image.resize_mode / image.format); None otherwise.
    original_width: int | None = None
    original_height: int | None = None
    original_bytes: int | None = None
    original_sha256: str | None = None
    #: input.extra_columns of the line, {column: value}; None when none are configured.
    extra: dict[str, Any] | None = None

    @classmethod
    def saved(cls, job: Job, **fields: Any) -> Outcome:
        fields.setdefault("finished_at", now())
        fields.setdefault("extra", _extra(job))
        return cls(input=job.input, line=job.line, url=job.url, status=Status.SAVED, **fields)

    @classmethod
    def not_saved(cls, job: Job, reason: Reason, **fields: Any) -> Outcome:
        """``attempts`` defaults to the tries the job had before this shard."""
        fields.setdefault("attempts", job.tries)
        fields.setdefault("finished_at", now())
        fields.setdefault("extra", _extra(job))
        return cls(
            input=job.input,
            line=job.line,
            url=job.url,
            status=reason.status,
            reason=reason,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every field, 10x slower on this hot path.
        record = {name: getattr(self, name) for name in _FIELD_NAMES}
        record["status"] = self.status.value
        record["reason"] = self.reason.value if self.reason is not None else None
        return record

    def to_json(self) -> str:
        """One JSON line; strings keep their letters unless they hold undecodable bytes."""
        return self.to_line()[:-1].decode("utf-8")

    def to_line(self) -> builtins.bytes:  # (a field of the class is named bytes)
        """``to_json`` as UTF-8 with its newline: what a journal appends, made in one
        call (the worker writes it as it is, with no text layer in between)."""
        try:  # orjson reads the dataclass itself: the same keys in the same order as
            # to_dict, without building the dict (each record is encoded in a worker
            # and twice in the parent)
            return orjson.dumps(self, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # e.g. a Latin-1 reason phrase kept as surrogates
            record = self.to_dict()
            return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Outcome:
        raw = dict(raw)
        raw["status"] = Status(raw["status"])
        raw["reason"] = Reason(raw["reason"]) if raw.get("reason") else None
        return cls(**raw)

    @classmethod
    def from_json(cls, line: str) -> Outcome:
        return cls.from_dict(cls.decode(line))

    @staticmethod
    def decode(line: str) -> Any:
        """A record's JSON text, decoded; ValueError if it is not JSON."""
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:  # orjson refuses the lone surrogates to_json escapes
            return json.loads(line)


def _extra(job: Job) -> dict[str, Any] | None:
    if job.extra is None:
        return None
    # the standard library's parser: orjson reads an integer past 64 bits as a float,
    # and an id column of 30 digits must come out as it went in
    values: dict[str, Any] = json.loads(job.extra)
    return values


def now() -> float:
    """``finished_at`` for an outcome decided now: Unix seconds, to the millisecond."""
    return round(time.time(), 3)


_job_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Job)))
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Outcome))
#: The manifest's columns: every record has exactly these keys.
FIELDS = frozenset(_FIELD_NAMES)
