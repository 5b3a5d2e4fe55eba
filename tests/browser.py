"""Headless Chromium for page tests, driven over the DevTools protocol through `--remote-debugging-pipe`.

No Python package is needed: Chromium reads JSON commands (each ended by a NUL byte) on fd 3 and writes replies
and events on fd 4. The browser is Debian's `chromium` (`.ci/run` installs it), started with the flags that keep
it off the network and out of the user's profile, and a fresh profile folder per instance.

    with Chromium(tmp_path / "profile") as browser:
        page = browser.open("http://127.0.0.1:8000/")
        page.wait_for("document.images.length > 0")
        page.evaluate("document.querySelector('button').click()")
        page.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--remote-debugging-pipe")
INSTALL_HINT = "apt-get update && apt-get install -y chromium"


def find_chromium() -> str | None:
    """The Chromium executable on PATH (Debian: `chromium`), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """The browser died, timed out or answered a command with an error."""


class Chromium:
    """One headless Chromium process with its own profile folder; use as a context manager."""

    def __init__(self, profile: Path, executable: str | None = None, timeout: float = 30.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError(f"no chromium on PATH; install it: {INSTALL_HINT}")
        profile.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

        def wire() -> None:  # in the child: the protocol's fixed descriptors 3 (commands) and 4 (replies)
            high_r, high_w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=wire, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the browser (its process only) and close the pipes."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its `result` (events that arrive meanwhile go to `events`)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no answer from chromium in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise BrowserError(f"chromium exited (code {self.process.poll()})")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> Page:
        """A new tab at `url`, attached for commands; returns once the page has loaded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        self.send("Page.enable", session=session)
        page.goto(url)
        return page


class Page:
    """One attached tab."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def goto(self, url: str) -> None:
        """Navigate and wait until the document has finished loading."""
        self.browser.send("Page.navigate", {"url": url}, self.session)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); BrowserError on a JS exception."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                        "returnByValue": True}, self.session)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression!r}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float | None = None) -> None:
        """Poll a JavaScript condition until it is true (BrowserError after `timeout` seconds)."""
        deadline = time.monotonic() + (timeout or self.browser.timeout)
        while time.monotonic() < deadline:
            try:
                if self.evaluate(f"Boolean({condition})"):
                    return
            except BrowserError:
                pass  # the page may be between documents
            time.sleep(0.05)
        raise BrowserError(f"timed out waiting for {condition!r}")

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the visible page."""
        data = self.browser.send("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
