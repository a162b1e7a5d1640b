"""imgdl's own HTTP/1.1 client, for the requests that go straight to the server.

Why not aiohttp's ``ClientSession`` for these: on a fast network a download of a
20 KB image is CPU-bound, and the session's request machinery (request and
response objects, cookie jar, timers, tracing hooks) cost about 0.14 ms of CPU
per request, a third of all imgdl spent per image (issue 5's profile). This client
does only what imgdl needs: ``GET``, keep-alive connections pooled per origin, the
``llhttp`` parser (``httptools``), the network policy on every address, TLS with
verification, and timeouts without a timer per read. Requests through a proxy
(HTTP or SOCKS) still go through aiohttp (``transport.py``), and ``http.client:
aiohttp`` sends everything that way.

The response offers what ``fetch.py`` and ``body.py`` read from an aiohttp
response (``status``, ``reason``, ``headers``, ``content_length``,
``content.iter_chunked``, ``async with``), so the fetcher handles both alike.
Errors carry their outcome reason (``httperrors.py``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from types import TracebackType
from typing import Any, Protocol

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from downloader.hostrules import basic_authorization
from downloader.httperrors import (
    ConnectError,
    HeadLost,
    ProtocolError,
    TlsError,
    TruncatedError,
)
from downloader.netpolicy import AddressGuard, NetworkPolicy
from downloader.settings import Settings
from downloader.tls import client_context

#: The longest response head (status line and headers) accepted, and the longest line
#: (aiohttp's session is held to the same line length, transport.py).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINE = 16 * 1024
#: An idle connection is closed after this long (nginx keeps them 75 s, others less).
KEEPALIVE_SECONDS = 15.0
#: What a request past ``http.total_timeout`` fails with.
TOTAL_TIMEOUT = "the request took longer than http.total_timeout"
#: Origins whose request head (_head_for) a client keeps; all are let go past this.
HEADS_KEPT = 1024
#: A body buffered beyond this stops reading from the socket until the reader catches up.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024


class _Stale(Exception):
    """A kept-alive connection closed before the first byte of the answer: try a new one."""


class Response:
    """One response: its head at once, its body as it arrives (``content.iter_chunked``)."""

    def __init__(self, connection: _Connection, deadline: float, read_timeout: float) -> None:
        self._connection = connection
        self._loop = connection.loop
        self._clock = connection.pool.clock
        self._deadline = deadline
        self._read_timeout = read_timeout
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None
        self.content = self
        self.head_done = False
        self.complete = False
        self.received = False  # any byte of this answer
        self.keep_alive = False
        self._chunked = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._body_bytes = 0  # of the body, as received (for the truncated message)
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wait_until = 0.0  # when the current wait runs out...
        self._wait_bound: float | None = None  # ...by read_timeout (else by the deadline)

    # -- fed by the connection --------------------------------------------------------
    def _head_complete(self, fields: list[str]) -> None:
        """``fields``: the header lines as decoded text, name and value in turn
        (``_Connection.on_headers_complete``)."""
        self.headers = headers = CIMultiDictProxy(
            CIMultiDict(zip(fields[::2], fields[1::2], strict=True))
        )
        length = headers.get("Content-Length")
        if length is not None and length.strip().isdigit():
            self.content_length = int(length)
        # framed by chunks only if chunked is the last coding (RFC 9112 6.3): else the
        # body runs to the connection's end, as the parser reads it
        codings = ",".join(headers.getall("Transfer-Encoding", ())).lower()
        self._chunked = codings.rsplit(",", 1)[-1].strip() == "chunked"
        self.head_done = True
        self._wake()

    def _body(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._body_bytes += len(chunk)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause()
        self._wake()

    def _done(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
        self._wake()

    def _eof(self, exc: BaseException | None) -> None:
        """The connection closed: the end of a body without a length, else an error."""
        if self.head_done and self.content_length is None and not self._chunked and exc is None:
            self._done()
        elif not self.received:
            self._fail(_Stale(str(exc) if exc else "closed by the server"))
        elif not self.head_done:
            self._fail(HeadLost(str(exc) if exc else None))
        else:
            got = (
                f"{self._body_bytes} of {self.content_length} body bytes"
                if self.content_length is not None
                else f"{self._body_bytes} bytes of a chunked body"
            )
            why = f" ({exc})" if exc else ""
            self._fail(TruncatedError(f"connection closed after {got}{why}"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the fetcher ----------------------------------------------------------
    async def _wait(self) -> None:
        """Until the connection brings something; at most ``read_timeout``, and never
        past the request's deadline (``total_timeout``). The client's clock ends a wait
        that runs out (``_Clock``)."""
        now = self._loop.time()
        left = self._deadline - now
        if left <= 0:
            raise TimeoutError(TOTAL_TIMEOUT)
        if left < self._read_timeout:
            self._wait_until, self._wait_bound = self._deadline, None
        else:
            self._wait_until, self._wait_bound = now + self._read_timeout, self._read_timeout
        waiter = self._waiter = self._loop.create_future()
        clock = self._clock
        clock.watch(self)
        try:
            await waiter
        finally:
            clock.waiting.discard(self)
            self._waiter = None

    def _expire(self) -> None:
        """The wait ran out: ``read_timeout`` if that was its bound, else the total
        deadline (the message is made here, not for every wait that ends in time)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            message = (
                TOTAL_TIMEOUT
                if self._wait_bound is None
                else f"no data from the server for {self._wait_bound:g} s (http.read_timeout)"
            )
            waiter.set_exception(TimeoutError(message))

    async def _read_head(self) -> None:
        while not self.head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    def arrived(self, at_most: int) -> list[bytes] | None:
        """The whole body, taken at once, if all of it is in already and it is at most
        ``at_most`` bytes (a small image on a fast network nearly always): no wait,
        no deadline to watch. None otherwise (read it with ``iter_chunked``)."""
        if (
            not self.complete
            or self._error is not None
            or self._paused  # (only past HIGH_WATER, above any spool size)
            or self._buffered > at_most
        ):
            return None
        chunks = list(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return chunks

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """The body in chunks of at most ``n`` bytes, as aiohttp's ``StreamReader``."""
        return _Chunks(self, n)

    async def _next_chunk(self, n: int) -> bytes:
        chunks = self._chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                if len(chunk) > n:
                    chunks.appendleft(chunk[n:])
                    chunk = chunk[:n]
                self._buffered -= len(chunk)
                if self._paused and self._buffered < LOW_WATER:
                    self._paused = False
                    self._connection.resume()
                if self._loop.time() > self._deadline:
                    raise TimeoutError(TOTAL_TIMEOUT)
                return chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                raise StopAsyncIteration
            await self._wait()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._connection.finish(self)


class _Chunks:
    """``Response.iter_chunked``: a plain iterator object, not an async generator (each
    of which the event loop registers in a weak set and finalises: 2-3 us a body)."""

    __slots__ = ("_n", "_response")

    def __init__(self, response: Response, n: int) -> None:
        self._response = response
        self._n = n

    def __aiter__(self) -> _Chunks:
        return self

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        return self._response._next_chunk(self._n)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Clock:
    """The timeouts of a client's waits: one timer that looks at the waiting responses
    every ``interval`` seconds, instead of a timer started and cancelled for every wait
    (2-3 us of a 20 KB download, issue 5). A wait ends at most ``interval`` late:
    a quarter of the shortest timeout, and never more than a quarter of a second.
    The timer stops itself once nothing waits, and nothing else stops it: a request
    still waiting when the client closes must still get its timeout (a ``stop`` at
    close left one waiting for ever, review of issue 5)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, shortest_timeout: float) -> None:
        self.loop = loop
        self.interval = min(0.25, shortest_timeout / 4)
        self.waiting: set[Response] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, response: Response) -> None:
        self.waiting.add(response)
        if self._timer is None:
            self._timer = self.loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self.loop.time()
        for response in [r for r in self.waiting if r._wait_until <= now]:
            response._expire()
        if self.waiting:
            self._timer = self.loop.call_later(self.interval, self._sweep)


#: The longest a request is held before the outbox writes it and those held with it,
#: though the loop's turn is not over (a turn of a busy worker lasts 5-30 ms). On
#: loopback, 2 ms cost 5 % of the steady rate and 5 or 10 ms nothing measurable
#: (6 interleaved pairs each against no bound, issue 5).
HOLD_SECONDS = 0.005


class _Outbox:
    """The requests of one turn of the event loop, written together, at its end or
    once the first has waited HOLD_SECONDS.

    A request written the moment its download asks for it reaches a server that has
    just gone back to sleep, and wakes it for that one request: on loopback and on a
    LAN, where the server answers faster than a worker makes its next request, that
    was nearly every request (nginx slept 14,500-15,300 times for 20,000, issue 5),
    and the wake-up ran in the worker's ``write`` (19 % of its samples). Written
    together, they find the server awake for the rest: nginx slept about half as
    often and used half the CPU, and imgdl's steady rate rose by about a third. The
    turn of a busy worker handles every answer that came in, 5-30 ms of work: a
    request is held for at most HOLD_SECONDS of it, not to add that to a distant
    server's round trip. Its timeouts count from the ``get``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._held: list[tuple[_Connection, bytes]] = []
        self._since = 0.0
        self._turn_end_due = False

    def post(self, connection: _Connection, request: bytes) -> None:
        now = time.monotonic()  # not loop.time(): uvloop's stands still within a turn
        if not self._held:
            self._since = now
            if not self._turn_end_due:
                self._turn_end_due = True
                self.loop.call_soon(self._end_of_turn)
        self._held.append((connection, request))
        if now - self._since >= HOLD_SECONDS:
            self._write_held()

    def _end_of_turn(self) -> None:
        self._turn_end_due = False
        self._write_held()

    def _write_held(self) -> None:
        held, self._held = self._held, []
        for connection, request in held:
            try:
                connection.write(request)
            except Exception:  # none known; the others must go out all the same
                connection.close()  # its response fails as the lost connection says


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks feed its current response."""

    def __init__(self, pool: HttpClient, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: Any = None  # uvloop's transports are not asyncio's classes
        self.parser = httptools.HttpResponseParser(self)
        # As aiohttp parses responses (outside its debug mode): servers that end lines
        # with a bare LF, fold header lines (obs-fold) or put a control character in a
        # header are common enough on the web that refusing them loses images; a NUL in
        # a value is still refused (on_header).
        self.parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.response: Response | None = None
        self.usable = True
        self.idle_since = 0.0
        self._head_bytes = 0  # received while the head is incomplete
        self._reason = b""
        self._raw_headers: list[bytes] = []  # name, value, name, value... as parsed
        self._lines_checked = 0  # of _raw_headers' items, by _long_line
        self._trailer_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        response = self.response
        if response is not None and not response.complete:
            response._eof(exc)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:  # bytes nobody asked for
            self.close()
            return
        response.received = True
        if not response.head_done:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response._fail(ProtocolError("the server switched protocols (Upgrade)"))
            self.close()
        except httptools.HttpParserError as exc:
            if not response.complete:
                response._fail(ProtocolError(f"malformed response: {exc}"))
            self.close()  # after a complete one: more bytes than it said
        if response.head_done or response._error is not None:
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(response, f"response head longer than {MAX_HEAD_BYTES} bytes")
        elif self._long_line():  # a head that comes in many reads: refused as it comes
            self._refuse(response, f"a header line longer than {MAX_HEADER_LINE} bytes")

    # parser callbacks (httptools): they must not raise
    def on_message_begin(self) -> None:
        self._reason = b""
        self._raw_headers = []
        self._lines_checked = 0
        self._trailer_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only collected here: the checks run once per read and once per head
        # (data_received, on_headers_complete), a few us a response less than a call's
        # worth of checks per header (issue 5).
        response = self.response
        if response is not None and response.head_done:  # a chunked body's trailer:
            self._trailer_bytes += len(name) + len(value) + 4  # not kept, only counted
            if self._trailer_bytes > MAX_HEAD_BYTES:
                self._refuse(response, f"trailer fields longer than {MAX_HEAD_BYTES} bytes")
            return
        self._raw_headers += (name, value)

    def _long_line(self) -> bool:
        """Is a header line parsed since the last look longer than MAX_HEADER_LINE?"""
        raw = self._raw_headers
        start, self._lines_checked = self._lines_checked, len(raw) - len(raw) % 2
        return any(
            len(raw[i]) + len(raw[i + 1]) > MAX_HEADER_LINE
            for i in range(start, self._lines_checked, 2)
        )

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        if response._error is not None or response.head_done:  # refused, or a 2nd message
            self.close()
            return
        status = self.parser.get_status_code()
        fields = self._head_fields(response)
        if fields is None:  # refused: no head to hand out
            return
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._raw_headers = []
            self._lines_checked = 0
            return
        response.status = status
        response.keep_alive = self.parser.should_keep_alive()  # reset once the message ends
        response.reason = self._reason.decode("utf-8", "surrogateescape") or None
        response._head_complete(fields)

    def _head_fields(self, response: Response) -> list[str] | None:
        """The head's header lines as text, name and value in turn, OWS after each
        value dropped (RFC 9110 5.5); None, the response failed, for a line longer
        than MAX_HEADER_LINE, a NUL (lenient parsing lets one through; RFC 9110 5.5
        forbids it) or a head longer than MAX_HEAD_BYTES (one that came in a single
        read: data_received caps the others)."""
        raw = self._raw_headers
        if not raw:
            return []
        joined = b"\0".join(raw)
        content = len(joined) - (len(raw) - 1)  # the bytes of the names and values
        if content > MAX_HEADER_LINE and self._long_line():  # (else none can be)
            self._refuse(response, f"a header line longer than {MAX_HEADER_LINE} bytes")
            return None
        if joined.count(b"\0") != len(raw) - 1:  # a NUL of the server's, not a seam
            name = next(raw[i] for i in range(0, len(raw), 2) if b"\0" in raw[i] + raw[i + 1])
            self._refuse(response, f"a NUL byte in the value of header {name!r}")
            return None
        if content + 2 * len(raw) > MAX_HEAD_BYTES:  # ": " and CRLF: 4 bytes a line
            self._refuse(response, f"response head longer than {MAX_HEAD_BYTES} bytes")
            return None
        # one decode for the whole head (a NUL, never part of a UTF-8 sequence, splits
        # it back into its fields)
        fields = joined.decode("utf-8", "surrogateescape").split("\0")
        fields[1::2] = [value.rstrip(" \t") for value in fields[1::2]]
        return fields

    def _refuse(self, response: Response, problem: str) -> None:
        response._fail(ProtocolError(problem))
        self.close()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and response.head_done and not response.complete:
            response._body(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and response.head_done:
            response._done()

    # used by the pool and the response
    def ask(self, response: Response, request: bytes) -> None:
        """Make ``response`` the one this connection reads, and give ``request`` to the
        client's outbox, which writes it soon (``_Outbox``)."""
        self.response = response
        self._head_bytes = 0
        self.pool.outbox.post(self, request)

    def write(self, request: bytes) -> None:
        """Write a request now. A connection closed since it was asked (lost, or closed
        because its deadline passed) writes nothing: its response has failed already
        or fails as the loss says."""
        if self.usable and not self.transport.is_closing():
            self.transport.write(request)

    def pause(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def finish(self, response: Response) -> None:
        """The fetcher is done with ``response``: keep the connection if it can carry
        another request (the whole answer read, keep-alive), else close it."""
        if (
            self.usable
            and response.complete
            and response._error is None
            and not response._paused
            and response.keep_alive
        ):
            self.response = None
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()


def _header_value(name: str, value: str) -> str:
    """A header line's text; refuses what would split the request (CR, LF, NUL)."""
    if any(c in name or c in value for c in "\r\n\0") or ":" in name:
        raise ProtocolError(f"header {name!r} holds a line break or NUL: not sent")
    return f"{name}: {value}\r\n"


class HttpClient:
    """A worker's connections to the servers it fetches from directly."""

    def __init__(self, settings: Settings, policy: NetworkPolicy) -> None:
        http = settings.http
        self.loop = asyncio.get_running_loop()
        self.policy = policy
        self.guard = AddressGuard(policy, http.dns_cache_ttl)
        self.connect_timeout = http.connect_timeout
        self.read_timeout = http.read_timeout
        self.total_timeout = http.total_timeout
        self.clock = _Clock(self.loop, min(http.read_timeout, http.total_timeout))
        self.outbox = _Outbox(self.loop)
        self.max_idle = max(1, http.concurrency)
        self._tls = settings.tls
        self._defaults = {
            "user-agent": ("User-Agent", http.user_agent),
            "accept": ("Accept", "*/*"),
            # identity: we decompress nothing on the fly, so ask for the bytes as they are
            "accept-encoding": ("Accept-Encoding", "identity"),
        }
        self._fixed = "".join(_header_value(n, v) for n, v in self._defaults.values())
        self._heads: dict[tuple[str, str], bytes] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._idle_count = 0

    async def get(self, url: URL, headers: Mapping[str, str]) -> Response:
        """Send ``GET url`` and read the answer's head; the body is read from the response."""
        host = url.raw_host or ""
        port = url.port or (443 if url.scheme == "https" else 80)
        key = (url.scheme, host, port)
        request = self._request(url, headers)
        deadline = self.loop.time() + self.total_timeout
        while True:
            connection = self._take(key)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(key, deadline)
            response = Response(connection, deadline, self.read_timeout)
            connection.ask(response, request)
            try:
                await response._read_head()
            except _Stale as exc:
                connection.close()
                if reused:  # the server dropped it while it was idle: a new one
                    continue
                raise HeadLost(str(exc)) from None
            except BaseException:
                connection.close()
                raise
            return response

    def _request(self, url: URL, headers: Mapping[str, str]) -> bytes:
        if not headers and url.raw_user is None:  # the common request: a cached head
            head = self._heads.get((url.scheme, url.raw_authority))
            if head is None:
                head = self._head_for(url)
            return b"GET " + (url.raw_path_qs or "/").encode("utf-8", "surrogateescape") + head
        return self._request_lines(url, headers)

    def _request_lines(self, url: URL, headers: Mapping[str, str]) -> bytes:
        """The request, built line by line."""
        lines = [f"GET {url.raw_path_qs or '/'} HTTP/1.1\r\n"]
        given = {name.lower() for name in headers}
        if "host" not in given:
            lines.append(f"Host: {url.host_port_subcomponent}\r\n")
        if url.raw_user is not None and "authorization" not in given:
            # credentials in the URL (http://user:password@host/...), sent as aiohttp,
            # curl and wget send them; a host rule's auth comes first
            basic = basic_authorization(url.user or "", url.password or "")
            lines.append(_header_value("Authorization", basic))
        if given & self._defaults.keys():
            lines += [_header_value(n, v) for k, (n, v) in self._defaults.items() if k not in given]
        else:
            lines.append(self._fixed)
        lines += [_header_value(name, value) for name, value in headers.items()]
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _head_for(self, url: URL) -> bytes:
        """The rest of a request with no headers of its own to ``url``'s origin, after
        its path: the same bytes as ``_request_lines`` builds, kept per origin (at
        most HEADS_KEPT origins) for the next request there (issue 5: 1.5 % of a
        worker's CPU instructions went to building them)."""
        if len(self._heads) >= HEADS_KEPT:
            self._heads.clear()
        head = f" HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n{self._fixed}\r\n"
        self._heads[url.scheme, url.raw_authority] = encoded = head.encode(
            "utf-8", "surrogateescape"
        )
        return encoded

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        """An idle connection to ``key`` that can still carry a request, if any."""
        idle = self._idle.get(key)
        if idle is None:
            return None
        now = self.loop.time()
        found = None
        while idle and found is None:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.usable and now - connection.idle_since < KEEPALIVE_SECONDS:
                found = connection
            else:
                connection.close()
        if not idle:  # no empty lists: a crawl of a million hosts keeps none of them
            del self._idle[key]
        return found

    def release(self, connection: _Connection) -> None:
        """Keep ``connection`` for the next request to its origin; at most ``max_idle``
        are kept in all (the one idle longest is closed to make room)."""
        if self._idle_count >= self.max_idle:
            oldest = min((pool[0] for pool in self._idle.values()), key=lambda c: c.idle_since)
            pool = self._idle[oldest.key]
            pool.pop(0)
            if not pool:
                del self._idle[oldest.key]
            self._idle_count -= 1
            oldest.close()
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.key, []).append(connection)
        self._idle_count += 1

    async def _connect(self, key: tuple[str, str, int], deadline: float) -> _Connection:
        scheme, host, port = key
        tls = client_context(self._tls) if scheme == "https" else None
        failures: list[str] = []
        try:  # a DNS server that does not answer must not hold the request past its deadline
            async with asyncio.timeout_at(deadline):
                addresses = await self.guard.addresses(host, port)
        except TimeoutError:
            raise TimeoutError(
                f"resolving {host} took longer than http.total_timeout ({self.total_timeout:g} s)"
            ) from None
        timed_out = False
        for family, address in addresses:  # each in turn, as aiohttp's connector does
            left = deadline - self.loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(min(self.connect_timeout, left)):
                    _, connection = await self.loop.create_connection(
                        lambda: _Connection(self, key),
                        address,
                        port,
                        family=family,
                        ssl=tls,
                        server_hostname=host if tls else None,
                    )
            except TimeoutError:  # a black-holed address (broken IPv6, say): the next one
                failures.append(f"{address}: no answer in {min(self.connect_timeout, left):g} s")
                timed_out = True
                continue
            except ssl.SSLCertVerificationError as exc:
                raise TlsError(
                    f"{host}:{port}: {exc.verify_message or exc} (a private CA? trust it with "
                    "tls.ca_bundle or SSL_CERT_FILE)"
                ) from None
            except ssl.SSLError as exc:
                raise TlsError(f"{host}:{port}: TLS handshake failed: {exc}") from None
            except OSError as exc:
                failures.append(f"{address}: {exc.strerror or exc}")
                continue
            return connection
        tried = "; ".join(failures)
        if deadline - self.loop.time() <= 0:
            raise TimeoutError(
                f"the request took longer than http.total_timeout while connecting to "
                f"{host}:{port} ({tried or 'no address tried'})"
            )
        if timed_out:
            raise TimeoutError(
                f"connecting to {host}:{port} took longer than http.connect_timeout "
                f"({self.connect_timeout:g} s): {tried}"
            )
        raise ConnectError(f"cannot connect to {host}:{port} ({tried})")

    async def close(self) -> None:
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()
        self._idle_count = 0


class ChunkSource(Protocol):
    def iter_chunked(self, n: int) -> AsyncIterator[bytes]: ...


class ResponseLike(Protocol):
    """What the fetcher reads from a response: this client's or aiohttp's."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> ChunkSource: ...

    async def __aenter__(self) -> ResponseLike: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
