"""One download: request, stream to a part file with a size cap, classify the result.

Every failure of a single URL becomes an :class:`Outcome` with a reason from the
closed set; nothing raised here escapes to stop the other URLs of a shard
(cancellation excepted, which the worker uses to enforce the grace period).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import NamedTuple

from yarl import URL

from downloader.body import CHUNK_BYTES, Body, BodyError
from downloader.columns import BodyHash
from downloader.errors import UnsafeNameError
from downloader.hostrules import HostRules
from downloader.httpclient import HttpClient, ResponseLike
from downloader.httperrors import HttpClientError
from downloader.imagesize import image_size
from downloader.imagestage import ImageStage, Stored
from downloader.limits import Limiter
from downloader.manners import opted_out
from downloader.netpolicy import BlockedAddressError, NetworkPolicy, TargetCheck
from downloader.outcomes import Job, Outcome, Reason
from downloader.proxy import Proxy, ProxyRules
from downloader.retry import RetryPolicy
from downloader.settings import Settings
from downloader.storage import NameTakenError, Part, Store, UploadError
from downloader.validate import (
    ImageType,
    InvalidImage,
    accept,
    check_decoded,
    sniff,
    sniff_needs,
)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Bodies up to this size are held in memory and written in one call...
SPOOL_BYTES = 256 * 1024
#: ...as long as all the downloads in flight in one worker hold no more than this.
SPOOL_BUDGET = 16 * 1024 * 1024


def spool_bytes(concurrency: int) -> int:
    """How much of one body is held in memory before it goes to a part file: 256 KiB
    at the default 64 in flight, less with more, never below one read chunk."""
    return max(CHUNK_BYTES, min(SPOOL_BYTES, SPOOL_BUDGET // max(1, concurrency)))


class _Failed(Exception):
    """Internal: ends one download with a reason."""

    def __init__(
        self,
        reason: Reason,
        error: str,
        http_status: int | None = None,
        retry_after: str | None = None,
        final: bool = False,
    ) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.http_status = http_status
        self.retry_after = retry_after
        self.final = final  # the same request would fail the same way: never retry


def _conditions(job: Job) -> dict[str, str]:
    """Conditional-request headers for a job that revalidates an image saved earlier."""
    headers = {}
    if job.etag:
        headers["If-None-Match"] = job.etag
    if job.last_modified:
        headers["If-Modified-Since"] = job.last_modified
    return headers


#: A URL that yarl would give back unchanged: lower-case host, a port that is not
#: the scheme's own, no percent sign, no dot segment, letters of the unreserved set
#: only. Taken as it is (``encoded=True``): 2.4 us instead of 5.8 for the parse that
#: re-encodes it.
_AS_GIVEN = re.compile(
    r"(https?)://[a-z0-9-]+(?:\.[a-z0-9-]+)*(?::([1-9][0-9]{0,4}))?"
    r"(?:/(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]*(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*/?)?"
    r"(?:\?[A-Za-z0-9._~=&-]+)?)?"
)


def parse_url(text: str) -> tuple[URL, bool]:
    """``text`` as yarl's URL, and whether ``str()`` of it is ``text`` exactly."""
    plain = _AS_GIVEN.fullmatch(text)
    if plain is not None:
        port = int(plain[2] or 0)  # yarl drops the scheme's own port from the text
        if port == 0 or (port <= 65535 and port != (80 if plain[1] == "http" else 443)):
            return URL(text, encoded=True), True
    return URL(text), False


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def classify(exc: BaseException) -> tuple[Reason, str]:
    """Map an exception raised while fetching to a reason and a one-line message."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, BlockedAddressError):
        return Reason.BLOCKED_ADDRESS, message
    if isinstance(exc, UploadError):
        return Reason.UPLOAD_ERROR, message
    if isinstance(exc, HttpClientError):
        return exc.reason, message
    if "aiohttp" in sys.modules:  # only a worker that sent a request through aiohttp
        from downloader.transport import classify as classify_aiohttp

        found = classify_aiohttp(exc, message)
        if found is not None:
            return found
    if isinstance(exc, TimeoutError):
        return Reason.TIMEOUT, message if str(exc) else "timed out"
    if isinstance(exc, OSError):
        return Reason.WRITE_ERROR, message
    return Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {message}"


def _body_errors() -> tuple[type[BaseException], ...]:
    """What reading a body may raise besides our own errors: aiohttp's too, once loaded."""
    if "aiohttp" not in sys.modules:
        return (HttpClientError, TimeoutError)
    from downloader.transport import BODY_ERRORS

    return (HttpClientError, TimeoutError, *BODY_ERRORS)


class RetryLater(Exception):
    """The next try of ``job`` is due in ``delay`` seconds: hand it back to the parent,
    which sends it out again with a later shard, instead of holding this shard open."""

    def __init__(self, job: Job, delay: float) -> None:
        super().__init__(f"retry in {delay:.2f} s")
        self.job = job
        self.delay = delay


class _Try(NamedTuple):
    """Which attempt at a URL this is, and when the first began: the saved record says."""

    attempt: int
    started: float


class Fetcher:
    """Downloads jobs with the worker's HTTP client into one store."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        limiter: Limiter | None = None,
        policy: NetworkPolicy | None = None,
        defer_from: float = math.inf,
        stage: ImageStage | None = None,
        client: HttpClient | None = None,
    ) -> None:
        """``defer_from``: a retry due later than this many seconds raises RetryLater.
        ``stage``: re-encode and/or content dedupe before the commit (imagestage.py).
        ``client``: imgdl's own client for direct requests (``http.client: builtin``);
        the others go through aiohttp's session (transport.py)."""
        self.stage = stage
        self.client = client
        self.settings = settings
        self.defer_from = defer_from
        self.store = store
        self.max_bytes = settings.validate_.max_bytes
        self.validate = settings.validate_
        self.retry = RetryPolicy.from_settings(settings.retry)
        self.max_redirects = settings.http.max_redirects
        self.policy = policy or NetworkPolicy.from_strings(settings.network.allow)
        network = settings.network
        self.proxies = ProxyRules.from_settings(network.proxy, network.no_proxy, os.environ)
        self.target_check = TargetCheck(self.policy, ttl=settings.http.dns_cache_ttl)
        self.opt_out = frozenset(d.lower() for d in settings.manners.opt_out)
        self.robots_token = settings.manners.robots_token
        self.read_window = settings.http.read_timeout
        self.spool_bytes = spool_bytes(settings.http.concurrency)
        self.min_speed = settings.http.min_speed
        self.limiter = limiter
        self.hosts = HostRules.load(settings.hosts)

    async def fetch(self, job: Job) -> Outcome:
        """Download one job, retrying as the policy says; returns an outcome, or raises
        RetryLater when the next try is further off than ``defer_from``."""
        started = time.monotonic()
        try:
            stem = self.store.stem_for(job)
            existing = None if job.revalidating else self.store.existing(stem)
        except UnsafeNameError as exc:
            return Outcome.not_saved(job, Reason.INVALID_NAME, error=str(exc))
        if existing is not None:
            return Outcome.not_saved(job, Reason.SKIPPED_EXISTS, path=existing)
        attempt = job.tries
        while True:
            attempt += 1
            retry_after: str | None = None
            http_status: int | None = None
            final = False
            try:
                return await self._download(job, stem, _Try(attempt, started))
            except _Failed as exc:
                reason, error = exc.reason, exc.error
                http_status, retry_after, final = exc.http_status, exc.retry_after, exc.final
            except UnsafeNameError as exc:
                return Outcome.not_saved(job, Reason.INVALID_NAME, error=str(exc), attempts=attempt)
            except NameTakenError as exc:
                return Outcome.not_saved(
                    job,
                    Reason.NAME_COLLISION,
                    path=str(exc),
                    error=f"the name {exc} is already taken by another file in the output folder",
                    attempts=attempt,
                )
            except Exception as exc:  # every other failure is classified, never raised
                reason, error = classify(exc)
            if final or not self.retry.should_retry(attempt, reason, http_status):
                return Outcome.not_saved(
                    job,
                    reason,
                    http_status=http_status,
                    error=error,
                    attempts=attempt,
                    elapsed_ms=_ms_since(started),
                )
            delay = self.retry.delay(attempt, retry_after)
            if delay >= self.defer_from:
                raise RetryLater(dataclasses.replace(job, tries=attempt), delay)
            await asyncio.sleep(delay)

    async def _download(self, job: Job, stem: str, this_try: _Try) -> Outcome:
        """Follow redirects ourselves: every hop's scheme and address are checked."""
        start, as_given = parse_url(job.url)
        url = start
        downgraded = False  # an https hop led to an http one: no credentials from there on
        async with self._turn(url.raw_host or ""):
            for _ in range(self.max_redirects + 1):
                self.policy.check_host(url.raw_host or "")
                # each hop gets the headers of its own host's rule, and only those
                headers = self.hosts.headers_for(url, downgraded)
                conditions = _conditions(job)
                if conditions:  # revalidating an image saved before
                    headers = {**conditions, **headers}
                proxy = self.proxies.for_url(url)
                if proxy is not None:
                    await self._check_proxy(url, proxy)
                async with await self._request(url, headers, proxy) as resp:
                    if resp.status == 304 and job.revalidating:
                        return Outcome.not_saved(
                            job,
                            Reason.NOT_MODIFIED,
                            http_status=304,
                            attempts=this_try.attempt,
                            elapsed_ms=_ms_since(this_try.started),
                            path=job.previous_path,
                            etag=resp.headers.get("ETag", job.etag),
                            last_modified=resp.headers.get("Last-Modified", job.last_modified),
                        )
                    location = resp.headers.get("Location")
                    if resp.status in _REDIRECTS and location:
                        hop = self._next_hop(url, location, resp.status)
                        downgraded |= url.scheme == "https" and hop.scheme != "https"
                        url = hop
                        continue
                    outcome = await self._respond(job, stem, resp, this_try)
                    if not (url is start and as_given) and str(url) != job.url:
                        outcome = dataclasses.replace(outcome, final_url=str(url))
                    return outcome
        raise _Failed(Reason.TOO_MANY_REDIRECTS, f"more than {self.max_redirects} redirects", None)

    async def _check_proxy(self, url: URL, proxy: Proxy) -> None:
        """The proxy's address and the target's addresses through the network policy
        (the GuardedResolver sees neither: aiohttp does not resolve a literal proxy
        address, and the proxy resolves the target)."""
        try:
            self.policy.check_host(proxy.url.raw_host or "")
        except BlockedAddressError as exc:
            raise BlockedAddressError(f"proxy {proxy.shown}: {exc}") from None
        await self.target_check.check(url.raw_host or "")

    async def _request(
        self, url: URL, headers: dict[str, str], proxy: Proxy | None = None
    ) -> ResponseLike:
        """Send the request and read the response head: through the builtin client when
        it goes straight to the server, else through aiohttp (transport.py)."""
        if proxy is None and self.client is not None:
            return await self.client.get(url, headers)
        from downloader import transport  # aiohttp: loaded by the first request it sends

        return await transport.request(self.settings, self.policy, url, headers, proxy)

    @staticmethod
    def _next_hop(url: URL, location: str, status: int) -> URL:
        try:
            target = url.join(URL(location))
        except ValueError as exc:
            raise _Failed(
                Reason.PROTOCOL_ERROR, f"bad redirect Location: {exc}", status, final=True
            ) from None
        if target.scheme not in ("http", "https") or not target.raw_host:
            raise _Failed(
                Reason.PROTOCOL_ERROR,
                f"redirect to a URL imgdl does not fetch: {target}",
                status,
                final=True,
            )
        return target

    async def _respond(self, job: Job, stem: str, resp: ResponseLike, this_try: _Try) -> Outcome:
        """The final response: check status and headers, then stream the body."""
        status = resp.status
        if status != 200:
            raise _Failed(
                Reason.HTTP_ERROR,
                f"HTTP {status} {resp.reason or ''}".strip(),
                status,
                resp.headers.get("Retry-After"),
            )
        refusal = opted_out(
            resp.headers.getall("X-Robots-Tag", ()), self.opt_out, self.robots_token
        )
        if refusal is not None:
            raise _Failed(Reason.OPTED_OUT, f"X-Robots-Tag: {refusal}", status)
        declared = resp.content_length
        if declared is not None and declared > self.max_bytes:
            raise _Failed(
                Reason.TOO_LARGE,
                f"Content-Length {declared} exceeds max_bytes {self.max_bytes}",
                status,
            )
        try:
            return await self._stream(job, stem, resp, this_try)
        except UploadError as exc:  # the image was good; the object store did not take it
            raise _Failed(Reason.UPLOAD_ERROR, str(exc), status, final=True) from None
        except _body_errors() as exc:  # keep the status we got
            reason, error = classify(exc)
            raise _Failed(reason, error, status) from None

    async def _stream(self, job: Job, stem: str, resp: ResponseLike, this_try: _Try) -> Outcome:
        """Body to a part file: size cap, speed floor, type sniff, Content-Length check.

        A body is held in memory up to ``spool_bytes`` and written at once when it
        ends; a larger one streams to a part file through aiofiles from there on.
        """
        status, declared = resp.status, resp.content_length
        part: Part | None = None
        try:
            body = Body(resp, self.read_window, self.min_speed)
            digest = hashlib.sha256()
            expected = BodyHash(job.expected_hash) if job.expected_hash else None
            size = 0
            held: list[bytes] = []
            image: ImageType | None = None
            dimensions: tuple[int, int] | None = None
            arrived = body.arrived(self.spool_bytes)
            if arrived is not None:  # all in already: the loop's checks, with no waits
                whole_body = b"".join(arrived)  # (one chunk: that chunk, no copy)
                held = [whole_body]
                head = whole_body[:CHUNK_BYTES]  # what the loop's first chunk would be
                self._capped(len(head), status)
                if len(head) >= sniff_needs(head):  # else after the hash, as the loop does
                    image = self._sniffed(head, resp, status)
                size = self._capped(len(whole_body), status)
                digest.update(whole_body)
                if expected is not None:
                    expected.update(whole_body)
            else:
                async for chunk in body.chunks():
                    size = self._capped(size + len(chunk), status)
                    digest.update(chunk)
                    if expected is not None:
                        expected.update(chunk)
                    if part is not None:
                        await part.write(chunk)
                        continue
                    held.append(chunk)
                    if image is None:
                        head = b"".join(held)
                        if len(head) < sniff_needs(head):
                            continue
                        image = self._sniffed(head, resp, status)
                    if size > self.spool_bytes:
                        first = b"".join(held)
                        dimensions = image_size(image.name, first)  # from the bytes in hand
                        part = await self.store.open_part(stem)
                        await part.write(first)
                        held = []
            if declared is not None and body.raw_bytes < declared:
                raise _Failed(Reason.TRUNCATED, f"got {body.raw_bytes} of {declared} bytes", status)
            mismatch = expected.mismatch(digest.hexdigest()) if expected is not None else None
            if mismatch is not None:  # the image the list meant is not this one: not saved
                raise _Failed(Reason.HASH_MISMATCH, mismatch, status, final=True)
            whole: bytes | None = None
            if part is None:
                whole = b"".join(held)
                if image is None:  # the whole body was shorter than the sniff needs
                    image = self._sniffed(whole, resp, status)
                dimensions = image_size(image.name, whole)
                part = self.store.write_part(stem, whole)
            assert image is not None
            if self.validate.decode:
                await part.close()
                await asyncio.to_thread(check_decoded, part.path, image, self.validate)
            stored, claimed = None, False
            if self.stage is not None:
                stored = await self.stage.restage(stem, whole, part, image, self.store)
                part = stored.part
                # a revalidated image replaces its own file: not a copy of anything
                claimed = self.stage.index is not None and not job.revalidating
                duplicate = None
                if claimed:
                    duplicate = await self._claim(job, stem, stored, digest.hexdigest())
                if duplicate is not None:  # a copy of an image stored earlier
                    await part.abort()
                    return dataclasses.replace(
                        duplicate,
                        http_status=status,
                        attempts=this_try.attempt,
                        elapsed_ms=_ms_since(this_try.started),
                        bytes=size,
                        content_type=image.mime,
                        width=dimensions[0] if dimensions else None,
                        height=dimensions[1] if dimensions else None,
                    )
            final = stored.image if stored is not None else image
            try:
                relpath = await part.commit(
                    final.ext, replace=job.revalidating, content_type=final.mime
                )
            except NameTakenError as exc:
                # The same bytes already there (an earlier attempt put them in place just
                # before it was killed): that is this image, saved.
                new_sha = (stored.sha256 if stored else None) or digest.hexdigest()
                if not await self.store.holds(str(exc), new_sha):
                    await self._unclaim(digest.hexdigest(), claimed)
                    raise
                relpath = str(exc)
            except BaseException:
                await self._unclaim(digest.hexdigest(), claimed)
                raise
            if claimed and self.stage is not None:
                await asyncio.shield(self.stage.confirm(digest.hexdigest(), relpath))
            elif job.revalidating and self.stage is not None:
                await asyncio.shield(self.stage.replaced(relpath))
            if job.previous_path and job.previous_path != relpath:  # the type changed
                await self.store.remove(job.previous_path)
        except (BodyError, InvalidImage) as exc:
            if part is not None:
                await asyncio.shield(part.abort())
            raise _Failed(exc.reason, str(exc), status) from None
        except BaseException:
            if part is not None:
                await asyncio.shield(part.abort())
            raise
        saved = Outcome.saved(
            job,
            attempts=this_try.attempt,
            elapsed_ms=_ms_since(this_try.started),
            http_status=status,
            path=relpath,
            bytes=size,
            sha256=digest.hexdigest(),
            content_type=image.mime,
            width=dimensions[0] if dimensions else None,
            height=dimensions[1] if dimensions else None,
            etag=resp.headers.get("ETag"),
            last_modified=resp.headers.get("Last-Modified"),
        )
        return stored.describe(saved) if stored is not None else saved

    async def _claim(self, job: Job, stem: str, stored: Stored, sha256: str) -> Outcome | None:
        """Claim the content (dedupe.content); the duplicate_content outcome when the
        same image is stored already. A claimed image is confirmed or released
        (``_unclaim``) by the caller."""
        assert self.stage is not None
        where = f"{job.input}:{job.line}"
        match = await self.stage.claim(sha256, stored.phash, stem + stored.image.ext, where)
        if match is None:
            return None
        how = "the same bytes" if match.exact else f"pHash distance {match.distance}"
        return Outcome.not_saved(
            job,
            Reason.DUPLICATE_CONTENT,
            path=match.path,
            duplicate_of=match.owner,
            sha256=sha256,
            error=f"{how} as {match.owner}, stored at {match.path}",
        )

    async def _unclaim(self, sha256: str, claimed: bool) -> None:
        if claimed and self.stage is not None:
            await asyncio.shield(self.stage.release(sha256))

    def _turn(self, host: str) -> AbstractAsyncContextManager[None]:
        if self.limiter is None:
            return nullcontext()
        return self.limiter.request(host)

    def _capped(self, size: int, status: int) -> int:
        if size > self.max_bytes:
            raise _Failed(Reason.TOO_LARGE, f"body exceeds max_bytes {self.max_bytes}", status)
        return size

    def _sniffed(self, head: bytes, resp: ResponseLike, status: int) -> ImageType:
        try:
            return accept(sniff(head), self.validate)
        except InvalidImage as exc:
            claimed = resp.headers.get("Content-Type", "no Content-Type")
            raise _Failed(exc.reason, f"{exc} (server said {claimed})", status) from None
