"""Screenshots of the Airflow UI for docs/img/, taken in headless Chromium from a fresh `make up`.

Starts the devserver (`devtools.devserver`) in a throw-away home on free ports, runs the initial
sync and both direction DAGs against the seeded sandbox, then drives Chromium over the DevTools
protocol: logged in through the UI's `_token` cookie (a JWT from `POST /auth/token`), it opens each
page, waits for what the shot must show, and saves a PNG. The CRM sync page (the sync-health
plugin) is shot as the admin and as a read-only `viewer` user.

Usage: `python scripts/screenshots.py [--out docs/img]` (`make screenshots`). Needs a Chromium
(`scripts/ensure_chromium.sh`, which `make screenshots` and `make test` run first).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from devtools.browser import (
    WIDTH,
    Airflow,
    BrowserError,
    Page,
    chromium,
    find_chromium,
    free_port,
)
from devtools.devserver import DevServer, DevServerOptions

ROOT = Path(__file__).resolve().parents[1]
FORM_HEIGHT = 1160
GRID_WIDTH = 1600
HEALTH_HEIGHT = 1700
BACKFILL = "initial_sync_backfill"
TO_AC = "dynamics365_to_activecampaign"
TO_D365 = "activecampaign_to_dynamics365"
# The sync-health page is shot as an admin and as a read-only user.
USERS = "admin:admin,viewer:viewer"
ScreenshotError = BrowserError


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

    def break_lead_email(self) -> None:
        """One open Dynamics lead gets an invalid email: the next run quarantines it."""
        leads = self.admin(self.info.d365_url, "GET", "export/leads")["value"]
        lead = [row for row in leads if row.get("statecode") == 0][-1]
        self.admin(
            self.info.d365_url,
            "PATCH",
            f"rows/leads/{lead['leadid']}",
            json={"emailaddress1": "not-an-email"},
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
            port=free_port(),
            ac_port=free_port(),
            d365_port=free_port(),
            data_dir=Path(tmp) / "sandbox",
            airflow_home=Path(tmp) / "airflow",
            users=USERS,
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
            sandbox.break_lead_email()
            to_ac = airflow.run(TO_AC)
            print("• taking screenshots", flush=True)
            shoot(out, binary, airflow, {BACKFILL: backfill, "dry_run": dry_run, TO_AC: to_ac})
            shoot_health(out, binary, airflow, Airflow(server, "viewer"))
        finally:
            server.stop()


def shoot(out: Path, binary: str, airflow: Airflow, runs: dict[str, str]) -> None:
    """The pages the runbook shows."""
    url = airflow.url
    with chromium(binary, airflow.cookie) as page:
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


def _health_frame(page: Page, *texts: str) -> None:
    """Wait until the CRM sync page inside Airflow's plugin view shows `texts`."""
    probe = " && ".join(f"d.body.innerText.includes({json.dumps(t)})" for t in texts)
    page.wait_for(
        "(f => { const d = f && f.contentDocument; return !!(d && d.body && "
        f"{probe}); }})(document.querySelector('iframe'))"
    )
    time.sleep(1.5)


def shoot_health(out: Path, binary: str, admin: Airflow, viewer: Airflow) -> None:
    """The sync-health page inside Airflow's UI: as the admin, and the viewer's quarantine."""
    url = f"{admin.url}/plugin/crm-sync"
    with chromium(binary, admin.cookie) as page:
        page.open(url, "CRM sync", height=HEALTH_HEIGHT)
        _health_frame(page, "Global switch", "Retry now", "invalid_email")
        page.save(out / "sync-health.png")
    with chromium(binary, viewer.cookie) as page:
        page.open(url, "CRM sync")
        _health_frame(page, "read-only", "invalid_email")
        page.evaluate("document.querySelector('iframe').contentWindow.location.hash = 'quarantine'")
        time.sleep(1)
        page.save(out / "sync-health-viewer.png")


def main(argv: list[str] | None = None) -> int:
    """Take every screenshot into `--out`."""
    parser = argparse.ArgumentParser(prog="python scripts/screenshots.py", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: on PATH)")
    args = parser.parse_args(argv)
    binary = args.chromium or find_chromium()
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
