"""Screenshots of the Airflow UI for docs/img/, taken in headless Chromium from a fresh `make up`.

Starts the devserver (`devtools.devserver`) in a throw-away home on free ports, runs the initial
sync and both direction DAGs against the seeded sandbox, then drives Chromium over the DevTools
protocol: logged in through the UI's `_token` cookie (a JWT from `POST /auth/token`), it opens each
page, waits for what the shot must show, and saves a PNG.

Usage: `python scripts/screenshots.py [--out docs/img]` (`make screenshots`). Needs a Chromium
(`apt-get install -y chromium`); `make test` does not.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from devtools.devserver import DevServer, DevServerOptions

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1440, 900
FORM_HEIGHT = 1160
GRID_WIDTH = 1600
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip
BACKFILL = "initial_sync_backfill"
TO_AC = "dynamics365_to_activecampaign"
TO_D365 = "activecampaign_to_dynamics365"


class ScreenshotError(RuntimeError):
    """A page did not show what its screenshot must show."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
                    raise ScreenshotError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    def wait_for_text(self, *texts: str, timeout: float = 60.0) -> None:
        """Wait until the page shows every one of `texts`, then let rendering settle."""
        probe = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!window.crmSyncOldPage && !!document.body && {probe}"):
            if time.monotonic() > deadline:
                raise ScreenshotError(f"the page never showed {texts}")
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
            raise ScreenshotError(f"nothing to click at {selector}")

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

    def save(self, path: Path) -> None:
        """Write a PNG of the window."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"  saved {shown}", flush=True)


@contextmanager
def chromium(binary: str, cookie: dict[str, str]) -> Iterator[Page]:
    """A headless Chromium with one tab that carries `cookie`."""
    from websockets.sync.client import connect

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="crm-sync-chromium-") as profile:
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
                        raise ScreenshotError("Chromium did not start") from None
                    time.sleep(0.3)
            with connect(tab["webSocketDebuggerUrl"], max_size=None) as connection:
                page = Page(connection)
                page.send("Network.setCookie", **cookie)
                yield page
        finally:
            process.terminate()
            process.wait(timeout=30)


class Airflow:
    """The devserver's REST API as the admin user."""

    def __init__(self, server: DevServer) -> None:
        self.url = server.api_url
        self.token = server.token()

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
                raise ScreenshotError(f"{dag_id} run {run_id} still {state} after {timeout} s")
            time.sleep(2)
        if state != "success":
            raise ScreenshotError(f"{dag_id} run {run_id} failed; see the task logs in the UI")
        print(f"  {dag_id}: {run_id} succeeded", flush=True)
        return run_id


class Sandbox:
    """The sandbox's admin API, to change records as users of both CRMs would."""

    def __init__(self, server: DevServer) -> None:
        from sandbox.credentials import RuntimeInfo

        self.info = RuntimeInfo.load(server.data_dir)

    def admin(self, base: str, method: str, path: str, **kwargs: Any) -> Any:
        """Call `/_sandbox/<path>` on the emulator at `base` and return its JSON."""
        response = requests.request(
            method, f"{base}/_sandbox/{path}", verify=self.info.ca_path, timeout=60, **kwargs
        )
        response.raise_for_status()
        return response.json()

    def queue_contacts(self) -> None:
        """The AC automation action "Create a lead / contact in Microsoft Dynamics" on six contacts."""
        contacts = self.admin(self.info.ac_url, "GET", "contacts/export")["contacts"]
        plain = [c["id"] for c in contacts if not any(t.startswith("D365:") for t in c["tags"])]
        for ids, kind in ((plain[:4], "lead"), (plain[4:6], "contact")):
            self.admin(
                self.info.ac_url, "POST", "automation", json={"contact_ids": ids, "type": kind}
            )

    def change_leads(self) -> None:
        """Three open Dynamics leads get a new job title."""
        leads = self.admin(self.info.d365_url, "GET", "export/leads")["value"]
        for lead in [row for row in leads if row.get("statecode") == 0][:3]:
            self.admin(
                self.info.d365_url,
                "PATCH",
                f"rows/leads/{lead['leadid']}",
                json={"jobtitle": "Head of Demo"},
            )


def take(out: Path, binary: str) -> None:
    """Start the devserver, run the DAGs, take the shots, stop everything."""
    with tempfile.TemporaryDirectory(prefix="crm-sync-shots-") as tmp:
        options = DevServerOptions(
            port=_free_port(),
            ac_port=_free_port(),
            d365_port=_free_port(),
            data_dir=Path(tmp) / "sandbox",
            airflow_home=Path(tmp) / "airflow",
        )
        server = DevServer(options)
        try:
            server.start()
            errors = server.wait_for_dags()
            if errors:
                raise ScreenshotError("DAG import errors:\n" + "\n".join(errors))
            airflow = Airflow(server)
            print("• running the DAGs", flush=True)
            sandbox = Sandbox(server)
            backfill = airflow.run(BACKFILL)
            sandbox.queue_contacts()
            airflow.run(TO_D365)
            # Unpausing starts a run for the latest schedule time: changes made after it are
            # left for the dry run and the run after it.
            airflow.run(TO_AC)
            sandbox.change_leads()
            dry_run = airflow.run(TO_AC, {"dry_run": True})
            to_ac = airflow.run(TO_AC)
            print("• taking screenshots", flush=True)
            shoot(out, binary, airflow, {BACKFILL: backfill, "dry_run": dry_run, TO_AC: to_ac})
        finally:
            server.stop()


def shoot(out: Path, binary: str, airflow: Airflow, runs: dict[str, str]) -> None:
    """The pages the runbook shows."""
    url = airflow.url
    cookie = {"name": "_token", "value": airflow.token, "url": url, "path": "/"}
    with chromium(binary, cookie) as page:
        page.open(f"{url}/dags", BACKFILL, TO_AC, TO_D365, "Latest Run")
        page.save(out / "dag-list.png")

        # The form is taller than the usual window: a taller one shows it whole.
        page.open(f"{url}/dags/{BACKFILL}", "Trigger", height=FORM_HEIGHT)
        page.click('button[aria-label="Trigger Dag"]')
        page.wait_for_text("Run Parameters", "Modified since", "Confirm a mass change")
        page.save(out / "backfill-trigger-form.png")

        # A wider grid panel, so that every run's column shows.
        page.open(
            f"{url}/dags/{TO_AC}/runs/{quote(runs[TO_AC])}",
            "5 Task Instances",
            "Success",
            width=GRID_WIDTH,
        )
        page.drag("[data-panel-resize-handle-id]", GRID_WIDTH - WIDTH)
        page.save(out / "grid-after-run.png")

        page.open(
            f"{url}/dags/{BACKFILL}/runs/{quote(runs[BACKFILL])}/tasks/load", "load: run totals"
        )
        page.save(out / "task-log-summary.png")

        page.open(
            f"{url}/dags/{TO_AC}/runs/{quote(runs['dry_run'])}/tasks/load",
            "load (dry run): nothing written; the plan",
        )
        page.save(out / "dry-run-plan.png")


def main(argv: list[str] | None = None) -> int:
    """Take every screenshot into `--out`."""
    parser = argparse.ArgumentParser(prog="python scripts/screenshots.py", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: on PATH)")
    args = parser.parse_args(argv)
    binary = args.chromium or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    if binary is None:
        print(
            "no Chromium found: apt-get install -y chromium (or pass --chromium)", file=sys.stderr
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    take(args.out.resolve(), binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
