"""A real SOCKS5 server on 127.0.0.1 for the tests, which records every connection.

RFC 1928 CONNECT only, with no authentication or, when ``credentials`` are given,
username/password (RFC 1929) only. Each CONNECT is recorded (the target as the
client sent it: an address for socks5://, a name for socks5h://) before the
server connects anywhere, so a request it cannot forward still counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import struct

from tests.fwdproxy import LoopServer, pipe_both


@dataclasses.dataclass(frozen=True)
class Connect:
    host: str
    port: int
    by_name: bool  # the client sent a name (ATYP 3): the proxy resolves it
    username: str | None


class SocksServer(LoopServer):
    """``with SocksServer(("u", "p")) as socks:`` ... ``socks.url()``, ``socks.seen``."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.credentials = credentials
        self.seen: list[Connect] = []
        self.refused_auth = 0

    def url(self, scheme: str = "socks5") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        want = 2 if self.credentials else 0
        if version != 5 or want not in methods:
            writer.write(b"\x05\xff")
            return
        writer.write(bytes([5, want]))
        username = None
        if self.credentials:
            _, ulen = await reader.readexactly(2)
            username = (await reader.readexactly(ulen)).decode()
            (plen,) = await reader.readexactly(1)
            password = (await reader.readexactly(plen)).decode()
            if (username, password) != self.credentials:
                self.refused_auth += 1
                writer.write(b"\x01\x01")
                return
            writer.write(b"\x01\x00")
        _, command, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        else:
            (length,) = await reader.readexactly(1)
            host = (await reader.readexactly(length)).decode()
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        self.seen.append(Connect(host, port, atyp == 3, username))
        if command != 1:  # CONNECT only
            writer.write(b"\x05\x07\x00\x01" + bytes(6))
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await writer.drain()
        await pipe_both(reader, writer, up_reader, up_writer)
