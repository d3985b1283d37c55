"""Headless Chromium over the DevTools protocol, and the devserver's REST API: what
`scripts/screenshots.py` and the browser tests (tests/ui) drive the Airflow UI with.

No Selenium or Playwright: Chromium's `--remote-debugging-port` and a websocket are enough to
navigate, wait for text, click, evaluate JavaScript and take screenshots.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from devtools.devserver import DevServer

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1440, 900
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(RuntimeError):
    """Chromium did not start, or a page did not show what it must show."""


def find_chromium() -> str | None:
    """The Chromium binary on PATH, or None."""
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Page:
    """One Chromium tab, driven over the Chrome DevTools Protocol."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.last_id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events in between are skipped)."""
        self.last_id += 1
        self.connection.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.connection.recv(timeout=60))
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Wait until a JavaScript expression is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression}")
            time.sleep(0.3)
        return value

    def wait_for_text(self, *texts: str, timeout: float = 60.0) -> None:
        """Wait until the page shows every one of `texts`, then let rendering settle."""
        probe = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!window.crmSyncOldPage && !!document.body && {probe}"):
            if time.monotonic() > deadline:
                raise BrowserError(f"the page never showed {texts}")
            time.sleep(0.3)
        time.sleep(1.5)

    def resize(self, width: int, height: int) -> None:
        """A `width` x `height` window."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def open(self, url: str, *texts: str, width: int = WIDTH, height: int = HEIGHT) -> None:
        """Navigate to `url` in a `width` x `height` window and wait for `texts`."""
        self.resize(width, height)
        # A mark on the old document: its text must not pass for the new page's.
        self.evaluate("window.crmSyncOldPage = true")
        self.send("Page.navigate", url=url)
        self.wait_for_text(*texts)

    def click(self, selector: str) -> None:
        """Click the first element matching a CSS selector."""
        if not self.evaluate(
            f"(e => e ? (e.click(), true) : false)(document.querySelector({json.dumps(selector)}))"
        ):
            raise BrowserError(f"nothing to click at {selector}")

    def drag(self, selector: str, dx: int) -> None:
        """Drag the first element matching a CSS selector `dx` pixels to the right."""
        x, y = self.evaluate(
            f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
            f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())"
        )
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left")
        for step in range(1, 11):
            self.send(
                "Input.dispatchMouseEvent",
                type="mouseMoved",
                x=x + dx * step / 10,
                y=y,
                button="left",
                buttons=1,
            )
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x + dx, y=y, button="left")
        # Park the pointer where it shows no tooltip.
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=HEIGHT - 1)
        time.sleep(1.5)

    def save(self, path: Path, full_page: bool = False) -> None:
        """Write a PNG of the window (`full_page`: of the whole page, however tall)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"  saved {shown}", flush=True)


@contextmanager
def chromium(binary: str, cookie: dict[str, str]) -> Iterator[Page]:
    """A headless Chromium with one tab that carries `cookie`."""
    from websockets.sync.client import connect

    port = free_port()
    with tempfile.TemporaryDirectory(
        prefix="crm-sync-chromium-", ignore_cleanup_errors=True
    ) as profile:
        process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                    tab = next(t for t in targets if t["type"] == "page")
                    break
                except (requests.RequestException, StopIteration):
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise BrowserError("Chromium did not start") from None
                    time.sleep(0.3)
            with connect(tab["webSocketDebuggerUrl"], max_size=None) as connection:
                page = Page(connection)
                page.send("Network.setCookie", **cookie)
                yield page
        finally:
            process.terminate()
            process.wait(timeout=30)


class Airflow:
    """The devserver's REST API as one of its users (by default the admin)."""

    def __init__(self, server: DevServer, user: str | None = None) -> None:
        self.url = server.api_url
        self.token = server.token(user)

    @property
    def cookie(self) -> dict[str, str]:
        """The UI's `_token` cookie for this user, as `chromium()` takes it."""
        return {"name": "_token", "value": self.token, "url": self.url, "path": "/"}

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call `/api/v2/<path>` and return its JSON."""
        response = requests.request(
            method,
            f"{self.url}/api/v2/{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
            **kwargs,
        )
        response.raise_for_status()
        return response.json()

    def run(self, dag_id: str, conf: dict[str, Any] | None = None, timeout: float = 600) -> str:
        """Unpause `dag_id`, trigger it, wait for success; returns the run id."""
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})
        run_id = self.api(
            "POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}
        )["dag_run_id"]
        deadline = time.monotonic() + timeout
        while (state := self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"]) not in (
            "success",
            "failed",
        ):
            if time.monotonic() > deadline:
                raise BrowserError(f"{dag_id} run {run_id} still {state} after {timeout} s")
            time.sleep(2)
        if state != "success":
            raise BrowserError(f"{dag_id} run {run_id} failed; see the task logs in the UI")
        print(f"  {dag_id}: {run_id} succeeded", flush=True)
        return str(run_id)
