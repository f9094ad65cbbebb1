"""A real headless Chromium driven over the DevTools protocol, for tests of the pages senmon serves.

Debian's `chromium` package (scripts/setup.sh installs it), started with `--remote-debugging-port=0`; the
port it picked is read from `DevToolsActivePort` in its profile directory. The protocol client is
`websockets`' synchronous one (installed with Ray Serve's uvicorn[standard]). The browser records
everything the page reports as an error: console.error / console.assert calls, uncaught exceptions, and the
browser's own log entries of level error (failed loads, Content-Security-Policy violations).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []) + list(CANDIDATES):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """`with Chromium() as browser: browser.open(url); browser.wait_for("js expression"); browser.screenshot(path)`"""

    def __init__(self, width: int = 1280, height: int = 1000, timeout_s: float = 30.0):
        self.binary = find_chromium()
        if self.binary is None:
            raise RuntimeError("no Chromium found (looked for chromium, chromium-browser, google-chrome and $CHROMIUM); "
                               "scripts/setup.sh installs Debian's chromium package")
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self.errors: list[str] = []
        self.console: list[str] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> "Chromium":
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="senmon-chromium-")
        self._stack = contextlib.ExitStack()
        args = [self.binary, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync", "--no-proxy-server",
                "--disable-component-update", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port_file = Path(self.profile) / "DevToolsActivePort"
            deadline = time.monotonic() + self.timeout_s
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Chromium did not start: {self.process.stderr.read().decode()[-2000:]}")
                time.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
            self.socket = self._stack.enter_context(
                connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=self.timeout_s))
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    # ----------------------------------------------------------------- the protocol

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params") or {}
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
            if params.get("type") in ("error", "assert"):
                self.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            exception = details.get("exception") or {}
            self.errors.append(f"uncaught: {exception.get('description') or details.get('text')}")
        elif method == "Log.entryAdded":
            entry = params.get("entry") or {}
            self.console.append(f"{entry.get('level')} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
            if entry.get("level") == "error":
                self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())

    def call(self, method: str, **params) -> dict:
        ident = next(self._ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result") or {}
            self._event(message)

    def pump(self, seconds: float) -> None:
        """Take the events that arrive within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._event(json.loads(self.socket.recv(timeout=left)))
            except TimeoutError:
                return

    # ----------------------------------------------------------------- what tests use

    def open(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None):
        """Evaluate `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is between documents
                value = None
            if value:
                return value
            self.pump(0.1)
        raise TimeoutError(f"not true after {timeout_s or self.timeout_s} s: {expression}; console: {self.console}")

    def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the window) as PNG."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=max(height, self.height),
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
