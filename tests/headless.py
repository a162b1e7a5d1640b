"""A headless Chromium driven over the DevTools protocol: open a local page, collect
its errors, count elements, take a screenshot.

No driver package: Chromium speaks the protocol on a websocket it names on
stderr, and aiohttp (already a dependency) has the client. Every wait is
bounded and the browser is killed in ``finally``. The browser is kept off the
network by the flags below; the page under test is a local file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

#: Debian's package name first; the others are what other systems call it.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # we run as root in CI
    "--remote-debugging-port=0",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,2000",
)


def find_browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def install_browser(timeout: float = 600) -> tuple[str | None, str]:
    """Find Chromium, else install Debian's package (root with apt-get only).

    Returns (the browser's path or None, what was done or why not).
    """
    found = find_browser()
    if found:
        return found, f"found {found}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "no chromium on PATH, and no apt-get as root to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
    ]
    for step in steps:
        try:
            done = subprocess.run(
                step, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return None, f"{' '.join(step)} took more than {timeout:.0f} s"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return None, f"{' '.join(step)} failed: {' '.join(tail)}"
    found = find_browser()
    return (
        found,
        f"installed {found}" if found else "apt-get installed chromium but it is not on PATH",
    )


@dataclasses.dataclass
class PageCheck:
    """What the browser saw of a page."""

    errors: list[str]
    #: Every URL the page asked for, the page itself included.
    requests: list[str]
    svg_count: int
    title: str
    screenshot: bytes


class _DevTools:
    """One websocket to the browser; one page session attached to a target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(
        self, method: str, session: str | None = None, timeout: float = 15, **params: Any
    ) -> dict[str, Any]:
        """Send a command and wait for its answer; events that arrive meanwhile are kept."""
        ident = next(self.ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        async with asyncio.timeout(timeout):
            while True:
                reply = await self._receive()
                if reply.get("id") == ident:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result", {})
                    return result

    async def wait_for(self, method: str, timeout: float) -> dict[str, Any]:
        """The first event called ``method`` (kept ones included)."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if event.get("method") == method:
                        return event
                await self._receive()

    async def drain(self, seconds: float) -> None:
        """Collect events for a while (late console errors, exceptions)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    await self._receive()

    async def _receive(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"DevTools connection ended: {msg.type!r}")
        data: dict[str, Any] = json.loads(msg.data)
        if "method" in data:
            self.events.append(data)
        return data


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Every error the page reported: exceptions, log entries, console messages."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(f"console: {params.get('args')}")
    return found


async def _read_ws_url(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stderr is not None
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stderr.readline()
            if not line:
                raise RuntimeError(f"browser exited before DevTools listened: {b''.join(seen)!r}")
            seen.append(line)
            found = _LISTENING.search(line)
            if found:
                return found.group(1).decode()


async def _check(browser: str, page: Path, settle: float) -> PageCheck:
    with tempfile.TemporaryDirectory(prefix="imgdl-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            ws_url = await _read_ws_url(proc, 30)
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(
                    ws_url, max_msg_size=64 << 20, timeout=aiohttp.ClientWSTimeout(ws_close=5)
                ) as ws,
            ):
                tools = _DevTools(ws)
                target = await tools.call("Target.createTarget", url="about:blank")
                attached = await tools.call(
                    "Target.attachToTarget", targetId=target["targetId"], flatten=True
                )
                session = attached["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await tools.call(f"{domain}.enable", session)
                await tools.call("Page.navigate", session, url=page.resolve().as_uri())
                await tools.wait_for("Page.loadEventFired", 30)
                await tools.drain(settle)
                svg = await tools.call(
                    "Runtime.evaluate",
                    session,
                    expression="document.querySelectorAll('svg').length",
                    returnByValue=True,
                )
                title = await tools.call(
                    "Runtime.evaluate", session, expression="document.title", returnByValue=True
                )
                shot = await tools.call(
                    "Page.captureScreenshot",
                    session,
                    timeout=30,
                    format="png",
                    captureBeyondViewport=True,
                )
                return PageCheck(
                    errors=_errors(tools.events),
                    requests=[
                        e["params"]["request"]["url"]
                        for e in tools.events
                        if e.get("method") == "Network.requestWillBeSent"
                    ],
                    svg_count=int(svg["result"]["value"]),
                    title=str(title["result"]["value"]),
                    screenshot=base64.b64decode(shot["data"]),
                )
        finally:
            if proc.returncode is None:
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)


def check_page(browser: str, page: Path, settle: float = 0.5, timeout: float = 90) -> PageCheck:
    """Open ``page`` (a local file) in headless ``browser`` and report what it saw."""

    async def bounded() -> PageCheck:
        return await asyncio.wait_for(_check(browser, page, settle), timeout)

    return asyncio.run(bounded())
