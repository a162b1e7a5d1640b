"""A TCP server on 127.0.0.1 that answers with raw bytes: for responses no HTTP library sends."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading


class RawServer:
    """A TCP server on 127.0.0.1 that answers every request with the same raw bytes."""

    def __init__(self, response: bytes, reset: bool = False) -> None:
        """Answer every request with ``response``; with ``reset``, then send a TCP reset."""
        self.response = response
        self.reset = reset
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.response)
            await writer.drain()
            sock = writer.get_extra_info("socket")
            if self.reset and sock is not None:  # linger 0: close() sends RST
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()

        async def start() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(
            target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
            daemon=True,
        ).start()
        ready.wait(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
