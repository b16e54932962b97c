"""Open a page in headless Chromium and report what a reader would see: images, errors, a screenshot.

Used by the test suite and ``make report-screenshot``; no third-party package is needed. Chromium
is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so no port is opened and nothing but the page
is loaded.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["BrowserError", "find_chromium", "inspect_page"]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--no-default-browser-check")


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer."""


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary (``$CHROMIUM`` first), or None.

    Raises BrowserError when ``$CHROMIUM`` names no executable: the page would otherwise be inspected
    by another browser found on the PATH (or none) while the caller asked for that one."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise BrowserError(f"CHROMIUM={explicit!r} is not an executable: point it at a Chromium/Chrome binary, "
                               "or unset it to search the PATH")
        return found
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    def __init__(self, to_browser: int, from_browser: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = to_browser, from_browser, deadline
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str | None = None) -> dict[str, Any]:
        for i, event in enumerate(self.events):
            if event.get("method") == method and (session is None or event.get("sessionId") == session):
                return self.events[i]
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method and (session is None or event.get("sessionId") == session):
                return event

    def _read(self) -> dict[str, Any]:
        import select

        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


INSPECT = """(() => {
  const images = Array.from(document.images).map(img => ({
    src: img.currentSrc.slice(0, 40), alt: img.alt, complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight}));
  return JSON.stringify({title: document.title, images: images,
    text: document.body ? document.body.innerText.length : 0,
    height: document.documentElement.scrollHeight,
    external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => u && !u.startsWith('data:') && !u.startsWith('#'))});
})()"""


def inspect_page(path: str | os.PathLike, *, screenshot: str | os.PathLike | None = None, width: int = 1280,
                 height: int = 900, full_page: bool = True, timeout: float = 90.0,
                 chromium: str | None = None) -> dict[str, Any]:
    """Load the local file ``path`` in headless Chromium and return
    ``{"title", "images": [{"src", "alt", "complete", "width", "height"}], "broken": [...],
    "errors": [console errors, uncaught exceptions, failed loads], "external": [...], "text", "height"}``;
    with ``screenshot``, also write a PNG of the page (the whole page with ``full_page``).
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise BrowserError("no Chromium found (install the chromium package, or set CHROMIUM=/path/to/chrome)")
    url = Path(path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="genkernel-chromium-")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def child_fds() -> None:  # the browser reads fd 3 and writes fd 4 (copies above 9 first: no clobbering)
        import fcntl

        high_r, high_w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    command = [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
               "about:blank"]
    # stderr goes to a file: a pipe nobody reads fills (64 kB of log lines) and blocks the browser
    # until the timeout; the file's tail explains a browser that failed to start.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                               preexec_fn=child_fds, pass_fds=(3, 4, to_browser_r, from_browser_w))
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(to_browser_w, from_browser_r, time.monotonic() + timeout)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            pipe.send(domain, session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_for("Page.loadEventFired", session)
        result = pipe.send("Runtime.evaluate", {"expression": INSPECT, "returnByValue": True}, session=session)
        page = json.loads(result["result"]["value"])
        if screenshot is not None:
            params: dict[str, Any] = {"format": "png"}
            if full_page:
                params["captureBeyondViewport"] = True
                params["clip"] = {"x": 0, "y": 0, "width": width, "height": max(height, int(page["height"])), "scale": 1}
            data = pipe.send("Page.captureScreenshot", params, session=session)["data"]
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            Path(screenshot).write_bytes(base64.b64decode(data))
        errors = []
        for event in pipe.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params.get("exceptionDetails", {}).get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", "error"))
            elif method == "Network.loadingFailed":
                errors.append(f"failed to load: {params.get('errorText')}")
        page["errors"] = errors
        page["broken"] = [img for img in page["images"] if not img["complete"] or img["width"] == 0]
        try:
            pipe.send("Browser.close")
        except BrowserError:
            pass
        return page
    except BrowserError as error:
        log.seek(0)
        said = log.read().decode(errors="replace").strip()[-2000:]
        if not said:
            raise
        raise BrowserError(f"{error}; {Path(binary).name} wrote: {said}") from error
    finally:
        os.close(to_browser_w)
        os.close(from_browser_r)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
