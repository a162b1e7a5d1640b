"""imgdl's own HTTP/1.1 client (httpclient.py), through the real CLI, against servers
that answer the way real ones do and the ways they should not: keep-alive and the
connection a server dropped while it sat idle, bodies without a length, chunked ones,
more bytes than announced, an interim 100, a stalled body, a body that outgrows the
read buffer. Every case is checked against the bytes the server sent."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from downloader.devserver import DevServer
from tests.conftest import (
    FakeTransport,
    clean_env,
    image_files,
    read_head,
    read_manifest,
    run_cli,
    run_in_namespace,
    write_list,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str, int], Awaitable[bool]]
Starter = Callable[..., "ScriptedServer"]


def _png(seed: int, side: int = 40) -> bytes:
    out = io.BytesIO()
    pixels = os.urandom(side * side * 3) if side > 100 else bytes([seed % 256] * side * side * 3)
    Image.frombytes("RGB", (side, side), pixels).save(out, "PNG")
    return out.getvalue()


SMALL = {n: _png(n) for n in range(8)}
BIG = _png(0, side=1400)  # about 5.6 MB: many reads, past the client's 1 MiB buffer


class ScriptedServer:
    """An HTTP/1.1 server on 127.0.0.1 written on raw streams, so that it can say what a
    library would not: each request goes to ``handler(reader, writer, path, n)`` (``n``:
    the request's number on its connection, from 0), which answers and returns whether
    the connection stays open. Counts connections."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.connections = 0
        self.requests = 0
        self.heads: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                for n in range(10_000):
                    head = await reader.readuntil(b"\r\n\r\n")
                    self.requests += 1
                    self.heads.append(head)
                    path = head.split(b" ", 2)[1].decode()
                    if not await self.handler(reader, writer, path, n):
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        async def start() -> None:
            self.server = await asyncio.start_server(serve, self.host, 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(
            target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
            daemon=True,
        ).start()
        assert ready.wait(5)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def stop(self) -> None:
        async def shut() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self.loop)


def _image_of(path: str) -> bytes:
    name = path.rsplit("/", 1)[-1].split(".")[0]
    return BIG if name == "big" else SMALL[int(name) % len(SMALL)]


def _kind_and_body(path: str) -> tuple[str, bytes]:
    """``/KIND/N.png``: the case a handler plays, and the image it sends."""
    return path.split("/")[1], _image_of(path)


def _head(length: int | None, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: image/png", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def scripted() -> Iterator[Callable[[Handler], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(handler: Handler, host: str = "127.0.0.1") -> ScriptedServer:
        servers.append(ScriptedServer(handler, host))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _fetch(
    tmp_path: Path, urls: list[str], *flags: str, **env: str
) -> tuple[dict[str, dict[str, object]], Path, str]:
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--tries", "1", *flags, env=clean_env(**env)
    )
    assert "Traceback" not in result.stderr, result.stderr
    return {str(r["url"]): r for r in read_manifest(out)}, out, result.stderr


def _saved_as_sent(records: dict[str, dict[str, object]], out: Path) -> None:
    for url, record in records.items():
        assert record["status"] == "saved", record
        sent = _image_of(url)
        assert record["sha256"] == hashlib.sha256(sent).hexdigest()
        assert (out / str(record["path"])).read_bytes() == sent


async def _keep_alive(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
) -> bool:
    body = _image_of(path)
    writer.write(_head(len(body)) + body)
    await writer.drain()
    return True


def test_connections_are_kept_and_reused(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    server = scripted(_keep_alive)
    urls = [server.url(f"/{i}.png") for i in range(300)]
    records, out, _ = _fetch(tmp_path, urls, "--processes", "1", "--concurrency", "4")
    assert len(records) == 300
    _saved_as_sent(records, out)
    assert all(b"\r\nAccept: */*\r\nAccept-Encoding: identity\r\n" in h for h in server.heads)
    assert server.requests == 300
    # four downloads at a time over one process: four connections carry all 300
    assert server.connections <= 4, server.connections


def test_a_connection_the_server_dropped_while_idle_is_replaced(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    """The server keeps each connection for one answer, then takes the next request and
    hangs up without a word (as a server whose keep-alive timer ran out does): that
    request goes again on a new connection, and nothing fails."""

    async def one_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
    ) -> bool:
        if n > 0:
            return False
        return await _keep_alive(reader, writer, path, n)

    server = scripted(one_answer)
    urls = [server.url(f"/{i}.png") for i in range(40)]
    records, out, _ = _fetch(tmp_path, urls, "--processes", "1", "--concurrency", "2")
    _saved_as_sent(records, out)
    assert server.requests > 40  # the dropped requests were really sent, and sent again


def test_bodies_framed_every_way_arrive_whole(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    """Until the connection closes (no length, or a Transfer-Encoding whose last coding
    is not chunked), chunked, an interim 100 Continue first, more bytes than
    Content-Length (the connection is not used again), and a body of 5.6 MB that fills
    the client's buffer many times over."""

    async def framed(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
    ) -> bool:
        kind, body = _kind_and_body(path)
        if kind == "close":
            writer.write(_head(None, "Connection: close") + body)
        elif kind == "chunked":
            writer.write(_head(None, "Transfer-Encoding: chunked"))
            for start in range(0, len(body), 1000):
                part = body[start : start + 1000]
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            writer.write(b"0\r\n\r\n")
        elif kind == "continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + _head(len(body)) + body)
        elif kind == "coded":  # chunked is not the last coding: the body runs to the end
            writer.write(_head(None, "Transfer-Encoding: chunked", "Transfer-Encoding: x") + body)
        elif kind == "extra":
            writer.write(_head(len(body)) + body + b"trailing garbage the server should not send")
        else:  # big
            writer.write(_head(len(body)))
            for start in range(0, len(body), 256 * 1024):
                writer.write(body[start : start + 256 * 1024])
                await writer.drain()
        await writer.drain()
        return kind in ("chunked", "continue", "extra", "big")

    server = scripted(framed)
    urls = [
        server.url(f"/{kind}/{i}.png")
        for i in range(6)
        for kind in ("close", "chunked", "continue", "extra", "coded")
    ] + [server.url("/big/big.png")]
    records, out, _ = _fetch(tmp_path, urls, "--processes", "1", "--concurrency", "3")
    assert len(records) == len(urls)
    _saved_as_sent(records, out)
    assert len(image_files(out)) == len(urls)


def test_stalled_cut_and_oversized_answers_get_their_reasons(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    async def bad(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
    ) -> bool:
        body = _image_of("/1.png")
        if path.startswith("/stall"):
            writer.write(_head(len(body)) + body[:100])
            await writer.drain()
            await asyncio.sleep(5)
        elif path.startswith("/cut"):  # half the body, then the connection ends
            writer.write(_head(len(body)) + body[: len(body) // 2])
            await writer.drain()
            return False
        elif path.startswith("/head"):
            writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n")
        else:
            writer.write(_head(len(body)) + body)
        await writer.drain()
        return True

    server = scripted(bad)
    urls = [
        server.url("/stall/1.png"),
        server.url("/head/1.png"),
        server.url("/ok/1.png"),
        server.url("/cut/1.png"),
    ]
    records, out, _ = _fetch(tmp_path, urls, IMGDL_HTTP_READ_TIMEOUT="1", IMGDL_HTTP_MIN_SPEED="0")
    stalled, huge, fine, cut = (records[url] for url in urls)
    size = len(_image_of("/1.png"))
    assert cut["reason"] == "truncated"
    assert f"after {size // 2} of {size} body bytes" in str(cut["error"])  # the counts
    assert stalled["reason"] == "timeout"
    assert "http.read_timeout" in str(stalled["error"])
    assert huge["reason"] == "protocol_error"
    assert "response head longer than" in str(huge["error"])
    assert fine["status"] == "saved"
    assert not list(out.rglob("*.part"))


def test_a_huge_head_in_a_single_read_is_refused() -> None:
    """The head cap holds also when the whole head arrives in one read (the parser then
    completes it before the client could count the bytes still waiting)."""
    from downloader.httperrors import ProtocolError

    read = read_head(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n")
    assert isinstance(read.error, ProtocolError), read.error
    assert "response head longer than" in str(read.error)
    assert read.closed


def test_idle_connections_and_dns_answers_stay_bounded_over_many_hosts(
    scripted: Starter,
) -> None:
    """A crawl touches many hosts once each: the client keeps at most ``concurrency``
    idle connections in all (the oldest closed first) and no trace of a host it holds
    none for; the DNS cache keeps at most CACHED_HOSTS names. Twelve servers on
    127.0.0.2-13 (all loopback), a client with concurrency 3."""
    from yarl import URL

    from downloader import netpolicy
    from downloader.httpclient import HttpClient
    from downloader.netpolicy import AddressGuard, NetworkPolicy
    from downloader.settings import Settings

    servers = [scripted(_keep_alive, f"127.0.0.{n}") for n in range(2, 14)]
    settings = Settings.model_validate({"http": {"concurrency": 3}})
    policy = NetworkPolicy.from_strings(["127.0.0.0/8"])

    async def crawl() -> tuple[int, int, list[int]]:
        client = HttpClient(settings, policy)
        for server in servers:
            for n in range(2):
                response = await client.get(URL(server.url(f"/{n}.png")), {})
                async with response:
                    body = b"".join([c async for c in response.content.iter_chunked(65536)])
                assert body == SMALL[n]
        held = sum(len(pool) for pool in client._idle.values())
        hosts = len(client._idle)
        await client.close()
        return held, hosts, [s.connections for s in servers]

    held, hosts, connections = asyncio.run(crawl())
    assert held == 3 and hosts == 3  # the last three servers' connections, nothing else
    assert connections == [1] * 12  # each server's two requests on one connection

    class Counting(netpolicy.SystemResolver):
        async def resolve(
            self, host: str, port: int = 0, family: object = 0
        ) -> list[dict[str, object]]:
            return [{"host": "127.0.0.1", "port": port, "family": 2}]

    async def resolve_many() -> int:
        guard = AddressGuard(policy, ttl=300, resolver=Counting())
        for n in range(netpolicy.CACHED_HOSTS + 500):
            assert await guard.addresses(f"host{n}.test", 80) == [(2, "127.0.0.1")]
        return len(guard._cache)

    assert asyncio.run(resolve_many()) == netpolicy.CACHED_HOSTS


def test_the_aiohttp_client_is_still_there(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    """``http.client: aiohttp`` sends direct requests through aiohttp's session, as before."""
    server = scripted(_keep_alive)
    urls = [server.url(f"/{i}.png") for i in range(20)]
    records, out, _ = _fetch(tmp_path, urls, IMGDL_HTTP_CLIENT="aiohttp")
    _saved_as_sent(records, out)
    # aiohttp's request head, not the builtin client's (which sends Accept first)
    assert all(b"\r\nAccept-Encoding: identity\r\nAccept: */*" in h for h in server.heads)
    (tmp_path / "x").mkdir()
    listing = write_list(tmp_path / "x" / "u.txt", urls)
    refused = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(tmp_path / "x" / "out"),
        env=clean_env(IMGDL_HTTP_CLIENT="curl"),
    )
    assert refused.returncode == 2
    assert "http.client" in refused.stderr and "Traceback" not in refused.stderr


def test_a_worker_loads_aiohttp_only_for_what_needs_it() -> None:
    """The download path of a worker (worker, shardrun, fetch, the builtin client) does
    not import aiohttp: it is loaded by the first request through a proxy or with
    http.client: aiohttp (transport.py), which saves every worker its start-up cost."""
    code = (
        "import sys, downloader.worker, downloader.shardrun, downloader.fetch;"
        "print('aiohttp' in sys.modules);"
        "import downloader.transport; print('aiohttp' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_a_dns_server_that_never_answers_ends_at_the_total_timeout(client: str) -> None:
    """A name whose DNS server takes every query and answers none: the request ends at
    ``http.total_timeout`` as a timeout, not when the C library's resolver gives up (a
    connection_error seconds later). In a namespace of its own (dns_hang_scenario.py)."""
    result = run_in_namespace("dns_hang_scenario.py", "--http-client", client)
    assert result["queries"] >= 1, result  # the resolver really asked the silent server
    [(reason, error)] = result["records"]
    assert reason == "timeout", result
    if client == "builtin":
        assert "http.total_timeout" in error, error
    assert "Traceback" not in result["stderr_tail"]


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_sloppy_but_common_answers_are_read_as_aiohttp_reads_them(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path, client: str
) -> None:
    """Lines ended by a bare LF, a folded header line (obs-fold, here the X-Robots-Tag
    that must still be obeyed), a chunk size followed by a space and a control
    character in a header value: aiohttp reads them all (its response parser is
    lenient), so the builtin client must too. A NUL in a header value is refused."""

    async def sloppy(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
    ) -> bool:
        kind, body = _kind_and_body(path)
        if kind == "lf":
            writer.write(_head(len(body)).replace(b"\r\n", b"\n") + body)
        elif kind == "fold":
            writer.write(_head(len(body), "X-Robots-Tag: nofollow,", " noai") + body)
        elif kind == "chunk":
            size = f"{len(body):x} \r\n".encode()
            writer.write(_head(None, "Transfer-Encoding: chunked") + size + body + b"\r\n0\r\n\r\n")
        elif kind == "ctl":
            writer.write(_head(len(body), "X-Served-By: cache\x01edge") + body)
        else:  # nul
            writer.write(_head(len(body), "X-Served-By: cache\x00edge") + body)
        await writer.drain()
        return kind != "lf"  # after a bare-LF answer, hang up: no keep-alive to trust

    server = scripted(sloppy)
    urls = {
        kind: server.url(f"/{kind}/{i}.png")
        for i, kind in enumerate(("lf", "fold", "chunk", "ctl", "nul"))
    }
    records, out, _ = _fetch(tmp_path, list(urls.values()), IMGDL_HTTP_CLIENT=client)
    fold = records.pop(urls["fold"])
    assert (fold["status"], fold["reason"]) == ("skipped", "opted_out"), fold
    assert "noai" in str(fold["error"])
    nul = records.pop(urls["nul"])
    assert (nul["status"], nul["reason"]) == ("failed", "protocol_error"), nul
    _saved_as_sent(records, out)


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_credentials_in_the_url_are_sent(server: DevServer, tmp_path: Path, client: str) -> None:
    """``http://user:password@host/...``: the credentials go as basic auth (as aiohttp,
    curl and wget send them), percent-escapes decoded; a wrong password gets the 401."""
    server.basic_auth = ("dev", "p@ss:w rd")
    user, password = server.basic_auth
    port = server.url.rsplit(":", 1)[1]
    good = f"http://{user}:{quote(password, safe='')}@127.0.0.1:{port}/auth/basic/1"
    bad = f"http://{user}:wrong@127.0.0.1:{port}/auth/basic/2"
    records, out, _ = _fetch(tmp_path, [good, bad], IMGDL_HTTP_CLIENT=client)
    assert records[good]["status"] == "saved", records[good]
    assert (out / str(records[good]["path"])).is_file()
    assert (records[bad]["reason"], records[bad]["http_status"]) == ("http_error", 401)


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_an_address_that_never_answers_is_passed_over_for_the_next(client: str) -> None:
    """A name with two addresses whose first never answers a connection (a full
    backlog drops the SYN): after http.connect_timeout the next address is tried and
    the image saved, as aiohttp's connector does (two_address_scenario.py)."""
    result = run_in_namespace("two_address_scenario.py", "--http-client", client)
    assert result["order"] == ["127.0.0.1", "127.0.0.2"], result  # the silent one first
    [(status, reason, error)] = result["records"]
    assert status == "saved", (reason, error)
    assert "Traceback" not in result["stderr_tail"]


def test_closing_the_client_does_not_strand_a_wait_in_progress(server: DevServer) -> None:
    """The client's one timer ends every wait; close() stopped it, and a request that
    was waiting for its head waited for ever instead of failing after http.read_timeout
    (review of issue 5)."""
    from yarl import URL

    from downloader.httpclient import HttpClient
    from downloader.netpolicy import NetworkPolicy
    from downloader.settings import load

    async def main() -> str:
        env = {"IMGDL_NETWORK_ALLOW": "[127.0.0.0/8]", "IMGDL_HTTP__READ_TIMEOUT": "0.5"}
        client = HttpClient(load(env=env).settings, NetworkPolicy.from_strings(["127.0.0.0/8"]))
        task = asyncio.create_task(client.get(URL(f"{server.url}/hang/1"), {}))
        await asyncio.sleep(0.2)
        await client.close()
        with pytest.raises(TimeoutError) as caught:
            await asyncio.wait_for(task, 5)  # the test's own bound: an empty message = hung
        return str(caught.value)

    assert "http.read_timeout" in asyncio.run(main())


def test_a_body_all_in_at_once_gets_every_check_the_streamed_one_gets(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    """A small body that is all in when its head is read is taken in one piece, not
    read chunk by chunk (issue 5); it is held to the same checks: the size cap with no
    Content-Length to refuse it early, the list's expected hash, the sniffed type,
    and an image sent in two writes (read in pieces) is saved the same as one in one."""
    image = SMALL[1]
    chunked = f"{len(image):x}\r\n".encode() + image + b"\r\n0\r\n\r\n"

    async def whole(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
    ) -> bool:
        kind = path.split("/")[1]
        if kind == "chunked":  # no Content-Length: only the cap on what came stops it
            writer.write(_head(None, "Transfer-Encoding: chunked") + chunked)
        elif kind == "text":
            text = b"not an image, only a few words about one. " * 2
            writer.write(_head(len(text)) + text)
        elif kind == "split":  # the head, then the body a moment later
            writer.write(_head(len(image)))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(image)
        else:
            writer.write(_head(len(image)) + image)
        await writer.drain()
        return True

    server = scripted(whole)
    over = server.url("/chunked/1.png")
    records, out, _ = _fetch(tmp_path, [over], IMGDL_VALIDATE_MAX_BYTES=str(len(image) - 1))
    assert (records[over]["status"], records[over]["reason"]) == ("failed", "too_large")
    assert f"max_bytes {len(image) - 1}" in str(records[over]["error"])
    assert not image_files(out)

    kinds = ("chunked", "text", "split", "plain", "wrong")
    urls = {k: server.url(f"/{k}/1.png") for k in kinds}
    listing = tmp_path / "hashed.csv"
    sha = hashlib.sha256(image).hexdigest()
    rows = [f"{u},sha256:{'0' * 64 if k == 'wrong' else sha}" for k, u in urls.items()]
    listing.write_text("url,sha\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out2"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--tries", "1",
        env=clean_env(IMGDL_INPUT__HASH_COLUMN="sha"),
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    got = {str(r["url"]): r for r in read_manifest(out)}
    assert got[urls["wrong"]]["reason"] == "hash_mismatch", got[urls["wrong"]]
    assert got[urls["text"]]["reason"] == "not_an_image", got[urls["text"]]
    for kind in ("chunked", "split", "plain"):
        record = got[urls[kind]]
        assert record["status"] == "saved", record
        assert record["sha256"] == sha and record["bytes"] == len(image)
        assert (out / str(record["path"])).read_bytes() == image


def test_answers_past_the_one_asked_for_or_after_a_refusal_are_not_read_as_it(
    scripted: Callable[[Handler], ScriptedServer], tmp_path: Path
) -> None:
    """Review of issue 5: a refused head followed in the same read by another answer (a
    redirect here) fails the request, the other answer is not taken for it; a second
    whole answer right after the body is not added to it; a header line past the cap is
    refused as it comes, not once a head that never ends has ended; trailer fields of a
    chunked body are bounded; a body all in at once is sniffed on its first 64 KiB, as
    one read in pieces is."""
    image = SMALL[2]
    text = b"plain text, not an image at all. " * 3000  # about 100 KB

    async def odd(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, n: int
    ) -> bool:
        kind = path.split("/")[1]
        if kind == "refused-then-redirect":
            writer.write(
                b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"
                b"HTTP/1.1 302 Found\r\nLocation: /plain/2.png\r\nContent-Length: 0\r\n\r\n"
            )
        elif kind == "two-answers":
            writer.write(_head(len(image)) + image + _head(5) + b"AFTER")
        elif kind == "long-line":  # a line past the cap, a next one begun, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 17_000 + b"\r\nX-Next")
            await writer.drain()
            await asyncio.sleep(60)
        elif kind == "trailers":
            trailer = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 100) for i in range(1_000))
            size = f"{len(image):x}\r\n".encode()
            writer.write(
                _head(None, "Transfer-Encoding: chunked") + size + image + b"\r\n0\r\n" + trailer
            )
            writer.write(b"\r\n")
        elif kind == "text":
            size = f"{len(text):x}\r\n".encode()
            writer.write(_head(None, "Transfer-Encoding: chunked") + size + text + b"\r\n0\r\n\r\n")
        else:
            writer.write(_head(len(image)) + image)
        await writer.drain()
        return True

    server = scripted(odd)
    kinds = ("refused-then-redirect", "two-answers", "long-line", "trailers", "text")
    urls = {k: server.url(f"/{k}/1.png") for k in kinds}
    records, out, _ = _fetch(
        tmp_path,
        list(urls.values()),
        IMGDL_HTTP__READ_TIMEOUT="60",
        IMGDL_VALIDATE__MAX_BYTES="70000",
    )
    refused = records[urls["refused-then-redirect"]]
    assert (refused["status"], refused["reason"]) == ("failed", "protocol_error"), refused
    assert "NUL byte" in str(refused["error"])
    two = records[urls["two-answers"]]
    assert two["status"] == "saved" and two["bytes"] == len(image), two
    assert (out / str(two["path"])).read_bytes() == image
    long_line = records[urls["long-line"]]
    assert long_line["reason"] == "protocol_error", long_line
    assert "header line longer than" in str(long_line["error"])
    trailers = records[urls["trailers"]]
    assert trailers["reason"] == "protocol_error", trailers
    assert "trailer fields longer than" in str(trailers["error"])
    assert records[urls["text"]]["reason"] == "not_an_image", records[urls["text"]]
    assert [p.name for p in image_files(out)] == [Path(str(two["path"])).name]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_requests_of_one_loop_turn_go_out_together_at_its_end(loop: str) -> None:
    """Written the moment each download asked, every request woke a server that had just
    gone back to sleep (issue 5: nginx slept 14,500-15,300 times for 20,000 requests);
    the requests of one turn of the event loop are written together once it ends, in
    the order asked, or as soon as the first has waited HOLD_SECONDS; a connection
    closed before then gets nothing written. Under both loops: workers run uvloop."""
    import time

    import uvloop

    from downloader.httpclient import HOLD_SECONDS, HttpClient, Response, _Connection
    from downloader.netpolicy import NetworkPolicy
    from downloader.settings import Settings

    written: list[tuple[object, bytes]] = []

    async def scenario() -> None:
        client = HttpClient(Settings(), NetworkPolicy())
        connections = []
        for number in range(3):
            connection = _Connection(client, ("http", "example.test", 80))
            connection.connection_made(FakeTransport(written, number))  # type: ignore[arg-type]
            connections.append(connection)

        def ask(number: int) -> None:
            connection = connections[number]
            connection.ask(Response(connection, client.loop.time() + 5, 5), b"GET /%d" % number)

        for number in (2, 0, 1):
            ask(number)
        assert written == []  # nothing yet: the turn is not over
        await asyncio.sleep(0)  # the turn ends
        assert written == [(2, b"GET /2"), (0, b"GET /0"), (1, b"GET /1")]

        ask(0)
        ask(1)
        connections[1].close()  # lost, or past its deadline, before the turn ended
        await asyncio.sleep(0)
        assert written[3:] == [(0, b"GET /0")]
        await asyncio.sleep(0)
        assert written[3:] == [(0, b"GET /0")]  # and nothing later either

        ask(2)
        time.sleep(HOLD_SECONDS * 1.5)  # a long turn: the first request has waited enough
        ask(0)
        assert written[4:] == [(2, b"GET /2"), (0, b"GET /0")]  # out before the turn ends
        await asyncio.sleep(0)
        assert written[4:] == [(2, b"GET /2"), (0, b"GET /0")]  # once

    if loop == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())
