"""A small headless-Chromium driver over the DevTools protocol on a pipe (no WebSocket library needed).

Used by the viewer's browser tests, and to take screenshots of pages to look at:
``python -m tests.viz.chromium page.html shot.png``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


class Browser:
    """One headless Chromium with one page; records console errors, exceptions and network requests."""

    def __init__(self, executable: str, width: int = 1400, height: int = 900):
        self._profile = tempfile.TemporaryDirectory(prefix="qviz-chromium-")
        to_browser_read, to_browser_write = os.pipe()
        from_browser_read, from_browser_write = os.pipe()
        # --remote-debugging-pipe talks on fds 3 (commands in) and 4 (replies and events out). The child's
        # ends are first copied above 10 so that putting them on 3 and 4 cannot overwrite one another.
        child_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
        child_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)

        def bind_pipes() -> None:
            os.dup2(child_read, 3)
            os.dup2(child_write, 4)

        self._process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=bind_pipes,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for fd in (child_read, child_write):
            os.close(fd)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._out = to_browser_write
        self._in = from_browser_read
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Network", "Page", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def _call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        return self._call(method, self._session, timeout, **params)

    def open(self, path: Path) -> None:
        self.call("Page.navigate", url=path.resolve().as_uri())

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of a JS expression; a promise is awaited."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 30) -> Any:
        """Poll a JS expression until it is truthy, inside the page so the pipe stays quiet."""
        return self.evaluate(
            f"new Promise((resolve, reject) => {{ const t0 = performance.now(); const poll = () => {{"
            f" let v; try {{ v = ({condition}); }} catch (e) {{ v = null; }}"
            f" if (v) resolve(v); else if (performance.now() - t0 > {timeout * 1000}) reject(new Error("
            f"{json.dumps('timed out waiting for ' + condition)})); else setTimeout(poll, 25); }}; poll(); }})",
            timeout=timeout + 5,
        )

    def screenshot(self, out: Path, full_page: bool = False) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def console_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
        return errors

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self._call("Browser.close", timeout=10)
        except (ConnectionError, TimeoutError, RuntimeError, OSError):
            self._process.kill()
        self._process.wait(timeout=10)
        os.close(self._out)
        os.close(self._in)
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m tests.viz.chromium PAGE.html SHOT.png [SETUP_JS]", file=sys.stderr)
        return 2
    executable = find_chromium()
    if executable is None:
        print("no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with Browser(executable) as browser:
        browser.open(Path(argv[0]))
        browser.wait_for("document.body.dataset.ready")
        if len(argv) == 3:
            browser.evaluate(argv[2])
        browser.screenshot(Path(argv[1]))
        for error in browser.console_errors():
            print("console error:", error, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
